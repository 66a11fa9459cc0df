"""vmamba.layers."""
