"""vmamba.tasks."""
