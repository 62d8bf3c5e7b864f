"""The diagonal BLR engine: estimators, precision updates, steps and
the skeleton every family's transform calls."""
