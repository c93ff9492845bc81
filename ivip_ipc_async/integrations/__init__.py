"""Integrations with frameworks and tools; each imports its framework lazily."""
