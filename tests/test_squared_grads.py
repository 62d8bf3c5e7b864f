"""`blrax.value_grads_and_squares`: the mean gradient and the mean squared
per-example gradient in one pass, against the per-example oracle
(``jax.vmap(jax.grad)`` of each example's loss, squared and averaged)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import blrax
from blrax._src.functions import squared_grads
from blrax.flax import nnx_sample, nnx_value_grads_and_squares

B = 5


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def normal(seed, shape):
  """float64 data (made under x64 even at import)."""
  with jax.enable_x64(True):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


@functools.lru_cache(maxsize=None)
def _oracle(loss, num_batch):
  example = lambda p, *e: loss(p, *(a[None] for a in e))
  grad = jax.vmap(jax.grad(example), in_axes=(None,) + (0,) * num_batch)

  @jax.jit
  def run(params, *batch):
    g = grad(params, *batch)
    return (jax.tree.map(lambda a: jnp.mean(a, 0), g),
            jax.tree.map(lambda a: jnp.mean(a * a, 0), g))

  return run


def oracle(loss, params, *batch):
  """(mean_i g_i, mean_i g_i^2) from per-example gradients."""
  return _oracle(loss, len(batch))(params, *batch)


def assert_close(actual, expected, rtol=1e-9):
  """Each leaf within rtol of the leaf's largest magnitude (and not all 0)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    scale = float(jnp.max(jnp.abs(e)))
    assert scale > 0
    np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale)


def covered(loss, params, *batch):
  """Which leaves get their squares without per-example gradients."""
  *_, flags = squared_grads.squares_plan(
      lambda p, c, *b: (loss(p, *b), None), params, None, batch)
  return jax.tree.unflatten(jax.tree.structure(params), flags)


def check(loss, params, *batch, reduction="mean"):
  value, grads, squares = jax.jit(
      lambda p, *b: blrax.value_grads_and_squares(
          loss, p, *b, reduction=reduction))(params, *batch)
  # An example's loss is loss(params, batch of one) for either reduction.
  mean, mean_square = oracle(loss, params, *batch)
  assert_close(grads, mean)
  assert_close(squares, mean_square)
  np.testing.assert_allclose(value, jax.jit(loss)(params, *batch), rtol=1e-12)
  return grads, squares


# --- models ---------------------------------------------------------------

def mlp_loss(params, x, y):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


MLP = [{"w": normal(0, (4, 6)), "b": normal(1, (6,))},
       {"w": normal(2, (6, 3)), "b": normal(3, (3,))}]
X, Y = normal(4, (B, 4)), jnp.arange(B) % 3


def one_layer_loss(p, x, y):
  return mlp_loss([p], x, y)


XH = normal(27, (B, 6))


def seq_loss(p, x, y):
  """Dense weights, a bias and a scale shared over T positions."""
  h = jnp.tanh(x @ p["w1"] + p["b1"]) * p["scale"]      # (B, T, H)
  out = jnp.mean(h, axis=1) @ p["w2"]
  return jnp.mean(jnp.sum((out - y) ** 2, -1))


SEQ = {"w1": normal(5, (4, 6)), "b1": normal(6, (6,)),
       "scale": normal(7, (6,)), "w2": normal(8, (6, 2))}
XS, YS = normal(9, (B, 3, 4)), normal(10, (B, 2))


