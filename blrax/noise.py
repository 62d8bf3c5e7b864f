"""Weight-noise generators for the ``noise=`` argument of every diagonal
optimizer, and their (plain-data) states. See ``blrax/_src/noise/generators.py``."""

from blrax._src.noise.generators import (
    FlipNoise,
    FlipNoiseState,
    HashNoise,
    HashNoiseState,
    NormalNoise,
    NormalNoiseState,
    flip_noise,
)

__all__ = (
    "FlipNoise",
    "FlipNoiseState",
    "HashNoise",
    "HashNoiseState",
    "NormalNoise",
    "NormalNoiseState",
    "flip_noise",
)
