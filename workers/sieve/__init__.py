"""Sieve: a stream worker that routes and moderates events by meaning."""

__version__ = "0.1.0"
