"""The blrax optimizers every shared test runs over, with settings that work.

Each case is (name, factory, kwargs). Issue-3 variants join this list; the
battery, nesting and invariant tests then cover them without copies.
"""

import blrax

# Large ess: the posterior is narrow, so the mean must reach the optimum.
OPTIMIZERS = [
    ("ivon", blrax.ivon, dict(learning_rate=1e-2, ess=1e6)),
    ("ivon_mc2", blrax.ivon, dict(learning_rate=1e-2, ess=1e6, mc_samples=2)),
]

# Small ess: wide posteriors, for tests about the noise itself.
WIDE = [
    ("ivon", blrax.ivon, dict(learning_rate=1e-2, ess=50.0, hess_init=2.0)),
]


def ids(cases):
  return [c[0] for c in cases]
