r"""Weight-noise generators: values passed to an optimizer, and their states.

A generator is a small frozen value (``NormalNoise()``, ``HashNoise()``,
``FlipNoise(refresh_every)``) that the optimizer keeps in its closure. What a
generator needs between steps lives in the optimizer state as a plain
``NamedTuple`` of arrays (:class:`NormalNoiseState`, :class:`HashNoiseState`,
:class:`FlipNoiseState`), whose ``draw`` method gives the step's standard
normals :math:`\epsilon` from the state alone. So ``blrax.sample_params``
needs no configuration, ``update`` regenerates the very same :math:`\epsilon`,
and states pickle (no classes are made at run time).

The generator's ``advance(state, after)`` gives the state of the next step;
it is the only place that needs the configuration (e.g. ``refresh_every``).

=========  ==========================  =====================================
``noise``  draw per step               what it keeps of the statistics
=========  ==========================  =====================================
normal     threefry normals            everything (the reference)
hash       counter hash + erfinv       exact marginals, no correlations
flip       signs of a stored draw,     exact N(0, I) each step; magnitudes
           1/refresh_every redrawn     shared within a refresh period
=========  ==========================  =====================================

See ``fast_noise.py`` for the hash and flip primitives and their costs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blrax._src import validation
from blrax._src.noise import fast as fast_noise


def canonicalize_key(key: int | jax.Array, name: str = "key") -> jax.Array:
  """Returns a scalar typed PRNG key from an int seed or a (typed/raw) key.

  Accepts an int in ``[0, 2**32)`` (Python, NumPy or a JAX integer scalar), a
  typed key of shape ``()`` (``jax.random.key``) or a legacy raw key
  (``jax.random.PRNGKey``: uint32 of shape ``(2,)``). Larger ints are refused:
  without x64 JAX keeps 32 bits, so ``2**32`` would silently equal ``0``.
  The decision is made on the dtype, not ``isinstance(key, int)``, because
  ``optax.inject_hyperparams`` hands an int ``key`` back as an int32 array.

  Raises:
    ValueError: naming ``name`` for anything else (a batch of keys, a float,
      an out-of-range seed).
  """
  want = (f"`{name}` must be an int seed in [0, 2**32), a PRNG key from "
          "jax.random.key or jax.random.PRNGKey")
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(
      key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"{want}; got a batch of keys of shape {key.shape}.")
    return key
  if isinstance(key, (bool, np.bool_, str, bytes)) or key is None:
    raise validation.ArgumentTypeError(f"{want}, got {name}={key!r}.")
  if isinstance(key, jax.core.Tracer):
    array = key
  else:
    try:
      array = np.asarray(key)
    except (TypeError, ValueError, OverflowError) as error:
      raise validation.ArgumentTypeError(
          f"{want}, got {name}={key!r}.") from error
  if array.dtype == np.uint32 and array.shape == (2,):
    return jax.random.wrap_key_data(jnp.asarray(array))
  if not jnp.issubdtype(array.dtype, jnp.integer) or array.shape != ():
    raise ValueError(f"{want}, got {name}={key!r}.")
  if not isinstance(array, jax.core.Tracer) and not 0 <= int(array) < 2**32:
    raise ValueError(f"{want}, got {name}={key!r} (out of range).")
  if isinstance(array, np.ndarray) and int(array) >= 2**31:
    array = np.uint32(int(array))
  return jax.random.key(array)


def initial_key(key: int | jax.Array, mc_samples: int,
                params: Any = None) -> jax.Array:
  """A scalar key for one sample per step, or ``mc_samples`` keys.

  The shape of the key array is how the state records ``mc_samples``: the
  state then holds arrays only, and ``sample_params`` needs no hyperparameter.
  Given the ``params`` being initialised, warns when they are batched by
  ``jax.vmap`` and the key is not (every member would share the noise).
  """
  if params is not None:
    warn_if_shared_noise(key, params)
  key = canonicalize_key(key)
  return key if mc_samples == 1 else jax.random.split(key, mc_samples)


# How a state's key data records its key implementation: by its trailing
# width. unsafe_rbg keys (4 words, like rbg) get a fifth word, always 0.
KEY_WIDTHS = {"threefry2x32": 2, "rbg": 4, "unsafe_rbg": 5}
_IMPL_OF_WIDTH = {width: impl for impl, width in KEY_WIDTHS.items()}


def key_data(key: jax.Array) -> jax.Array:
  """The uint32 data a state stores for a typed key (or a batch of keys).

  States hold plain arrays, so generic tools (``flax.serialization``,
  ``np.asarray``, ``optax.tree.cast``) work on them; ``wrap_key`` gives
  the typed key back, of the same implementation, where a draw is made.

  Raises:
    ValueError: naming ``key`` if its implementation is not one of
      ``KEY_WIDTHS`` (threefry2x32, rbg, unsafe_rbg).
  """
  impl = str(jax.random.key_impl(key))
  if impl not in KEY_WIDTHS:
    raise ValueError(
        f"`key` must be a PRNG key of implementation {tuple(KEY_WIDTHS)}, got "
        f"key={key!r} of implementation {impl!r}.")
  data = jax.random.key_data(key)
  if impl == "unsafe_rbg":
    data = jnp.concatenate([data, jnp.zeros(data.shape[:-1] + (1,),
                                            data.dtype)], axis=-1)
  return data


def is_typed_key(key: Any) -> bool:
  """Whether ``key`` is a typed PRNG key array (``jax.random.key``) or the
  ``jax.ShapeDtypeStruct`` of one."""
  dtype = getattr(key, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype,
                                                     jax.dtypes.prng_key)


def wrap_key(data: jax.Array) -> jax.Array:
  """The typed key (or keys) of a state's key data (see ``key_data``).

  Typed keys are returned as they are (a state whose keys a user replaced by
  typed keys still draws).

  Raises:
    ValueError: naming ``data`` if its trailing width records no key
      implementation, or its dtype is not uint32.
  """
  if is_typed_key(data):
    return data
  width = data.shape[-1] if data.ndim else None
  if width not in _IMPL_OF_WIDTH or data.dtype != jnp.uint32:
    raise ValueError(
        "`data` must be PRNG key data, uint32 with trailing width in "
        f"{tuple(_IMPL_OF_WIDTH)}, got data of shape {data.shape} dtype "
        f"{data.dtype}.")
  impl = _IMPL_OF_WIDTH[width]
  if impl == "unsafe_rbg":
    data = data[..., :4]
  return jax.random.wrap_key_data(data, impl=impl)


def num_keys(data: jax.Array) -> int:
  """How many keys a state's key data (or typed keys) holds: ``mc_samples``."""
  shape = data.shape if is_typed_key(data) else data.shape[:-1]
  return 1 if len(shape) == 0 else shape[0]


