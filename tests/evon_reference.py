r"""A float64 NumPy transcription of the official EVON optimizer.

EVON (Minut et al., 2026, *SOAP-Bubbles: Structured Weight Uncertainty for
Neural Networks*, arXiv 2606.23357) runs IVON's diagonal variational update
in the eigenbasis of SOAP's Kronecker factors. Its official implementation is
the PyTorch repository ``team-approx-bayes/evon`` (``evon-src/evon.py``,
class ``EVON``), under the GPL-3.0. This module was written from the
specification in ``docs/evon_algorithm.md``; it contains no code of that
repository. It is a test oracle, not part of ``blrax``.

Usage (the caller draws the standard normals, so that two implementations
can be fed the same noise)::

  state = init({"w": w0, "b": b0}, ess=1e4, hess_init=1.0)
  for batch in data:
    noise = standard_normal(state, rng)          # one tree per MC sample
    thetas = [draw(state, e) for e in noise]     # M + Q(sigma * E)
    grads = [grad_fn(t, batch) for t in thetas]
    state = step(state, grads, noise)
  means = params(state)

Precision. ``exact=True`` (the default) computes everything in float64: the
oracle of a float64 run of another implementation. ``exact=False`` mimics the
places where the official code deliberately drops precision: the initial
eigendecomposition and the QR power iteration in float32 (the float32 LAPACK
routines, ``ssyevd``/``sgeqrf``), and the Newton-Schulz whitening in
bfloat16 (bfloat16 operands, float32 accumulation, rounding to bfloat16 after
each matrix product and after each fused elementwise expression, as the
official function, compiled with ``torch.compile``, does). Everything else
stays float64 (the official code keeps all optimizer state in
``cast_dtype``, float32 by default; that is not mimicked), so
``exact=False`` is close to, not bitwise equal to, the official optimizer.

Signs. The columns of an eigenbasis or of a QR factor are defined up to sign,
and the draw :math:`M + Q_L(\sigma\odot E)Q_R^\top` depends on them (the rest
of the algorithm does not). ``signs="lapack"`` (default) keeps the signs the
LAPACK routines return (via SciPy, the same LAPACK that JAX uses on CPU);
``signs="canonical"`` makes the largest-magnitude entry of each eigenvector
positive and the diagonal of each QR factor R non-negative, which fixes the
bases uniquely (for distinct eigenvalues and full-rank power iterates).

Extensions (documented, not in the official code): a 0-D parameter with
whitening on is treated as a vector of length 1 (its update becomes
``u / max(|u|, eps)``); the official code raises an IndexError there. And
the options that ``blrax.evon`` keeps beyond the official algorithm, each
off by default here (the official behaviour):

- ``null_space="complete"`` (``"lapack"``: official): the determinism rule
  of ``blrax.evon``. In the first eigh, the eigenvectors of eigenvalues at
  most ``n * eps * lambda_max`` (``eps`` of the precision in use) are
  replaced by a completion of the others: the QR of the eigenvectors with
  those columns taken from :func:`fixed_start` (an integer hash), each new
  column signed like its start column. In a QR refresh, a column whose
  ``|R_jj|`` is at most ``n * eps`` times the largest (its image ``L q_j``
  depends on the earlier ones) is replaced by ``q_j`` and the QR redone;
  that column is then signed like ``q_j``.
- ``refresh="eigh"`` (``"qr"``: official): a full :func:`initial_basis` at
  every refresh instead of one power iteration.
- ``reproject=True`` (False: official): at a refresh, ``h`` becomes the
  diagonal, in the new bases, of the old curvature matrix (mode products
  with ``(Q_new^T Q_old)**2``) instead of keeping its index.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import ml_dtypes
import numpy as np
import scipy.linalg

# Newton-Schulz quintic coefficients of Muon (K. Jordan, 2024), iterations,
# and the floor of the Frobenius norm used to normalise its input.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_NORM_FLOOR = 1e-7
# Added to the diagonal of a Kronecker factor before the first eigh.
EIGH_JITTER = 1e-30

DEFAULTS = {
    "lr": 3e-3,
    "betas": (0.95, 0.9999),
    "shampoo_beta": -1.0,  # -1: use betas[1]
    "eps": 1e-10,
    "weight_decay": 1e-6,
    "precondition_frequency": 10,
    "max_precond_dim": 10000,
    "merge_dims": False,
    "precondition_1d": False,
    "data_format": "channels_first",
    "correct_bias": True,
    "mc_samples": 1,
    "phasing": False,
    "price_clip_ratio": None,
    "whiten_prec_grad": True,
    "debias_beta2": False,
    # Of this transcription, not of the official optimizer:
    "exact": True,
    "signs": "lapack",
    "null_space": "lapack",
    "refresh": "qr",
    "reproject": False,
}


# ---------------------------------------------------------------------------
# Hyperparameters and trees
# ---------------------------------------------------------------------------


def make_hyper(ess: float, hess_init: float, **overrides: Any) -> dict:
  """The full hyperparameter dict (defaults, then ``overrides``), checked
  as the official constructor checks them."""
  unknown = set(overrides) - set(DEFAULTS)
  if unknown:
    raise TypeError(f"unknown EVON hyperparameters: {sorted(unknown)}")
  hyper = dict(DEFAULTS, **overrides)
  hyper["ess"] = float(ess)
  hyper["hess_init"] = float(hess_init)
  hyper["betas"] = tuple(float(b) for b in hyper["betas"])
  b1, b2 = hyper["betas"]
  if not hyper["ess"] > 0.0:
    raise ValueError(f"ess must be > 0, got {ess}")
  if not hyper["lr"] >= 0.0:
    raise ValueError(f"lr must be >= 0, got {hyper['lr']}")
  for name, b in (("beta1", b1), ("beta2", b2)):
    if not 0.0 <= b < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {b}")
  sb = hyper["shampoo_beta"]
  if not (0.0 <= sb < 1.0 or sb == -1):
    raise ValueError(f"shampoo_beta must be in [0, 1) or -1, got {sb}")
  if not hyper["weight_decay"] >= 0.0:
    raise ValueError(f"weight_decay must be >= 0, got {hyper['weight_decay']}")
  if not int(hyper["mc_samples"]) >= 1:
    raise ValueError(f"mc_samples must be >= 1, got {hyper['mc_samples']}")
  if hyper["data_format"] not in ("channels_first", "channels_last"):
    raise ValueError(f"bad data_format {hyper['data_format']!r}")
  if hyper["signs"] not in ("lapack", "canonical"):
    raise ValueError(f"signs must be 'lapack' or 'canonical', got "
                     f"{hyper['signs']!r}")
  if hyper["null_space"] not in ("lapack", "complete"):
    raise ValueError(f"bad null_space {hyper['null_space']!r}")
  if hyper["refresh"] not in ("qr", "eigh"):
    raise ValueError(f"bad refresh {hyper['refresh']!r}")
  hyper["factor_beta"] = b2 if sb == -1 else float(sb)
  return hyper


def _flatten(tree: Any) -> tuple[list, list, Any]:
  """(keys, leaves, kind) of a dict, a list/tuple or a single array."""
  if isinstance(tree, dict):
    keys = list(tree)
    return keys, [tree[k] for k in keys], ("dict", keys)
  if isinstance(tree, (list, tuple)):
    return list(range(len(tree))), list(tree), (type(tree).__name__,
                                                len(tree))
  return [0], [tree], ("single", 1)


def _unflatten(kind: Any, leaves: list) -> Any:
  tag, info = kind
  if tag == "dict":
    return dict(zip(info, leaves))
  if tag == "list":
    return list(leaves)
  if tag == "tuple":
    return tuple(leaves)
  return leaves[0]


def _f64(x: Any) -> np.ndarray:
  return np.array(x, dtype=np.float64)


# ---------------------------------------------------------------------------
# Layout: merged modes and Kronecker factors
# ---------------------------------------------------------------------------


def merge_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple:
  """The official ``merge_dims`` rule: walk the modes left to right,
  multiplying consecutive sizes into one group while the product stays
  ``<= max_precond_dim``. When the next size would push the product over:
  close the group if it is larger than 1 and start a new one with that size
  (even if the size alone is over the limit); if the group is still 1, emit
  the size on its own and restart at 1. At the end emit the group if it is
  larger than 1, or if nothing was emitted (so a 0-D shape becomes ``(1,)``).
  """
  merged, group = [], 1
  for size in shape:
    if group * size > max_precond_dim:
      if group > 1:
        merged.append(group)
        group = size
      else:
        merged.append(size)
        group = 1
    else:
      group *= size
  if group > 1 or not merged:
    merged.append(group)
  return tuple(merged)


def _channels_last_4d(shape: tuple, hyper: dict) -> bool:
  return hyper["data_format"] == "channels_last" and len(shape) == 4


def preconditioner_shape(shape: tuple[int, ...], hyper: dict) -> tuple:
  """The shape whose modes get Kronecker factors: the param shape, or with
  ``merge_dims`` its merged shape (a 4-D channels-last tensor is first
  permuted to channels-first, (0, 3, 1, 2)). Vectors are never merged."""
  shape = tuple(shape)
  if not hyper["merge_dims"] or len(shape) == 1:
    return shape
  if _channels_last_4d(shape, hyper):
    shape = (shape[0], shape[3], shape[1], shape[2])
  return merge_shape(shape, hyper["max_precond_dim"])


def factor_sizes(shape: tuple[int, ...], hyper: dict) -> list:
  """One entry per mode of :func:`preconditioner_shape`: the size of its
  Kronecker factor, or None where that mode is not rotated (identity).

  A vector gets a factor only with ``precondition_1d`` and size
  ``<= max_precond_dim``; any other mode gets one when its size is
  ``<= max_precond_dim`` (size-1 modes included: a trivial 1x1 factor).
  """
  shape = tuple(shape)
  limit = hyper["max_precond_dim"]
  if len(shape) == 1:
    ok = hyper["precondition_1d"] and shape[0] <= limit
    return [shape[0] if ok else None]
  return [s if s <= limit else None
          for s in preconditioner_shape(shape, hyper)]


def _to_layout(x: np.ndarray, hyper: dict) -> np.ndarray:
  if not hyper["merge_dims"] or x.ndim == 1:
    return x
  if _channels_last_4d(x.shape, hyper):
    x = np.transpose(x, (0, 3, 1, 2))
  return x.reshape(merge_shape(x.shape, hyper["max_precond_dim"]))


def _from_layout(y: np.ndarray, shape: tuple, hyper: dict) -> np.ndarray:
  if not hyper["merge_dims"] or len(shape) == 1:
    return y
  if _channels_last_4d(shape, hyper):
    permuted = (shape[0], shape[3], shape[1], shape[2])
    return np.transpose(y.reshape(permuted), (0, 2, 3, 1))
  return y.reshape(shape)


def _mode_product(x: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
  """``x`` times ``matrix`` along ``mode``: (matrix @ unfold(x, mode))."""
  out = np.tensordot(matrix, x, axes=([1], [mode]))
  return np.moveaxis(out, 0, mode)


def rotate(x: np.ndarray, bases: list, hyper: dict) -> np.ndarray:
  r"""Into the eigenbasis: :math:`x \times_1 Q_1^\top \cdots \times_k
  Q_k^\top` (for a matrix, :math:`Q_L^\top X Q_R`); identity on the modes
  without a factor."""
  shape = x.shape
  y = _to_layout(x, hyper)
  for mode, q in enumerate(bases):
    if q is not None:
      y = _mode_product(y, q.T, mode)
  return _from_layout(y, shape, hyper)


def unrotate(y: np.ndarray, bases: list, hyper: dict) -> np.ndarray:
  r"""Back from the eigenbasis: :math:`y \times_1 Q_1 \cdots \times_k Q_k`
  (for a matrix, :math:`Q_L Y Q_R^\top`)."""
  shape = y.shape
  x = _to_layout(y, hyper)
  for mode, q in enumerate(bases):
    if q is not None:
      x = _mode_product(x, q, mode)
  return _from_layout(x, shape, hyper)


def mode_gram(x: np.ndarray, mode: int) -> np.ndarray:
  """:math:`X_{(i)} X_{(i)}^\\top`, the mode-``mode`` unfolding times its
  transpose (for a matrix: ``X X^T`` for mode 0, ``X^T X`` for mode 1)."""
  unfolded = np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)
  return unfolded @ unfolded.T


# ---------------------------------------------------------------------------
# Bases: the first eigh and the QR power iteration
# ---------------------------------------------------------------------------


def fixed_start(n: int) -> np.ndarray:
  """A fixed n x n matrix with entries in [-0.5, 0.5) from an integer hash
  of (row, column) (the start of ``null_space="complete"``)."""
  with np.errstate(over="ignore"):
    i = np.arange(n, dtype=np.uint32)[:, None]
    j = np.arange(n, dtype=np.uint32)[None, :]
    x = (i * np.uint32(0x9E3779B1) + j * np.uint32(0x85EBCA77)
         + np.uint32(0x27D4EB2F))
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    x = x ^ (x >> np.uint32(16))
  return (x >> np.uint32(8)).astype(np.float64) * 2.0 ** -24 - 0.5


def _null_tolerance(n: int, dtype) -> float:
  return max(n, 1) * float(np.finfo(dtype).eps)


def _qr(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return scipy.linalg.qr(a, mode="economic")


def initial_basis(factor: np.ndarray, exact: bool = True,
                  signs: str = "lapack", null_space: str = "lapack"
                  ) -> np.ndarray:
  """Eigenvectors of a Kronecker factor, by decreasing eigenvalue.

  ``eigh`` of ``factor + 1e-30 I`` (float32 when not ``exact``, retried in
  float64 if that fails), columns reversed from LAPACK's ascending order.
  ``null_space="complete"``: see the module docstring.
  """
  dtype = np.float64 if exact else np.float32
  n = factor.shape[0]
  m = np.asarray(factor, dtype) + dtype(EIGH_JITTER) * np.eye(n, dtype=dtype)
  try:
    values, vectors = scipy.linalg.eigh(m, driver="evd")
  except np.linalg.LinAlgError:
    values, vectors = scipy.linalg.eigh(m.astype(np.float64), driver="evd")
    values, vectors = values.astype(dtype), vectors.astype(dtype)
  values, vectors = values[::-1], vectors[:, ::-1]
  if signs == "canonical":
    rows = np.argmax(np.abs(vectors), axis=0)
    flip = vectors[rows, np.arange(n)] < 0
    vectors = vectors * np.where(flip, -1.0, 1.0).astype(dtype)
  if null_space == "complete":
    null = values <= _null_tolerance(n, dtype) * values[0]
    if null.any():
      start = fixed_start(n).astype(dtype)
      q, _ = _qr(np.where(null[None, :], start, vectors))
      sign = np.sign(np.sum(q * start, axis=0))
      q = q * np.where(sign == 0, 1.0, sign).astype(dtype)
      vectors = np.where(null[None, :], q, vectors)
  return _f64(vectors)


def qr_refresh(factor: np.ndarray, basis: np.ndarray, exact: bool = True,
               signs: str = "lapack", null_space: str = "lapack"
               ) -> np.ndarray:
  """One power iteration of SOAP's refresh: ``Q <- qr(L @ Q)`` (float32
  when not ``exact``). No reordering of the columns.
  ``null_space="complete"``: see the module docstring."""
  dtype = np.float64 if exact else np.float32
  start = np.asarray(basis, dtype)
  iterate = np.asarray(factor, dtype) @ start
  q, r = _qr(iterate)
  dependent = np.zeros(iterate.shape[1], bool)
  if null_space == "complete":
    size = np.abs(np.diag(r))
    dependent = size <= _null_tolerance(len(size), dtype) * size.max()
    if dependent.any():
      q, r = _qr(np.where(dependent[None, :], start, iterate))
  if signs == "canonical":
    d = np.sign(np.diag(r))
    q = q * np.where(d == 0, 1.0, d).astype(dtype)
  sign = np.sign(np.sum(q * start, axis=0))
  q = np.where(dependent[None, :] & (sign < 0), -q, q)
  return _f64(q)


def reproject(h: np.ndarray, old: list, new: list, hyper: dict) -> np.ndarray:
  """``h`` as the diagonal, in the ``new`` bases, of the curvature matrix
  that it is in the ``old`` ones: the mode products with
  ``(Q_new^T Q_old)**2`` (the ``reproject`` option)."""
  maps = [None if q is None else np.square(n.T @ q)
          for q, n in zip(old, new)]
  return unrotate(h, maps, hyper)


# ---------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------


def _bf16(x: np.ndarray) -> np.ndarray:
  """Round to bfloat16 (from float32, as a float32 kernel output is)."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(
      np.float32)


