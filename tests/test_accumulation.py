"""blrax.MultiSteps: k micro-batches, each at its own draw, equal one step with
mc_samples = k in which sample i sees micro-batch i.

The oracle is the library's own multi-sample step (itself checked against the
reference IVON step in test_ivon_reference.py), given the very draws the
micro-batches used: the k keys the accumulation drew from are stacked into
the mc_samples=k state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

K = 3
PARAMS = {"w": jnp.array([[0.3, -0.2], [0.1, 0.5]]), "b": jnp.array([0.2, -0.4])}
X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.3]])  # one row a micro-batch
Y = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]])


def loss(params, x, y):
  pred = jnp.tanh(x @ params["w"] + params["b"])
  return 0.5 * jnp.sum((pred - y) ** 2)


def _posterior(state):
  return blrax.find_posteriors(state)[0]


def _set_keys(state, keys):
  """The mc_samples=k state with its k keys replaced by ``keys``."""
  kinds = (blrax.DiagonalGaussian, blrax.EigenbasisGaussian)

  def swap(x):
    if isinstance(x, kinds):
      return x._replace(noise_state=x.noise_state._replace(key=keys))
    return x
  return jax.tree.map(swap, state, is_leaf=lambda x: isinstance(x, kinds))


def _accumulate(opt, grad_fn, params, micro=K, inner_mc=1, **extra):
  """Runs ``micro`` micro-batches through ``opt``; returns the updates of the
  last one, the state, the keys each micro-batch drew with and the draws."""
  state = opt.init(params)
  keys, draws = [], []
  updates = None
  update = jax.jit(opt.update)
  for i in range(micro):
    keys.append(_posterior(state).noise_state.key)
    theta = _draw(params, state)
    draws.append(theta)
    grads = grad_fn(theta, X[i % len(X)], Y[i % len(Y)], inner_mc)
    updates, state = update(grads, state, params, **extra)
    if i < micro - 1:
      assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  return updates, state, keys, draws


_draw = jax.jit(blrax.sample_params)


def _plain_grads(theta, x, y, mc):
  g = jax.grad(loss)
  return jax.vmap(g, in_axes=(0, None, None))(theta, x, y) if mc > 1 else g(
      theta, x, y)


def _stacked_grads(thetas, mc=1):
  """Grads for the mc_samples=K step: sample i at micro-batch i."""
  if mc == 1:
    per = [jax.grad(loss)(t, X[i], Y[i]) for i, t in enumerate(thetas)]
  else:
    per = [jax.vmap(jax.grad(loss), in_axes=(0, None, None))(t, X[i], Y[i])
           for i, t in enumerate(thetas)]
  return jax.tree.map(lambda *g: jnp.concatenate(
      [x[None] if mc == 1 else x for x in g]), *per)


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("make", [
    lambda mc: blrax.ivon(0.05, ess=200.0, hess_init=0.5, mc_samples=mc),
    lambda mc: blrax.von(0.05, ess=200.0, hess_init=0.5, mc_samples=mc),
    lambda mc: blrax.ivon(0.05, ess=200.0, hess_init=0.5, mc_samples=mc,
                          noise="hash"),
    lambda mc: blrax.evon(0.05, ess=200.0, hess_init=0.5, mc_samples=mc,
                          precondition_1d=True, precondition_frequency=2),
], ids=["ivon", "von_diag", "ivon_hash", "evon"])
def test_equals_mc_samples_k_in_one_step(make):
  """Two updates (for EVON the second draws in the eigenbasis of the first)."""
  multi = blrax.MultiSteps(make(1), every_k_schedule=K)
  single = make(K)
  params, ref_params = PARAMS, PARAMS
  ref_state = single.init(PARAMS)
  state = multi.init(PARAMS)
  multi_update, single_update = jax.jit(multi.update), jax.jit(single.update)
  for _ in range(2):
    keys, draws = [], []
    for i in range(K):
      keys.append(_posterior(state).noise_state.key)
      theta = _draw(params, state)
      draws.append(theta)
      updates, state = multi_update(_plain_grads(theta, X[i], Y[i], 1), state,
                                    params)
      if i < K - 1:
        assert all(np.all(np.asarray(u) == 0)
                   for u in jax.tree.leaves(updates))
    params = optax.apply_updates(params, updates)
    ref_state = _set_keys(ref_state, jnp.stack(keys))
    # The draws are the mc_samples=K draws, sample i = micro-batch i.
    ref_draws = _draw(ref_params, ref_state)
    _assert_trees_close(ref_draws,
                        jax.tree.map(lambda *t: jnp.stack(t), *draws))
    ref_updates, ref_state = single_update(_stacked_grads(draws), ref_state,
                                           ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    _assert_trees_close(updates, ref_updates)
    _assert_trees_close(_posterior(state).curvature,
                        _posterior(ref_state).curvature)
  _assert_trees_close(params, ref_params)
  # And the update is not the one-draw update (the statistic was averaged).
  one = make(1)
  s1 = one.init(PARAMS)
  u1, _ = one.update(jax.grad(loss)(draws[-1], X[K - 1], Y[K - 1]), s1, PARAMS)
  assert not np.allclose(np.asarray(u1["w"]), np.asarray(updates["w"]))


def test_inner_mc_samples_are_kept():
  """Inner mc_samples=2 with k=2 equals mc_samples=4 in one step: the limit
  of optax.MultiSteps (one draw for every micro-batch) is lifted."""
  make = lambda mc: blrax.ivon(0.05, ess=200.0, hess_init=0.5, mc_samples=mc)
  updates, state, keys, draws = _accumulate(
      blrax.MultiSteps(make(2), every_k_schedule=2), _plain_grads, PARAMS,
      micro=2, inner_mc=2)
  single = make(4)
  ref_state = _set_keys(single.init(PARAMS), jnp.concatenate(keys))
  ref_updates, _ = single.update(_stacked_grads(draws, mc=2), ref_state,
                                 PARAMS)
  _assert_trees_close(updates, ref_updates)


def test_vogn_per_example_and_hessian_and_vadam():
  """The other estimators' statistics: VOGN's mean squared per-example
  gradient, a given hessian=, Vadam's mean gradient."""
  ex_loss = lambda p, x, y: loss(p, x[None], y[None])

  def vogn_grads(theta, x, y, mc):
    return blrax.per_example_grads(ex_loss, theta, x[None], y[None])

  make = lambda mc: blrax.vogn(0.05, ess=200.0, hess_init=0.5, mc_samples=mc)
  updates, _, keys, draws = _accumulate(
      blrax.MultiSteps(make(1), every_k_schedule=K), vogn_grads, PARAMS)
  single = make(K)
  ref_state = _set_keys(single.init(PARAMS), jnp.stack(keys))
  grads = jax.tree.map(lambda g: g[:, None], _stacked_grads(draws))
  ref_updates, _ = single.update(grads, ref_state, PARAMS)
  _assert_trees_close(updates, ref_updates)

  hess = jax.tree.map(lambda p: jnp.full(p.shape, 2.0), PARAMS)
  make = lambda mc: blrax.von(0.05, ess=200.0, hess_init=0.5, mc_samples=mc)
  opt = blrax.MultiSteps(make(1), every_k_schedule=2)
  state = opt.init(PARAMS)
  keys, draws = [], []
  for i, scale in enumerate((1.0, 3.0)):
    keys.append(_posterior(state).noise_state.key)
    theta = blrax.sample_params(PARAMS, state)
    draws.append(theta)
    updates, state = opt.update(
        jax.grad(loss)(theta, X[i], Y[i]), state, PARAMS,
        hessian=jax.tree.map(lambda h, s=scale: s * h, hess))
  single = make(2)
  ref_state = _set_keys(single.init(PARAMS), jnp.stack(keys))
  ref_updates, ref_state = single.update(
      _stacked_grads(draws[:2]), ref_state, PARAMS,
      hessian=jax.tree.map(lambda h: jnp.stack([h, 3.0 * h]), hess))
  _assert_trees_close(updates, ref_updates)
  # mean hessian 4 -> h = (1 - rho) 0.5 + rho 4 with rho = 1 - 0.9999
  np.testing.assert_allclose(_posterior(state).curvature["b"],
                             0.9999 * 0.5 + 1e-4 * 4.0, rtol=1e-6)

  make = lambda mc: blrax.vadam(0.05, ess=200.0, mc_samples=mc)
  updates, _, keys, draws = _accumulate(
      blrax.MultiSteps(make(1), every_k_schedule=K), _plain_grads, PARAMS)
  single = make(K)
  ref_state = _set_keys(single.init(PARAMS), jnp.stack(keys))
  ref_updates, _ = single.update(_stacked_grads(draws), ref_state, PARAMS)
  _assert_trees_close(updates, ref_updates)


