"""Functions of a posterior: lookup, gradients at the draw, merging,
health. They see only the protocols of ``base``, never an optimizer."""