def newton_schulz(g: np.ndarray, exact: bool = True) -> np.ndarray:
  r"""Muon's quintic Newton-Schulz iteration toward the orthogonal polar
  factor :math:`UV^\top` of a matrix :math:`G = USV^\top`.

  Work on the wide orientation (transpose when rows > cols); divide by
  :math:`\max(\|G\|_F, 10^{-7})`; five times
  :math:`A = XX^\top,\ X \leftarrow aX + (bA + cA^2)X` with
  :math:`(a,b,c) = (3.4445, -4.7750, 2.0315)`. The singular vectors are
  kept; each singular value :math:`s` goes to :math:`p^{\circ 5}(s)`,
  :math:`p(s) = as + bs^3 + cs^5`, which lands in roughly [0.7, 1.2] for
  :math:`s` not too small (not exactly 1: Muon's trade of accuracy for
  speed). In bfloat16 unless ``exact``; the result is float64.
  """
  if g.ndim != 2:
    raise ValueError("newton_schulz needs a matrix")
  a, b, c = NS_COEFFICIENTS
  wide = g.shape[0] <= g.shape[1]
  if exact:
    x = _f64(g) if wide else _f64(g).T
    x = x / max(np.linalg.norm(x), NS_NORM_FLOOR)
    for _ in range(NS_STEPS):
      gram = x @ x.T
      x = a * x + (b * gram + c * (gram @ gram)) @ x
  else:
    f32 = np.float32
    x = _bf16(g if wide else np.asarray(g).T)
    norm = _bf16(np.sqrt(np.sum(np.square(x, dtype=f32), dtype=f32)))
    x = _bf16(x / np.maximum(norm, f32(NS_NORM_FLOOR)))
    for _ in range(NS_STEPS):
      gram = _bf16(x @ x.T)
      poly = _bf16(f32(b) * gram + f32(c) * _bf16(gram @ gram))
      x = _bf16(f32(a) * x + _bf16(poly @ x))
  x = x if wide else x.T
  return _f64(x)


