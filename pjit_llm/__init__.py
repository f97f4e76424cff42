"""pjit_llm: decoder-only transformers trained with JAX SPMD."""

__version__ = "0.1.0"
