"""The table of blrax variants that every shared test draws from.

One row per variant (:data:`VARIANTS`): its name, factory and ``scale_by_*``
transform, two settings (``narrow``: a posterior narrow enough for the mean
to reach the battery's optima; ``wide``: wide posteriors, for tests about the
noise itself), how its ``update`` is called (:data:`GRADS`,
:data:`PER_EXAMPLE` for VOGN, :data:`GRAD_FN` for bSAM), the form of its
``hessian=`` and the features it does not support, each with its reason.

The optax battery, nesting, invariants, single-draw, hostile-input,
checkpoint, package and feature-matrix tests are parametrised over this
table (:data:`OPTIMIZERS` and :data:`WIDE` are its two settings as
``(name, factory, kwargs)`` triples), so a new variant joins them all by
adding one row. ``tests/test_feature_matrix.py`` checks every (variant,
feature) cell: a supported feature must work (against an oracle), an
unsupported one must fail as its reason says; so when a feature lands,
that test names the entry of :data:`UNSUPPORTED` to delete.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax
import pytest

import blrax

# How ``update`` takes the batch.
GRADS = "grads"              # gradients at the draw, shaped like the params
PER_EXAMPLE = "per_example"  # VOGN: per-example gradients (a batch axis)
GRAD_FN = "grad_fn"          # bSAM: also the gradient at its adversarial point

# The features of the matrix (tests/test_feature_matrix.py). The optax
# wrappers' names are what the user writes; the rest are blrax arguments.
MC_SAMPLES = "mc_samples=2"
HESSIAN = "hessian="
PER_LEAF_DECAY = "per-leaf weight_decay"
DECAY_MASK = "weight_decay_mask"
PRIOR_MEAN = "prior_mean"
MULTI_STEPS = "blrax.MultiSteps"
APPLY_IF_FINITE = "blrax.apply_if_finite"
OPTAX_MULTI_STEPS = "optax.MultiSteps"
OPTAX_APPLY_IF_FINITE = "optax.apply_if_finite"
MASKED = "optax.masked"
INJECT = "optax.inject_hyperparams"
CHECKPOINT = "checkpoint"
SINGLE_DRAW = "single draw"
FEATURES = (MC_SAMPLES, HESSIAN, PER_LEAF_DECAY, DECAY_MASK, PRIOR_MEAN,
            MULTI_STEPS, APPLY_IF_FINITE, OPTAX_MULTI_STEPS,
            OPTAX_APPLY_IF_FINITE, MASKED, INJECT, CHECKPOINT, SINGLE_DRAW)

# A reason starting with one of these: the feature runs but its property
# fails (the matrix expects an AssertionError). Any other reason: the
# library refuses the feature with a ValueError naming it.
PROPERTY_FAILS = ("bug:", "limitation:")

# --- the unsupported cells, with their reasons -------------------------------
# To shrink: delete the entry. tests/test_feature_matrix.py fails with
# "declared unsupported ... but it works" until the entry is gone.

_FULL_VON = {
    SINGLE_DRAW:
        "limitation: the draw's Cholesky factor of S + D is computed "
        "twice per train step: sample_params factors it inside a lax.cond "
        "(FullGaussian.flat_offset), update again outside one "
        "(FullGaussian.factor, for the Price estimate and the curvature "
        "update), and XLA does not merge the two: one extra O(D^3) "
        "factorisation per step",
}
# The wrappers from optax keep params-shaped buffers.
_OPTAX_SHAPED = {
    OPTAX_MULTI_STEPS:
        "optax.MultiSteps' accumulator has the params' shape: it cannot hold "
        "gradients with a sample or batch axis (use blrax.MultiSteps)",
    OPTAX_APPLY_IF_FINITE:
        "optax.apply_if_finite's reject branch returns zeros shaped like the "
        "gradients, not like the update (use blrax.apply_if_finite)",
}
_NO_HESSIAN = {
    "vadam": "Vadam's curvature is the squared gradient (batch_size * "
             "g_bar^2): its update takes no hessian=",
    "bsam": "bSAM's curvature target is sqrt(s)|g| + damping, from the "
            "gradient's magnitude: its update takes no hessian=",
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """A row of the table.

  Attributes:
    name: the test id.
    factory: the optimizer (``blrax.ivon``, ...); its first argument is the
      learning rate.
    transform: its ``scale_by_*`` transform.
    narrow: settings whose posterior is narrow (the battery's optima).
    wide: settings whose posterior is wide (noise, checkpoint, nesting).
    call: how ``update`` takes the batch (GRADS, PER_EXAMPLE, GRAD_FN).
    hessian: the form of ``hessian=``: "tree" (like the params) or
      "matrix" (``(D, D)`` in ravel_pytree order).
    unsupported: feature -> why it is not supported.
    family: the row it varies (its name for a family's own row).
    slow: the row repeats its family's engine with another noise generator:
      its cases in the shared tests are marked slow.
    fixed_step_length: the step's length is the learning rate whatever the
      gradient (EVON's whitening): its mean reaches a minimum only as the
      learning rate is annealed to 0.
  """

  name: str
  factory: Callable[..., Any]
  transform: Callable[..., Any]
  narrow: Mapping[str, Any]
  wide: Mapping[str, Any]
  call: str = GRADS
  hessian: str = "tree"
  unsupported: Mapping[str, str] = dataclasses.field(default_factory=dict)
  family: str = ""
  slow: bool = False
  fixed_step_length: bool = False

  def __post_init__(self):
    if not self.family:
      object.__setattr__(self, "family", self.name)

  def but(self, name: str, slow: bool = False, **override) -> Variant:
    """The same variant (of the same family) with ``override`` in both
    settings."""
    return dataclasses.replace(self, name=name, slow=slow,
                               narrow={**self.narrow, **override},
                               wide={**self.wide, **override})

  def supports(self, feature: str) -> bool:
    assert feature in FEATURES, feature
    return feature not in self.unsupported

  @property
  def mc_samples(self) -> int:
    return self.wide.get("mc_samples", 1)

  @property
  def couples_leaves(self) -> bool:
    """Whether the posterior couples the leaves (a full covariance: its
    ``hessian=`` is one matrix over all of them)."""
    return self.hessian == "matrix"


def _sample_axis(variant: Variant) -> Variant:
  """mc_samples > 1: the gradients gain a leading axis optax's wrappers
  cannot hold."""
  return dataclasses.replace(
      variant, unsupported={**variant.unsupported, **_OPTAX_SHAPED})


# Large ess (narrow): the mean must reach the optimum of the battery's
# deterministic targets. The Price estimator's variance grows with
# ess * g^2, so the Price-based variants need a slow curvature EMA there.
# Small ess (wide): sigma ~ 0.1, for the tests about the noise.
_WIDE = dict(learning_rate=1e-2, ess=50.0, hess_init=2.0)

IVON = Variant("ivon", blrax.ivon, blrax.scale_by_ivon,
               narrow=dict(learning_rate=1e-2, ess=1e6), wide=_WIDE)
VON_DIAG = Variant("von_diag", blrax.von, blrax.scale_by_von,
                   narrow=dict(learning_rate=0.1, ess=1e6), wide=_WIDE)
VON_FULL = Variant(
    "von_full", blrax.von, blrax.scale_by_full_von,
    narrow=dict(learning_rate=1e-2, ess=1e6, b2=0.99999, covariance="full"),
    wide=dict(_WIDE, covariance="full"), hessian="matrix",
    unsupported=_FULL_VON)
VADAM = Variant("vadam", blrax.vadam, blrax.scale_by_vadam,
                narrow=dict(learning_rate=1e-2, ess=1e8), wide=_WIDE,
                unsupported={HESSIAN: _NO_HESSIAN["vadam"]})
VOGN = Variant("vogn", blrax.vogn, blrax.scale_by_vogn,
               narrow=dict(learning_rate=1e-2, ess=1e8, b2=0.99999),
               wide=_WIDE, call=PER_EXAMPLE, unsupported=_OPTAX_SHAPED)
EVON = Variant("evon", blrax.evon, blrax.scale_by_evon,
               narrow=dict(learning_rate=1e-2, ess=1e6,
                           precondition_frequency=3),
               wide=dict(_WIDE, precondition_frequency=3),
               fixed_step_length=True)
BSAM = Variant("bsam", blrax.bsam, blrax.scale_by_bsam,
               narrow=dict(learning_rate=1e-2, ess=1e6, rho=1e-3, damping=1e-2),
               wide=dict(_WIDE, rho=0.05), call=GRAD_FN,
               unsupported={HESSIAN: _NO_HESSIAN["bsam"]})

VARIANTS = [
    IVON,
    _sample_axis(IVON.but("ivon_mc2", mc_samples=2)),
    IVON.but("ivon_hash", slow=True, noise="hash"),
    IVON.but("ivon_flip", slow=True, noise="flip"),
    VON_DIAG,
    VON_FULL,
    VADAM,
    VADAM.but("vadam_hash", slow=True, noise="hash"),
    VADAM.but("vadam_flip", slow=True, noise=blrax.noise.flip_noise(4)),
    VOGN,
    EVON,
    BSAM,
]
BY_NAME = {v.name: v for v in VARIANTS}
# One row per family: its own settings (the others vary the noise or the
# number of samples).
FAMILIES = [v for v in VARIANTS if v.name == v.family]
assert len(BY_NAME) == len(VARIANTS), "duplicate variant names"
for _v in VARIANTS:
  assert set(_v.unsupported) <= set(FEATURES), (_v.name, _v.unsupported)
UNSUPPORTED = {(v.name, f): r for v in VARIANTS for f, r in v.unsupported.items()}



def param(v: Variant, *values) -> Any:
  """A pytest parameter of row ``v``: its id, and the slow mark if it is
  slow."""
  return pytest.param(*values, id=v.name,
                      marks=[pytest.mark.slow] if v.slow else [])


# The two settings as (name, factory, kwargs), for pytest.mark.parametrize.
OPTIMIZERS = [param(v, v.name, v.factory, dict(v.narrow)) for v in VARIANTS]
WIDE = [param(v, v.name, v.factory, dict(v.wide)) for v in VARIANTS]


def ids(cases):
  """The ids of a list of parameters (ParameterSets or tuples)."""
  return [c.id if hasattr(c, "marks") else c[0] for c in cases]


def variant(v: Variant | str | Callable) -> Variant:
  """The row of ``v``: a row, its name, or a factory (its first row: the
  way ``update`` is called is the factory's)."""
  if isinstance(v, Variant):
    return v
  if isinstance(v, str):
    return BY_NAME[v]
  return next(row for row in VARIANTS if row.factory is v)


def supports(v: Variant | str | Callable, feature: str) -> bool:
  return variant(v).supports(feature)


def per_example(v: Variant | str) -> bool:
  """VOGN's update takes per-example gradients (a batch axis)."""
  return variant(v).call == PER_EXAMPLE


def grads(v: Variant | str, loss, theta, mc_samples=1):
  """The gradients ``v``'s update takes, of ``loss`` at the draw.

  The battery's losses are not sums over examples; for VOGN the whole loss is
  one example (a batch of one), so its curvature is the squared gradient.
  """
  grad = jax.grad(loss)
  if mc_samples > 1:
    grad = jax.vmap(grad)
  return lift(v, grad(theta), mc_samples)


def lift(v: Variant | str, tree, mc_samples=1):
  """Adds VOGN's batch axis (of size one) to plain gradients."""
  if not per_example(v):
    return tree
  axis = 1 if mc_samples > 1 else 0
  return jax.tree.map(functools.partial(jnp.expand_dims, axis=axis), tree)


def update_kwargs(v, loss, params=None, opt_state=None, grads=None) -> dict:
  """The keyword arguments ``v``'s update needs besides (grads, state,
  params): bSAM's gradient of the same ``loss`` at its adversarial point;
  nothing for the others.

  Given ``params``, ``opt_state`` and ``grads`` (inside ``optax.masked`` or
  ``optax.partition``, where bSAM sees only the params it covers and cannot
  call ``grad_fn``): ``adversarial_grads``, the gradient at the point each
  bSAM state in ``opt_state`` moves its own params to (build the wrapper
  with ``mask_compatible_extra_args=True``). Else ``grad_fn=jax.grad(loss)``.
  """
  if variant(v).call != GRAD_FN:
    return {}
  if opt_state is None:
    return {"grad_fn": jax.grad(loss)}
  hole = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  is_bsam = lambda x: isinstance(x, blrax.ScaleByBSAMState)  # noqa: E731
  point = params
  for state in jax.tree.leaves(opt_state, is_leaf=is_bsam):
    if is_bsam(state):
      moved = blrax.bsam_adversarial_params(params, state, grads)
      point = jax.tree.map(lambda h, p, m: p if hole(h) else m,
                           state.posterior.curvature, point, moved,
                           is_leaf=hole)
  return {"adversarial_grads": jax.grad(loss)(point)}


def linear_loss(g):
  """The loss whose gradient is ``g`` everywhere: for tests that feed given
  gradient arrays to an update that also takes a loss (bSAM)."""
  return lambda p: sum(jnp.vdot(x, y) for x, y in zip(
      jax.tree.leaves(g), jax.tree.leaves(p)))


def hessian(v: Variant | str, diagonal, mc_samples=1):
  """``hessian=`` for ``v`` from a diagonal (a pytree like the params, with
  the sample axis when ``mc_samples > 1``): the tree itself, or the (D, D)
  matrix of full-covariance VON."""
  if variant(v).hessian == "tree":
    return diagonal
  if mc_samples > 1:
    return jax.vmap(lambda d: hessian(v, d))(diagonal)
  return jnp.diag(jax.flatten_util.ravel_pytree(diagonal)[0])


def static_args(factory) -> tuple[str, ...]:
  """The arguments ``optax.inject_hyperparams`` must keep static."""
  names = ("mc_samples", "max_dim", "max_precond_dim")
  return tuple(a for a in names if a in inspect.signature(factory).parameters)


def check_cell(v: Variant | str, feature: str, check: Callable[[], Any],
               names: str = "") -> None:
  """Runs ``check()`` (which exercises ``feature`` and asserts its property)
  as the table says: a supported feature must pass; an unsupported one must
  fail, with a ValueError or TypeError whose message contains ``names``
  (a refusal), or with an AssertionError where the reason starts with
  "bug:" or "limitation:". An unsupported feature that passes fails the
  test, naming the entry of the table to delete."""
  v = variant(v)
  reason = v.unsupported.get(feature)
  if reason is None:
    check()
    return
  expected = (AssertionError if reason.startswith(PROPERTY_FAILS)
              else (ValueError, TypeError))
  try:
    check()
  except expected as error:
    if expected is not AssertionError:
      assert names.lower() in str(error).lower(), (
          f"{v.name}: {feature} is refused, but the message does not name "
          f"{names!r}: {error}")
    return
  pytest.fail(f"{v.name}: {feature!r} is declared unsupported ({reason!r}) "
              f"but it works: delete it from {v.name}'s unsupported features "
              "in tests/cases.py.")


def matrix() -> str:
  """The feature matrix as text: a row per variant, ✓ or – per feature."""
  width = max(len(v.name) for v in VARIANTS)
  head = " " * width + " | " + " | ".join(FEATURES)
  lines = [head, "-" * len(head)]
  for v in VARIANTS:
    cells = [("✓" if v.supports(f) else "–").center(len(f)) for f in FEATURES]
    lines.append(v.name.ljust(width) + " | " + " | ".join(cells))
  return "\n".join(lines)



