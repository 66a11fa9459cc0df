"""Triton GPU backend (being written; registers nothing yet)."""
