"""Integrations with other libraries (flax NNX/Linen, orbax)."""