def whiten(update: np.ndarray, eps: float, exact: bool = True) -> np.ndarray:
  """The official whitening of an update, in parameter space: a vector is
  divided by ``max(||u||_2, eps)``; a tensor with ``ndim >= 2`` is viewed
  as ``(shape[0], prod(shape[1:]))``, passed through :func:`newton_schulz`
  and reshaped back. A scalar (an extension, see the module docstring) is
  treated as a vector of length 1."""
  u = _f64(update)
  if u.ndim <= 1:
    return u / max(float(np.linalg.norm(u)), eps)
  shape = u.shape
  return newton_schulz(u.reshape(shape[0], -1), exact=exact).reshape(shape)


# ---------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------


def init(params: Any, *, ess: float, hess_init: float, **hyper: Any) -> dict:
  """The state before the first call: the means (a copy of ``params``, a
  dict, a list/tuple or a single array), the step counter 0, a zero
  momentum, the curvature ``h = hess_init`` everywhere (used by the first
  draw), and no Kronecker factors or bases yet (``factors is None``)."""
  hyper = make_hyper(ess, hess_init, **hyper)
  _, leaves, kind = _flatten(params)
  states = []
  for p in leaves:
    mean = _f64(p)
    states.append({
        "mean": mean,
        "step": 0,
        "momentum": np.zeros_like(mean),  # in the rotated basis
        "h": np.full_like(mean, hyper["hess_init"]),
        "factors": None,  # list per mode: matrix or None (identity)
        "bases": None,  # list per mode: orthogonal matrix or None
        "last_update": np.zeros_like(mean),  # change of the mean last call
    })
  return {"hyper": hyper, "kind": kind, "leaves": states}


