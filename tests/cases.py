"""The blrax optimizers every shared test runs over, with settings that work.

Each case is (name, factory, kwargs). The battery, nesting and invariant tests
are parametrised over these lists, so a new variant joins them here.
"""

import functools

import jax
import jax.numpy as jnp

import blrax

# Large ess: a narrow posterior, so the mean must reach the optimum of the
# battery's deterministic targets. The Price estimator's variance grows with
# ess * g^2, so the Price-based variants need a slow curvature EMA there.
OPTIMIZERS = [
    ("ivon", blrax.ivon, dict(learning_rate=1e-2, ess=1e6)),
    ("ivon_mc2", blrax.ivon, dict(learning_rate=1e-2, ess=1e6, mc_samples=2)),
    ("ivon_hash", blrax.ivon, dict(learning_rate=1e-2, ess=1e6, noise="hash")),
    ("ivon_flip", blrax.ivon, dict(learning_rate=1e-2, ess=1e6, noise="flip")),
    ("vadam_flip", blrax.vadam,
     dict(learning_rate=1e-2, ess=1e8, noise=blrax.noise.flip_noise(4))),
    ("von_diag", blrax.von, dict(learning_rate=0.1, ess=1e6)),
    ("von_full", blrax.von,
     dict(learning_rate=1e-2, ess=1e6, b2=0.99999, covariance="full")),
    ("vadam", blrax.vadam, dict(learning_rate=1e-2, ess=1e8)),
    ("vogn", blrax.vogn, dict(learning_rate=1e-2, ess=1e8, b2=0.99999)),
    ("evon", blrax.evon, dict(learning_rate=1e-2, ess=1e6,
                              precondition_frequency=3)),
]

# Small ess: wide posteriors, for tests about the noise itself.
WIDE = [
    ("ivon", blrax.ivon, dict(learning_rate=1e-2, ess=50.0, hess_init=2.0)),
    ("ivon_hash", blrax.ivon,
     dict(learning_rate=1e-2, ess=50.0, hess_init=2.0, noise="hash")),
    ("von_diag", blrax.von, dict(learning_rate=1e-2, ess=50.0, hess_init=2.0)),
    ("von_full", blrax.von,
     dict(learning_rate=1e-2, ess=50.0, hess_init=2.0, covariance="full")),
    ("vadam", blrax.vadam, dict(learning_rate=1e-2, ess=50.0, hess_init=2.0)),
    ("vadam_hash", blrax.vadam,
     dict(learning_rate=1e-2, ess=50.0, hess_init=2.0, noise="hash")),
    ("vogn", blrax.vogn, dict(learning_rate=1e-2, ess=50.0, hess_init=2.0)),
    ("evon", blrax.evon, dict(learning_rate=1e-2, ess=50.0, hess_init=2.0,
                              precondition_frequency=3)),
]


def ids(cases):
  return [c[0] for c in cases]


def per_example(factory) -> bool:
  """VOGN's update takes per-example gradients (a batch axis)."""
  return factory is blrax.vogn


def grads(factory, loss, theta, mc_samples=1):
  """The gradients ``factory``'s update takes, of ``loss`` at the draw.

  The battery's losses are not sums over examples; for VOGN the whole loss is
  one example (a batch of one), so its curvature is the squared gradient.
  """
  grad = jax.grad(loss)
  if mc_samples > 1:
    grad = jax.vmap(grad)
  out = grad(theta)
  return lift(factory, out, mc_samples)


def lift(factory, tree, mc_samples=1):
  """Adds VOGN's batch axis (of size one) to plain gradients."""
  if not per_example(factory):
    return tree
  axis = 1 if mc_samples > 1 else 0
  return jax.tree.map(functools.partial(jnp.expand_dims, axis=axis), tree)