def stored_like(old: jax.Array, key: jax.Array) -> jax.Array:
  """``key`` as the state stored ``old``: key data, or typed if it was."""
  return key if is_typed_key(old) else key_data(key)


# Set by blrax.ensemble_init while it traces its vmapped init: its keys are
# made distinct after init, by folding in the member index.
_FOLDING_IN = [False]


@contextlib.contextmanager
def keys_folded_in_after_init():
  """While active, a vmapped ``init`` with an unbatched key does not warn:
  the caller (:func:`blrax.ensemble_init`) makes the keys distinct after."""
  _FOLDING_IN[0] = True
  try:
    yield
  finally:
    _FOLDING_IN[0] = False

SHARED_NOISE_WARNING = (
    "`init` is vmapped over the params (an ensemble?) but the optimizer's "
    "`key` is not: every member gets the same weight noise. Use "
    "`blrax.ensemble_init(opt, stacked_params)` (member m's keys get m folded "
    "in), or build the optimizer inside the vmap with a batched key, "
    "`jax.vmap(lambda p, k: blrax.ivon(..., key=k).init(p))(params, keys)`. "
    "Shared noise on purpose: filter this warning.")


def _is_vmapped(x: Any) -> bool:
  """Whether ``x`` is batched by ``jax.vmap`` (False if JAX hides it)."""
  try:
    from jax._src.interpreters import batching  # noqa: PLC0415
  except ImportError:  # pragma: no cover - a JAX without the module
    return False
  return isinstance(x, getattr(batching, "BatchTracer", ()))


