"""Wrappers around any blrax optimizer (micro-batches, non-finite steps,
ensembles)."""
