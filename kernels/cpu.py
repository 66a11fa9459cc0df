"""Fast CPU backend (being written; registers nothing yet)."""