def params(state: dict) -> Any:
  """The current means, in the structure given to :func:`init`."""
  return _unflatten(state["kind"], [s["mean"].copy() for s in state["leaves"]])


def _sampling(hyper: dict) -> bool:
  return math.isfinite(hyper["ess"])


def _noise_is_zero(leaf: dict, hyper: dict) -> bool:
  """Phasing: a draw made while the counter is even is clean (no noise)."""
  return hyper["phasing"] and leaf["step"] % 2 == 0


def _rotated_noise(leaf: dict, e: np.ndarray, hyper: dict) -> np.ndarray:
  r""":math:`\sigma\odot E`, :math:`\sigma = 1/\sqrt{ess\,(h+\delta)}` (no
  eps), or zeros in a clean phase."""
  if _noise_is_zero(leaf, hyper):
    return np.zeros_like(leaf["h"])
  sigma = 1.0 / np.sqrt(hyper["ess"] * (leaf["h"] + hyper["weight_decay"]))
  return sigma * _f64(e).reshape(leaf["h"].shape)


def offset(state: dict, noise: Any) -> Any:
  r"""The offset :math:`\theta - M` of the draw with standard normals
  ``noise`` (a tree like the params): :math:`Q[\sigma\odot E]`, unrotated
  before the first call (no bases yet); zeros with ``ess = inf``."""
  hyper = state["hyper"]
  _, noises, _ = _flatten(noise)
  out = []
  for leaf, e in zip(state["leaves"], noises):
    if not _sampling(hyper):
      out.append(np.zeros_like(leaf["mean"]))
      continue
    z = _rotated_noise(leaf, e, hyper)
    out.append(z if leaf["bases"] is None else unrotate(z, leaf["bases"],
                                                         hyper))
  return _unflatten(state["kind"], out)


