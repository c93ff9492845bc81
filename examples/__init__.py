"""Example applications (used by the integration tests)."""
