"""vmamba.models."""