def conv_loss(p, x, y):
  h = jax.lax.conv_general_dilated(
      x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.relu(h + p["b"])
  logits = jnp.mean(h, axis=(1, 2)) @ p["w"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


CONV = {"k": normal(11, (3, 3, 2, 4)), "b": normal(12, (4,)),
        "w": normal(13, (4, 3))}
XC = normal(14, (B, 5, 5, 2))


def mixed_loss(p, ids, y):
  """An embedding lookup (gather), a weight used twice (tied), a param on
  the left of a matmul, a param inside lax.scan, a regulariser: all need the
  fallback; the dense layer and its bias do not."""
  e = p["emb"][ids]                                      # (B, T, d)
  h = jnp.tanh(e @ p["w"] + p["b"])                      # covered
  h = h @ p["tied"] @ p["tied"].T                        # used twice
  h = jnp.swapaxes(p["left"] @ jnp.swapaxes(h, 1, 2), 1, 2)  # param on the left

  def cell(c, x):
    c = jnp.tanh(c @ p["rec"] + x)
    return c, None

  c, _ = jax.lax.scan(cell, jnp.zeros((ids.shape[0], 3)), jnp.swapaxes(h, 0, 1))
  data = jnp.mean(jnp.sum((c - y) ** 2, -1))
  # w's second use (a regulariser, here weighted 0) sends it to the fallback.
  return data + 0.0 * jnp.sum(p["w"] ** 2) + 0.01 * jnp.sum(p["reg"] ** 2)


MIXED = {"emb": normal(15, (7, 4)), "w": normal(16, (4, 3)),
         "b": normal(17, (3,)), "tied": normal(18, (3, 3)),
         "left": normal(19, (3, 3)), "rec": normal(20, (3, 3)),
         "reg": normal(21, (2,))}
IDS = jnp.array([[1, 2, 3], [3, 3, 0], [6, 5, 4], [0, 1, 0], [2, 2, 2]])


# --- equal to the per-example oracle --------------------------------------

def test_mlp_is_covered_and_exact():
  assert all(jax.tree.leaves(covered(mlp_loss, MLP, X, Y)))
  check(mlp_loss, MLP, X, Y)


def test_sequence_model_with_shared_weights_is_covered_and_exact():
  assert all(jax.tree.leaves(covered(seq_loss, SEQ, XS, YS)))
  check(seq_loss, SEQ, XS, YS)


def test_convolution_is_covered_and_exact():
  assert all(jax.tree.leaves(covered(conv_loss, CONV, XC, Y)))
  check(conv_loss, CONV, XC, Y)


def test_unsupported_uses_fall_back_and_stay_exact():
  flags = covered(mixed_loss, MIXED, IDS, YS[:, :1] + jnp.zeros((B, 3)))
  assert flags == {"emb": False, "w": False, "b": True, "tied": False,
                   "left": False, "rec": False, "reg": False}
  check(mixed_loss, MIXED, IDS, YS[:, :1] + jnp.zeros((B, 3)))


def test_dense_weight_alone_is_covered_in_the_mixed_model():
  # Without the (zero-weight) regulariser on w, w is a plain dense layer.
  def loss(p, ids, y):
    h = jnp.tanh(p["emb"][ids] @ p["w"] + p["b"])
    return jnp.mean(jnp.sum((jnp.mean(h, 1) - y) ** 2, -1))

  params = {k: MIXED[k] for k in ("emb", "w", "b")}
  y = normal(22, (B, 3))
  assert covered(loss, params, IDS, y) == {"emb": False, "w": True, "b": True}
  check(loss, params, IDS, y)


def test_a_param_with_the_batch_size_as_leading_axis_falls_back():
  # pos (B, H) is added row by row (row i to example i): not one param
  # broadcast over the examples, so it must not be probed as a bias.
  def loss(p, x, y):
    h = jnp.tanh(x @ p["w"] + p["pos"])
    return jnp.mean(jnp.sum((h - y) ** 2, -1))

  params = {"w": normal(25, (4, 2)), "pos": normal(26, (B, 2))}
  assert covered(loss, params, X, YS) == {"w": True, "pos": False}
  # (Such a model has no per-example loss to compare with: a batch of one
  # broadcasts pos over itself. The mean gradient is still the batch's.)
  _, grads, _ = jax.jit(lambda p, x, y: blrax.value_grads_and_squares(
      loss, p, x, y))(params, X, YS)
  assert_close(grads, jax.jit(jax.grad(loss))(params, X, YS), rtol=1e-12)


def test_tokens_flattened_into_the_batch_axis_fall_back():
  # (B, T, d) -> (B*T, d): the dense layer's leading axis is no longer the
  # examples, so its params must not take the shortcut. (Folded back to
  # (B, T*H), the examples are not traced again: w2 falls back too.)
  def loss(p, x, y):
    h = jnp.tanh(x.reshape(-1, 4) @ p["w1"] + p["b1"]).reshape(x.shape[0], -1)
    return jnp.mean(jnp.sum((h @ p["w2"] - y) ** 2, -1))

  params = {"w1": SEQ["w1"], "b1": SEQ["b1"], "w2": normal(23, (18, 2))}
  assert covered(loss, params, XS, YS) == {"w1": False, "b1": False,
                                           "w2": False}
  check(loss, params, XS, YS)


def test_a_moved_batch_axis_falls_back_even_when_sizes_coincide():
  # Time-major (T, B, d) with T == B: the leading axis of the dense layer's
  # input has the batch size but indexes time steps; only a tracked batch
  # axis (not a shape test) sends w1 and b1 to the fallback.
  def loss(p, x, y):
    h = jnp.tanh(jnp.swapaxes(x, 0, 1) @ p["w1"] + p["b1"])   # (T, B, H)
    return jnp.mean(jnp.sum((jnp.mean(h, 0) @ p["w2"] - y) ** 2, -1))

  params = {k: SEQ[k] for k in ("w1", "b1", "w2")}
  x = normal(24, (B, B, 4))
  assert covered(loss, params, x, YS) == {"w1": False, "b1": False,
                                          "w2": False}
  check(loss, params, x, YS)


def test_sum_reduction_gives_the_same_per_example_quantities():
  # An example's loss is the same either way; the squares scale differs.
  check(lambda p, x, y: mlp_loss(p, x, y) * x.shape[0], MLP, X, Y,
        reduction="sum")
  # The fallback path too: an embedding lookup, summed over the batch.
  def loss(p, ids, y):
    return jnp.sum((p["emb"][ids].sum(1) @ p["w"] - y) ** 2)

  params = {k: MIXED[k] for k in ("emb", "w")}
  assert covered(loss, params, IDS, YS[:, :1]) == {"emb": False, "w": True}
  check(loss, params, IDS, YS[:, :1], reduction="sum")


def test_eager_equals_jit():
  loss = lambda p, x, y: jnp.mean((jnp.tanh(x @ p["w1"]) * p["scale"]) ** 2)
  params = {k: SEQ[k] for k in ("w1", "scale")}
  eager = blrax.value_grads_and_squares(loss, params, XS, YS)
  jitted = jax.jit(lambda p, x, y: blrax.value_grads_and_squares(
      loss, p, x, y))(params, XS, YS)
  assert_close(eager[1:], jitted[1:], rtol=1e-12)


def test_batch_pytrees_and_draw_vmap():
  # Batch args may be pytrees; several draws: vmap the helper.
  def loss(p, batch):
    return one_layer_loss(p, batch["x"], batch["y"])

  draws = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), MLP[-1])
  _, grads, squares = jax.jit(jax.vmap(
      lambda p: blrax.value_grads_and_squares(loss, p, {"x": XH, "y": Y})))(
          draws)
  for s in range(2):
    theta = jax.tree.map(lambda a, s=s: a[s], draws)
    mean, mean_square = oracle(one_layer_loss, theta, XH, Y)
    assert_close(jax.tree.map(lambda a, s=s: a[s], grads), mean)
    assert_close(jax.tree.map(lambda a, s=s: a[s], squares), mean_square)