def draw(state: dict, noise: Any) -> Any:
  r"""The weights :math:`\theta = M + Q[\sigma\odot E]` at which the
  gradient of the next :func:`step` is taken."""
  _, offsets, _ = _flatten(offset(state, noise))
  return _unflatten(state["kind"], [leaf["mean"] + o for leaf, o in
                                    zip(state["leaves"], offsets)])


def standard_normal(state: dict, rng: np.random.Generator,
                    mc_samples: int | None = None) -> list:
  """``mc_samples`` trees of standard normals shaped like the params."""
  n = state["hyper"]["mc_samples"] if mc_samples is None else mc_samples
  return [_unflatten(state["kind"], [rng.standard_normal(leaf["mean"].shape)
                                     for leaf in state["leaves"]])
          for _ in range(n)]


def _update_factors(leaf: dict, gbar: np.ndarray, hyper: dict) -> None:
  r""":math:`L_i \leftarrow \beta_s L_i + (1-\beta_s) \bar G_{(i)}\bar
  G_{(i)}^\top` on every mode with a factor (written as a lerp)."""
  g = _to_layout(gbar, hyper)
  rho = 1.0 - hyper["factor_beta"]
  for mode, f in enumerate(leaf["factors"]):
    if f is not None:
      leaf["factors"][mode] = f + rho * (mode_gram(g, mode) - f)


