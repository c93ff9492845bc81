"""Backends: where records go and come from. Chosen by `AsyncIPC` from the path or URL."""
