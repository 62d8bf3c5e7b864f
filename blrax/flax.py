"""Flax NNX and Linen helpers (needs the ``flax`` extra:
``pip install 'blrax[flax]'``)."""

try:
  import flax as _flax  # noqa: F401
except ImportError as error:
  raise ImportError(
      "blrax.flax needs flax: pip install 'blrax[flax]' (or flax).") from error

from blrax._src.integrations.flax_nnx import (  # noqa: E402
    VariationalTrainState,
    nnx_sample,
    nnx_value_and_grad,
    nnx_value_grads_and_squares,
)

__all__ = ("VariationalTrainState", "nnx_sample", "nnx_value_and_grad",
           "nnx_value_grads_and_squares")
