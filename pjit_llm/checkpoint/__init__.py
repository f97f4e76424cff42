"""Checkpoints: the Orbax manager with its integrity and compatibility checks, and loading a
run directory's config and parameters."""