def test_bad_inputs_raise_value_error():
  with pytest.raises(ValueError, match="reduction='avg'"):
    blrax.value_grads_and_squares(mlp_loss, MLP, X, Y, reduction="avg")
  with pytest.raises(ValueError, match="leading"):
    blrax.value_grads_and_squares(mlp_loss, MLP, X, Y[:3])
  with pytest.raises(ValueError, match="batch"):
    blrax.value_grads_and_squares(lambda p: jnp.sum(p[0]["w"]), MLP)
  with pytest.raises(ValueError, match="scalar"):
    blrax.value_grads_and_squares(lambda p, x: x @ p[0]["w"], MLP, X)
  with pytest.raises(TypeError, match="callable"):
    blrax.value_grads_and_squares(None, MLP, X)


# --- VOGN -----------------------------------------------------------------

def test_vogn_step_with_squares_equals_step_with_per_example_grads():
  with jax.enable_x64(False):
    params = jax.tree.map(lambda a: a.astype(jnp.float32), SEQ)
    xs, ys = XS.astype(jnp.float32), YS.astype(jnp.float32)
    opt = blrax.vogn(0.1, ess=50.0, hess_init=0.3, b2=0.5, key=1)
    state = opt.init(params)

    @jax.jit
    def both(params, state):
      theta = blrax.sample_params(params, state)
      example = lambda p, x, y: seq_loss(p, x[None], y[None])
      per_example = blrax.per_example_grads(example, theta, xs, ys)
      a = opt.update(per_example, state, params)
      _, grads, squares = blrax.value_grads_and_squares(seq_loss, theta, xs, ys)
      b = opt.update(grads, state, params, hessian=squares)
      return a, b

    (ua, sa), (ub, sb) = both(params, state)
    for a, b in zip(jax.tree.leaves((ua, sa)), jax.tree.leaves((ub, sb))):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      # float32 sums in two orders: a few ulps of the leaf's largest entry
      # (an entry that cancels, 3e-4 in a leaf of 1e-2, moves by 2e-9
      # under XLA's unoptimised CPU pipeline).
      np.testing.assert_allclose(
          a, b, rtol=2e-6, atol=1e-6 * float(np.max(np.abs(b), initial=0)))
    # The curvature moved halfway to h_hat (b2 = 0.5): the squares count.
    (posterior,) = blrax.find_posteriors(sb)
    assert not np.allclose(posterior.curvature["w1"], 0.3)