def warn_if_shared_noise(key: Any, params: Any) -> None:
  """Warns (at trace time, once per trace) when ``params`` are vmapped and
  ``key`` is not; nothing at run time."""
  if _FOLDING_IN[0] or _is_vmapped(key):
    return
  if any(_is_vmapped(x) for x in jax.tree.leaves(params)):
    warnings.warn(SHARED_NOISE_WARNING, UserWarning,
                  stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
  """The ``stacklevel`` of the first caller outside blrax, JAX and optax."""
  import os  # noqa: PLC0415
  import sys  # noqa: PLC0415

  inside = tuple(os.path.dirname(m.__file__) + os.sep
                 for m in (sys.modules["blrax"], jax, optax))
  frame, level = sys._getframe(1), 1  # noqa: SLF001
  while frame is not None and frame.f_code.co_filename.startswith(inside):
    frame, level = frame.f_back, level + 1
  return level


def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(noise key, next key) for a scalar key or a batch of keys."""
  if key.ndim == 0:
    keys = jax.random.split(key)
    return keys[0], keys[1]
  keys = jax.vmap(jax.random.split)(key)
  return keys[:, 0], keys[:, 1]


def standard_normal_like(key: jax.Array, tree: Any) -> Any:
  """:math:`\\epsilon \\sim N(0, I)` like ``tree``; leading axis if key is batched.

  ``optax.MaskedNode`` holes in ``tree`` stay holes (they get no noise).
  """

  def draw(k):
    return optax.tree.random_like(k, tree, jax.random.normal)

  return draw(key) if key.ndim == 0 else jax.vmap(draw)(key)


def _zeros_like_draw(key: jax.Array, like: Any) -> Any:
  # 0 * h rather than zeros: XLA never merges operand-less tuples, and the
  # draw's conditional must be identical in sample_params and update.
  return jax.tree.map(lambda h: jnp.broadcast_to(0.0 * h, key.shape + h.shape),
                      like)


def _keyed_draw(key: jax.Array, like: Any, active: jax.Array,
                normals) -> Any:
  """Standard normals like ``like`` from ``key`` (leading axis if batched).

  Zeros when ``active`` is false (``ess = inf``: a point mass). The
  ``lax.cond`` on that flag also has a cost purpose: its output is
  materialised once, so XLA's CSE shares one draw between ``sample_params``
  and ``update`` instead of fusing (recomputing) the normal transform into
  each consumer. For CSE to merge the two conditionals their operands must be
  identical, so the key is split inside the branch.
  """
  return jax.lax.cond(
      active,
      lambda: normals(split_key(key)[0], like),
      lambda: _zeros_like_draw(key, like))


class NormalNoiseState(NamedTuple):
  """State of :class:`NormalNoise`: the threefry key of the next draw.

  Attributes:
    key: the data (uint32, see ``key_data``) of a PRNG key, or of
      ``mc_samples`` of them.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.ivon(0.1, ess=100.0, mc_samples=4)
    >>> posterior = blrax.find_posteriors(opt.init(jnp.zeros(2)))[0]
    >>> isinstance(posterior.noise_state, blrax.noise.NormalNoiseState)
    True
    >>> posterior.noise_state.key.shape  # one key's data per sample
    (4, 2)
  """

  key: jax.Array

  def draw(self, like: Any, active: jax.Array) -> Any:
    """This step's standard normals like ``like`` (zeros if not active)."""
    return _keyed_draw(wrap_key(self.key), like, active, standard_normal_like)

  def fresh(self, key: jax.Array, like: Any, num_samples: int) -> Any:
    """``num_samples`` independent draws from ``key`` (for model averaging)."""
    return standard_normal_like(jax.random.split(key, num_samples), like)


class HashNoiseState(NamedTuple):
  """State of :class:`HashNoise`: the key its counter hash is seeded by.

  Attributes:
    key: the data (uint32, see ``key_data``) of a PRNG key, or of
      ``mc_samples`` of them (advanced every step).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.ivon(0.1, ess=100.0, noise="hash")
    >>> posterior = blrax.find_posteriors(opt.init(jnp.zeros(2)))[0]
    >>> isinstance(posterior.noise_state, blrax.noise.HashNoiseState)
    True
  """

  key: jax.Array

  def draw(self, like: Any, active: jax.Array) -> Any:
    """This step's standard normals like ``like`` (zeros if not active)."""
    return _keyed_draw(wrap_key(self.key), like, active,
                       fast_noise.hash_normal_like)

  def fresh(self, key: jax.Array, like: Any, num_samples: int) -> Any:
    """``num_samples`` independent draws from ``key`` (for model averaging)."""
    return fast_noise.hash_normal_like(jax.random.split(key, num_samples), like)


class FlipNoiseState(NamedTuple):
  r"""State of :class:`FlipNoise`.

  Attributes:
    key: the data (uint32, see ``key_data``) of a PRNG key, or of
      ``mc_samples`` of them; seeds the signs.
    base_noise: :math:`z`, a stored standard-normal draw like the params.
    refresh_phase: int32 scalar, which slice of :math:`z` the next update
      redraws.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.ivon(0.1, ess=100.0, noise=blrax.noise.flip_noise(8))
    >>> noise_state = blrax.find_posteriors(opt.init(jnp.zeros(2)))[0].noise_state
    >>> isinstance(noise_state, blrax.noise.FlipNoiseState)
    True
    >>> noise_state.base_noise.shape, int(noise_state.refresh_phase)
    ((2,), 0)
  """

  key: jax.Array
  base_noise: Any
  refresh_phase: jax.Array

  def draw(self, like: Any, active: jax.Array) -> Any:
    r""":math:`\epsilon = S \odot z`: Flipout-style signs of the stored draw.

    The small sign vectors come out of a ``lax.cond`` (zeros when not
    ``active``): a conditional's outputs are materialised, so XLA hashes
    once per row and column instead of once per element of each consumer.
    """
    leaves, treedef = jax.tree.flatten(like)
    shapes = [h.shape for h in leaves]
    key = wrap_key(self.key)
    factors = jax.lax.cond(
        active,
        lambda: fast_noise.sign_factors(key, shapes),
        lambda: jax.tree.map(
            jnp.zeros_like,
            jax.eval_shape(lambda k: fast_noise.sign_factors(k, shapes),
                           key)))
    out = []
    for (rows, cols), z, h in zip(factors, jax.tree.leaves(self.base_noise),
                                  leaves):
      # Signs in the draw's dtype: exact sign flips, no float32 detour.
      signs = rows.astype(z.dtype) * cols.astype(z.dtype)
      matrix = signs * z.reshape(fast_noise.matrix_shape(h.shape))
      out.append(matrix.reshape(key.shape + h.shape))
    return jax.tree.unflatten(treedef, out)

  def fresh(self, key: jax.Array, like: Any, num_samples: int) -> Any:
    return standard_normal_like(jax.random.split(key, num_samples), like)


class _KeyedNoise:
  """A generator whose state is its key alone, advanced by a split."""

  state_type: type

  def init(self, key: jax.Array, like: Any):
    del like
    return self.state_type(key_data(key))

  def advance(self, state, after: Any):
    del after
    return state._replace(key=stored_like(
        state.key, split_key(wrap_key(state.key))[1]))


@dataclasses.dataclass(frozen=True)
class NormalNoise(_KeyedNoise):
  """``noise="normal"``: a fresh ``jax.random.normal`` draw every step.

  The default generator; its state is a :class:`NormalNoiseState`.

  Examples:
    >>> import blrax
    >>> opt = blrax.ivon(0.1, ess=100.0, noise=blrax.noise.NormalNoise())
  """

  state_type = NormalNoiseState


@dataclasses.dataclass(frozen=True)
class HashNoise(_KeyedNoise):
  """``noise="hash"``: a fresh draw from a counter hashed by MurmurHash3's
  finaliser, keyed by the state's threefry key.

  Exact normal marginals, about 4x fewer integer operations than threefry
  (see ``blrax/_src/noise/fast.py``); its state is a :class:`HashNoiseState`.

  Examples:
    >>> import blrax
    >>> opt = blrax.ivon(0.1, ess=100.0, noise=blrax.noise.HashNoise())
    >>> blrax.noise.HashNoise() == blrax.noise.HashNoise()  # a plain value
    True
  """

  state_type = HashNoiseState


@dataclasses.dataclass(frozen=True)
class FlipNoise:
  r"""``noise="flip"``: sign flips of a stored draw refreshed slice by slice.

  The step's noise is :math:`\epsilon_t = S_t \odot z`: :math:`z \sim N(0,I)`
  is a stored draw of which a ``1 / refresh_every`` slice of rows is redrawn
  every step, so each element lives at most ``refresh_every`` steps;
  :math:`S_t` are fresh random signs, rank one per leaf as in Flipout. A step
  costs a fused sign flip and ``1 / refresh_every`` of a normal draw.

  What holds: each :math:`\epsilon_t` is exactly :math:`N(0, I)` (given any
  signs, :math:`S_t \odot z` is, since :math:`z` is i.i.d. symmetric and
  independent of them), so the Price estimator is unbiased at every step;
  :math:`\epsilon_t, \epsilon_{t'}` are uncorrelated for :math:`t \ne t'`,
  and independent once :math:`z` was redrawn in between. What does not:
  within a refresh period the draws share the magnitudes :math:`|z|`, so the
  curvature estimate averages over ``refresh_every`` times fewer independent
  draws. Harmless when the curvature EMA is long (IVON's ``b2 = 0.99999``
  spans ~1e5 steps); keep ``refresh_every`` well below :math:`1/(1-b_2)`.
  The state holds one more params-sized array, shaped (and shardable) like
  the params.

  A plain frozen value, so ``optax.inject_hyperparams`` keeps it static.
  Its state is a :class:`FlipNoiseState`.

  Attributes:
    refresh_every: the refresh period :math:`K` (an int >= 1): every step
      redraws :math:`1/K` of the stored draw.

  Examples:
    >>> import blrax
    >>> noise = blrax.noise.FlipNoise(refresh_every=64)
    >>> noise == blrax.noise.flip_noise(64), noise == blrax.noise.FlipNoise()
    (True, False)
    >>> opt = blrax.ivon(0.1, ess=100.0, noise=noise)

  References:
    Wen et al., `Flipout: Efficient Pseudo-Independent Weight Perturbations
    on Mini-Batches <https://arxiv.org/abs/1803.04386>`_, ICLR 2018.
  """

  refresh_every: int = 32

  def __post_init__(self):
    # A NumPy int is accepted and stored as a Python int (hashable, static).
    object.__setattr__(self, "refresh_every", validation.check_integer(
        "refresh_every", self.refresh_every, low=1, high=2**31))

  def init(self, key: jax.Array, like: Any) -> FlipNoiseState:
    first = key if key.ndim == 0 else key[0]
    base = standard_normal_like(jax.random.fold_in(first, 1), like)
    return FlipNoiseState(key=key_data(key), base_noise=base,
                          refresh_phase=jnp.zeros([], jnp.int32))

  def advance(self, state: FlipNoiseState, after: Any) -> FlipNoiseState:
    key = wrap_key(state.key)
    first = key if key.ndim == 0 else key[0]
    base = fast_noise.refresh_slice(first, state.base_noise,
                                    state.refresh_phase, self.refresh_every,
                                    after=after)
    return FlipNoiseState(key=stored_like(state.key, split_key(key)[1]),
                          base_noise=base,
                          refresh_phase=(state.refresh_phase + 1)
                          % self.refresh_every)


def flip_noise(refresh_every: int = 32) -> FlipNoise:
  """``noise=blrax.noise.flip_noise(refresh_every)``: sign-flip noise.

  Cheap weight noise for CPU: random sign flips of a stored normal draw that
  is redrawn slice by slice. See :class:`blrax.noise.FlipNoise` for what its
  statistics keep and lose.

  Args:
    refresh_every: every element of the stored draw is redrawn at least every
      ``refresh_every`` steps (an int >= 1); keep it well below
      ``1 / (1 - b2)``.

  Returns:
    A :class:`blrax.noise.FlipNoise`, for the ``noise=`` argument of any
    diagonal optimizer (``noise="flip"`` is ``flip_noise(32)``).

  Examples:
    >>> import blrax
    >>> opt = blrax.ivon(0.1, ess=1e4, noise=blrax.noise.flip_noise(refresh_every=64))
  """
  return FlipNoise(refresh_every)


GENERATORS = {"normal": NormalNoise(), "hash": HashNoise(), "flip": FlipNoise()}
Generator = NormalNoise | HashNoise | FlipNoise


def generator(noise: str | Generator) -> Generator:
  """The generator value for a factory's ``noise`` argument."""
  if isinstance(noise, (NormalNoise, HashNoise, FlipNoise)):
    return noise
  if isinstance(noise, str) and noise in GENERATORS:  # (a str: hashable)
    return GENERATORS[noise]
  raise ValueError(f"`noise` must be one of {tuple(GENERATORS)} or "
                   f"blrax.noise.flip_noise(...), got noise={noise!r}.")