def _price_update(h, nxg, hyper) -> np.ndarray:
  """One step of the positivity-corrected curvature EMA (Price estimate)."""
  wd, eps, ess = hyper["weight_decay"], hyper["eps"], hyper["ess"]
  beta2 = hyper["betas"][1]
  f = nxg * (h + wd) * ess
  r = hyper["price_clip_ratio"]
  if r is not None and r > 0.0:
    limit = r * (h + eps)
    f = np.clip(f, -limit, limit)
  correction = 0.5 * (1.0 - beta2) ** 2 * np.square(h - f) / (h + wd + eps)
  return beta2 * h + (1.0 - beta2) * f + correction


def _step_leaf(leaf: dict, grads: list, noises: list, hyper: dict) -> None:
  exact, signs = hyper["exact"], hyper["signs"]
  beta1, beta2 = hyper["betas"]
  wd, eps = hyper["weight_decay"], hyper["eps"]
  sampling = _sampling(hyper)
  grads = [_f64(g).reshape(leaf["mean"].shape) for g in grads]
  gbar = np.mean(grads, axis=0)  # raw mean gradient (at the draws)
  leaf["last_update"] = np.zeros_like(leaf["mean"])

  # First call: start the factors from this gradient, take the first bases.
  if leaf["factors"] is None:
    shape = leaf["mean"].shape
    leaf["factors"] = [None if n is None else np.zeros((n, n))
                       for n in factor_sizes(shape, hyper)]
    _update_factors(leaf, gbar, hyper)
    leaf["bases"] = [None if f is None else initial_basis(
        f, exact, signs, hyper["null_space"]) for f in leaf["factors"]]
    if hyper["max_precond_dim"] > 0:
      return

  bases = leaf["bases"]
  h = leaf["h"]
  if sampling:
    # Per-sample rotated gradients and the Price numerator, with the bases
    # and the curvature of the draws (this state's).
    rotated = [rotate(g, bases, hyper) for g in grads]
    zs = [_rotated_noise(leaf, e, hyper) for e in noises]
    gproj = np.mean(rotated, axis=0)
    nxg = np.mean([z * r for z, r in zip(zs, rotated)], axis=0)
  else:
    gproj = rotate(gbar, bases, hyper)

  leaf["step"] += 1
  t = leaf["step"]
  clean = hyper["phasing"] and (t % 2 == 1 or not sampling)

  leaf["momentum"] = beta1 * leaf["momentum"] + (1.0 - beta1) * gproj
  if sampling:
    if not clean:
      h = _price_update(h, nxg, hyper)
  else:
    h = beta2 * h + (1.0 - beta2) * np.square(gproj)
  leaf["h"] = h

  debias1 = 1.0 - beta1 ** t if hyper["correct_bias"] else 1.0
  debias2 = (1.0 - beta2 ** t if hyper["correct_bias"]
             and hyper["debias_beta2"] else 1.0)
  step_size = hyper["lr"] / debias2

  mean_rot = rotate(leaf["mean"], bases, hyper)
  direction = (leaf["momentum"] / debias1 + wd * mean_rot) / (h + wd + eps)
  update = unrotate(direction, bases, hyper)
  if hyper["whiten_prec_grad"]:
    update = whiten(update, eps, exact)
  leaf["last_update"] = -step_size * update
  leaf["mean"] = leaf["mean"] - step_size * update

  # Kronecker factors, and every `precondition_frequency` steps the refresh
  # (after the mean update: this step used the old bases).
  freq = hyper["precondition_frequency"]
  refresh = t % freq == 0
  if clean or not hyper["phasing"] or refresh:
    if refresh:
      leaf["momentum"] = unrotate(leaf["momentum"], bases, hyper)
    _update_factors(leaf, gbar, hyper)
    if refresh:
      if hyper["refresh"] == "qr":
        leaf["bases"] = [None if q is None else qr_refresh(
            f, q, exact, signs, hyper["null_space"])
                         for f, q in zip(leaf["factors"], bases)]
      else:  # an extension: a full eigh at every refresh
        leaf["bases"] = [None if q is None else initial_basis(
            f, exact, signs, hyper["null_space"])
                         for f, q in zip(leaf["factors"], bases)]
      leaf["momentum"] = rotate(leaf["momentum"], leaf["bases"], hyper)
      # Official: h is not touched (entry (i, j, ...) keeps its index).
      if hyper["reproject"]:  # an extension
        leaf["h"] = reproject(leaf["h"], bases, leaf["bases"], hyper)