def test_chain_schedule_counts_steps_and_draws_are_fresh():
  """Clipping sees each micro-batch, the lr schedule counts emitted steps,
  and every micro-batch draws anew."""
  schedule = optax.linear_schedule(0.1, 0.0, transition_steps=4)
  opt = blrax.MultiSteps(
      optax.chain(optax.clip_by_global_norm(1.0),
                  blrax.ivon(schedule, ess=50.0, hess_init=0.5)),
      every_k_schedule=2)
  state = opt.init(PARAMS)
  step = jax.jit(lambda p, s, x, y: opt.update(
      jax.grad(loss)(blrax.sample_params(p, s), x, y), s, p))
  draws = []
  params = PARAMS
  for i in range(6):
    draws.append(blrax.sample_params(params, state)["b"])
    updates, state = step(params, state, X[i % 3], Y[i % 3])
    params = optax.apply_updates(params, updates)
  assert int(state.gradient_step) == 3 and int(state.mini_step) == 0
  # The schedule's count is in the lr's state: 3 steps, not 6 micro-batches.
  counts = [x for x in jax.tree.leaves(state.inner_state)
            if getattr(x, "dtype", None) == jnp.int32 and x.ndim == 0]
  assert 3 in [int(c) for c in counts] and 6 not in [int(c) for c in counts]
  assert len({tuple(np.asarray(d).round(6)) for d in draws}) == 6
  assert _posterior(state).stddev()["b"].shape == (2,)