# --- Flax NNX -------------------------------------------------------------

class Net(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 3, kernel_size=(3, 3), rngs=rngs)
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.out = nnx.Linear(4, 3, rngs=rngs)
    self.calls = nnx.Variable(jnp.array(0))

  def __call__(self, x):
    self.calls[...] += 1
    h = nnx.relu(self.conv(x)).mean(axis=(1, 2))
    return self.out(nnx.relu(self.linear(h)))


def nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_linear_and_conv_at_the_draw():
  with jax.enable_x64(False):
    model = Net(nnx.Rngs(0))
    x, y = XC.astype(jnp.float32), Y
    optimizer = nnx.Optimizer(model, blrax.vogn(0.1, ess=50.0, key=2),
                              wrt=nnx.Param)
    mean_before = nnx.as_pure(nnx.state(model, nnx.Param))
    graphdef, theta, rest = nnx.split(nnx_sample(model, optimizer), nnx.Param,
                                      ...)
    rest = nnx.as_pure(rest)
    pure_loss = lambda p, x, y: nnx_loss(nnx.merge(graphdef, p, rest), x, y)
    assert all(jax.tree.leaves(covered(pure_loss, nnx.as_pure(theta), x, y)))

    @nnx.jit
    def step(model, optimizer, x, y):
      loss, grads, squares = nnx_value_grads_and_squares(
          nnx_loss, model, optimizer, x, y)
      calls = model.calls[...]  # the forward's state written back
      mean = nnx.as_pure(nnx.state(model, nnx.Param))  # still the mean
      return grads, squares, calls, mean

    grads, squares, calls, mean_after = step(model, optimizer, x, y)
    assert isinstance(grads["linear"]["kernel"], nnx.Param)
    assert int(calls) == 1
    for a, b in zip(jax.tree.leaves(mean_after), jax.tree.leaves(mean_before)):
      np.testing.assert_array_equal(a, b)
    mean, mean_square = oracle(pure_loss, nnx.as_pure(theta), x, y)
    assert_close(nnx.as_pure(grads), mean, rtol=2e-6)
    assert_close(nnx.as_pure(squares), mean_square, rtol=2e-6)
