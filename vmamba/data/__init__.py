"""vmamba.data."""
