"""Weight-noise generators: a value handed to the posterior."""
