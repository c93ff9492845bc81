"""The Redis backend's tests, one module per concern of backends/redis/."""
