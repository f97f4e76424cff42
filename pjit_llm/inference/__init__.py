"""Inference on the mesh: generation with a key/value cache, and held-out evaluation."""