def step(state: dict, grads_at_draws: list, draws_noise: list | None) -> dict:
  """One call of the optimizer; returns the new state (the input is not
  modified).

  Args:
    state: from :func:`init` or a previous :func:`step`.
    grads_at_draws: one gradient tree per MC sample, each taken at
      ``draw(state, draws_noise[s])``. With ``ess = inf`` (deterministic
      mode) the gradients at the mean, averaged.
    draws_noise: the standard-normal trees of those draws (ignored, may be
      None, when ``ess = inf``).

  Returns:
    The new state.
  """
  state = copy.deepcopy(state)
  hyper = state["hyper"]
  grads_at_draws = list(grads_at_draws)
  if not grads_at_draws:
    raise ValueError("need at least one gradient")
  if len(grads_at_draws) != int(hyper["mc_samples"]):
    raise ValueError(f"mc_samples={hyper['mc_samples']} but "
                     f"{len(grads_at_draws)} gradients were given")
  if _sampling(hyper):
    if draws_noise is None or len(draws_noise) != len(grads_at_draws):
      raise ValueError("need one noise tree per gradient")
    noise_leaves = [_flatten(e)[1] for e in draws_noise]
  else:
    noise_leaves = [None] * len(grads_at_draws)
  grad_leaves = [_flatten(g)[1] for g in grads_at_draws]
  for i, leaf in enumerate(state["leaves"]):
    _step_leaf(leaf, [g[i] for g in grad_leaves],
               [None if e is None else e[i] for e in noise_leaves], hyper)
  return state