def test_memory_one_more_buffer_than_optax():
  def params_sized(tree):  # floats held in the state
    return sum(x.size for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.floating))
  opt = blrax.ivon(0.1, ess=10.0)
  ours = params_sized(blrax.MultiSteps(opt, every_k_schedule=8).init(PARAMS))
  theirs = params_sized(optax.MultiSteps(opt, every_k_schedule=8).init(PARAMS))
  size = sum(x.size for x in jax.tree.leaves(PARAMS))
  assert ours == theirs + size


def test_refuses_what_it_cannot_accumulate():
  with pytest.raises(ValueError, match="every_k_schedule"):
    blrax.MultiSteps(blrax.ivon(0.1, ess=10.0), every_k_schedule=0)
  with pytest.raises(ValueError, match="every_k_schedule=2147483648"):
    blrax.MultiSteps(blrax.ivon(0.1, ess=10.0), every_k_schedule=2**31)
  with pytest.raises(ValueError, match="no blrax posterior"):
    blrax.MultiSteps(optax.adam(0.1), every_k_schedule=2).init(jnp.zeros(2))
  opt = blrax.ivon(0.1, ess=10.0)
  with pytest.raises(ValueError, match="MultiSteps"):
    opt.update(jnp.zeros(2), opt.init(jnp.zeros(2)), jnp.zeros(2),
               blrax_accumulate=True)
