"""Training: the state and its pure steps, the optimizer, the builder that assembles them
from a config, and the loop with its periodic actions."""
