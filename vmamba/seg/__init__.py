"""vmamba.seg."""
