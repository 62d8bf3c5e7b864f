r"""Mean gradient and mean per-example squared gradient in one backward pass.

VOGN's curvature target is :math:`\hat h = \mathrm{mean}_i\, g_i^2`, the mean
over the examples of a batch of the squared gradient :math:`g_i` of each
example's loss. A ``jax.vmap`` of ``jax.grad`` over the examples
(:func:`blrax.per_example_grads`) materialises all :math:`B` gradients; for
the layers a network is built from they are not needed:

- a dense layer :math:`y = xW` with example rows :math:`x_i` and output
  cotangents :math:`\delta_i` has :math:`g_i(W) = x_i^\top \delta_i`, so
  :math:`\sum_i g_i(W)^2 = (x^2)^\top \delta^2`: one more matmul;
- a layer that shares its weights within an example (a dense layer on
  sequences ``(B, T, d)``, a convolution, a bias or a scale broadcast over
  positions) gets its per-example gradients from a ``jax.vmap`` of *that
  one operation's* VJP (an einsum over the positions, :math:`B` times the
  layer's params, one layer at a time), squared and summed there.

:func:`value_grads_and_squares` finds these layers in the model itself:
it traces the loss to a jaxpr and follows where the examples are: every
value is computed row by row from the batch (its leading axis indexes the
examples), from params and constants only, or neither (after a transpose
that moves the batch axis, a reduction over it, a ``lax.scan``, an unknown
primitive). A param that reaches exactly one operation, through only
reshapes, transposes and dtype casts, and that operation is a
``dot_general``, ``conv_general_dilated`` or elementwise ``add``/``sub``/
``mul``/``div``/``max``/``min`` with a row-by-row activation (keeping its
leading axis), is probed: the jaxpr is re-run with that operation replaced
by a ``jax.custom_vjp`` version that takes a zero "probe" shaped like the
param, whose cotangent the backward pass sets to :math:`\sum_i g_i^2`. One
``jax.grad`` over (params, probes) returns both the mean gradient and the
squares. Every other param (an embedding table, tied weights, a param used
inside ``lax.scan`` or a custom-derivative function, a regulariser) gets its
squares from a ``jax.vmap`` over the examples of the gradient of the whole
loss with respect to those params only: exact, at the cost of per-example
gradients for those params.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

# Size-preserving single-input ops: a param seen through them is still "the
# param" (its elements permuted, its dtype cast), so squares commute with them.
_VIEWS = frozenset({"convert_element_type", "reshape", "transpose", "squeeze",
                    "expand_dims", "broadcast_in_dim", "copy", "copy_p"})
_ELEMENTWISE = frozenset({"add", "sub", "mul", "div", "max", "min"})
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_REDUCTIONS = ("mean", "sum")

# Where the examples are. Every value is EX (its leading axis indexes the
# examples: a batch input, or computed row by row from one), FREE (computed
# from params and constants only) or unknown (anything else, e.g. after a
# transpose that moves the batch axis, or a reduction over it). A param's
# layer is probed only where its activation is EX.
EX, FREE = "example-axis", "data-free"
_MAP = frozenset({
    "add", "sub", "mul", "div", "max", "min", "pow", "integer_pow", "exp",
    "exp2", "log", "log1p", "expm1", "tanh", "logistic", "neg", "abs", "sign",
    "sqrt", "rsqrt", "cbrt", "square", "sin", "cos", "tan", "asin", "acos",
    "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "atan2", "erf", "erfc",
    "erf_inv", "lgamma", "digamma", "floor", "ceil", "round", "nextafter",
    "rem", "select_n", "clamp", "convert_element_type", "stop_gradient",
    "copy", "copy_p", "eq", "ne", "lt", "gt", "le", "ge", "and", "or", "not",
    "xor", "is_finite", "reduce_precision", "real", "imag", "conj"})
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                     "reduce_and", "reduce_or", "argmax", "argmin"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin",
                         "cumlogsumexp"})


def _rows_kept(eqn, ins) -> bool:
  """Whether output row ``i`` of ``eqn`` is computed from row ``i`` of its
  EX inputs (and any FREE ones) alone, along each output's leading axis."""
  name, params = eqn.primitive.name, eqn.params
  shapes = [_shape(v) for v in eqn.invars]
  out = _shape(eqn.outvars[0])
  ex = [j for j, t in enumerate(ins) if t == EX]
  if not out or any(not shapes[j] or shapes[j][0] != out[0] for j in ex):
    return False
  if name in _MAP:
    return all(len(shapes[j]) == len(out) for j in ex)
  if name == "broadcast_in_dim":
    return params["broadcast_dimensions"][:1] == (0,)
  if name == "reshape":
    return params.get("dimensions") is None
  if name == "transpose":
    return params["permutation"][0] == 0
  if name == "squeeze":
    return 0 not in params["dimensions"]
  if name in _REDUCE:
    return 0 not in params["axes"]
  if name in _CUMULATIVE:
    return params["axis"] != 0
  if name in ("sort", "split", "concatenate"):
    return params.get("dimension", params.get("axis")) != 0
  if name == "top_k":  # along the last axis
    return len(shapes[0]) >= 2
  if name == "slice":
    return (params["start_indices"][0] == 0
            and (params["strides"] is None or params["strides"][0] == 1))
  if name == "pad":
    return ex == [0] and tuple(params["padding_config"][0]) == (0, 0, 0)
  if name == "dot_general":
    (lhs_c, rhs_c), (lhs_b, rhs_b) = params["dimension_numbers"]
    if lhs_b:  # batched matmul over the examples (attention)
      return lhs_b[0] == 0 and 0 in ex and (ins[1] == FREE or rhs_b[0] == 0)
    return ex == [0] and 0 not in lhs_c
  if name == "conv_general_dilated":
    numbers = params["dimension_numbers"]
    return (ex == [0] and numbers.lhs_spec[0] == 0 and numbers.out_spec[0] == 0
            and params["batch_group_count"] == 1)
  if name == "gather":
    numbers = params["dimension_numbers"]
    if 0 in numbers.offset_dims or len(shapes[1]) < 2 or ins[1] != EX:
      return False
    if ins[0] == FREE:  # a lookup table indexed per example
      return True
    pairs = zip(numbers.operand_batching_dims,
                numbers.start_indices_batching_dims)
    return (0, 0) in pairs
  return False


def _example_axes(eqn, ins) -> list:
  """EX/FREE/None (unknown) for each output of a primitive ``eqn``."""
  count = len(eqn.outvars)
  if all(t == FREE for t in ins):
    return [FREE] * count
  if any(t is None for t in ins) or not _rows_kept(eqn, ins):
    return [None] * count
  return [EX] * count


@dataclasses.dataclass(frozen=True)
class _Target:
  """An operation to replace: ``eqn`` uses param leaf ``leaf`` (seen through
  the size-preserving ``chain``) as its input ``position``."""

  eqn: Any
  leaf: int
  position: int
  chain: tuple


def _is_var(v) -> bool:
  return not isinstance(v, jcore.Literal)


def _shape(v) -> tuple:
  return tuple(v.aval.shape)


def _floating(v) -> bool:
  return jnp.issubdtype(v.aval.dtype, jnp.floating)


def _is_view(eqn) -> bool:
  if eqn.primitive.name not in _VIEWS or len(eqn.invars) != 1:
    return False
  return math.prod(_shape(eqn.invars[0])) == math.prod(_shape(eqn.outvars[0]))


def _separable(eqn, position: int, ins: list, batch_size: int) -> bool:
  """Whether ``eqn`` with a param as input ``position`` computes output row
  ``i`` from row ``i`` of its other operand, an activation whose leading
  axis indexes the examples (EX), alone."""
  name, out = eqn.primitive.name, eqn.outvars[0]
  if not _shape(out) or _shape(out)[0] != batch_size or len(eqn.invars) != 2:
    return False
  other = eqn.invars[1 - position]
  if ins[1 - position] != EX or not _floating(other) or not _shape(other) or (
      _shape(other)[0] != batch_size):
    return False
  if name == "dot_general":
    (lhs_c, _), (lhs_b, _) = eqn.params["dimension_numbers"]
    return position == 1 and 0 not in lhs_c and not lhs_b
  if name == "conv_general_dilated":
    numbers = eqn.params["dimension_numbers"]
    return (position == 1 and numbers.lhs_spec[0] == 0
            and numbers.out_spec[0] == 0
            and eqn.params["batch_group_count"] == 1)
  if name in _ELEMENTWISE:
    param = _shape(eqn.invars[position])
    return not param or (len(param) == len(_shape(other)) and param[0] == 1)
  return False


def _inner(eqn):
  """The closed jaxpr called by a call or custom-derivative primitive."""
  params = eqn.params
  inner = next((params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr")
                if k in params), None)
  if inner is None or isinstance(inner, jcore.ClosedJaxpr):
    return inner
  return jcore.ClosedJaxpr(inner, ())


def _analyse(jaxpr, tags_in, ex_in, path, batch_size, uses):
  """Records in ``uses[leaf]`` each use of a param leaf: a ``_Target`` keyed
  by its eqn path, or ``None`` for any other use. ``tags_in[j]`` is ``(leaf,
  chain)`` for an input that is a view of a param leaf, else ``None``;
  ``ex_in[j]`` says where its examples are (EX, FREE or None). Returns the
  tags and example axes of the outputs."""
  tags = {v: t for v, t in zip(jaxpr.invars, tags_in) if t is not None}
  ex = dict(zip(jaxpr.invars, ex_in))
  ex.update((v, FREE) for v in jaxpr.constvars)

  def where(v):
    return ex.get(v) if _is_var(v) else FREE

  for eqn in jaxpr.eqns:
    ins = [tags.get(v) if _is_var(v) else None for v in eqn.invars]
    axes = [where(v) for v in eqn.invars]
    tagged = [j for j, t in enumerate(ins) if t is not None]
    key = path + (id(eqn),)
    name = eqn.primitive.name
    inner = _inner(eqn) if name in _INLINE or name in _CUSTOM else None
    if inner is not None:
      # A custom-derivative call is bound whole: its params are other uses.
      inline = name in _INLINE
      sub_uses = uses if inline else [[] for _ in uses]
      out_tags, out_ex = _analyse(
          inner.jaxpr, ins if inline else [None] * len(ins), axes, key,
          batch_size, sub_uses)
      if inline:
        tags.update((v, t) for v, t in zip(eqn.outvars, out_tags)
                    if t is not None)
      else:
        for j in tagged:
          uses[ins[j][0]].append(None)
      ex.update(zip(eqn.outvars, out_ex))
      continue
    ex.update(zip(eqn.outvars, _example_axes(eqn, axes)))
    if not tagged:
      continue
    if _is_view(eqn):
      leaf, chain = ins[0]
      tags[eqn.outvars[0]] = (leaf, chain + (eqn,))
      continue
    if len(tagged) == 1 and _separable(eqn, tagged[0], axes, batch_size):
      leaf, chain = ins[tagged[0]]
      uses[leaf].append((key, _Target(eqn, leaf, tagged[0], chain)))
      continue
    for j in tagged:
      uses[ins[j][0]].append(None)
  return ([tags.get(v) if _is_var(v) else None for v in jaxpr.outvars],
          [where(v) for v in jaxpr.outvars])


def _bind(eqn, *args, **overrides):
  params = dict(eqn.primitive.get_bind_params(eqn.params), **overrides)
  return eqn.primitive.bind(*args, **params)


def _probed(target: _Target, batch_size: int) -> Callable:
  """``op(others, leaf, probe)``: the target operation on the param
  ``leaf``, whose VJP gives ``probe`` the sum over the examples of the
  squared per-example gradient contributions (leaf-shaped)."""
  eqn, position = target.eqn, target.position

  def view(leaf):
    for e in target.chain:
      leaf = _bind(e, leaf)
    return leaf

  def apply(others, param):
    args = [*others]
    args.insert(position, param)
    return _bind(eqn, *args)

  # A dense layer whose activation has no axis but the examples and the
  # contracted ones: sum_i (x_i^T d_i)^2 = (x^2)^T d^2, one transposed matmul.
  shortcut = False
  if eqn.primitive.name == "dot_general":
    (lhs_c, _), _ = eqn.params["dimension_numbers"]
    shortcut = len(_shape(eqn.invars[0])) == 1 + len(lhs_c)

  def squares(others, leaf, cotangent):
    param = view(leaf)
    if shortcut:
      (x,) = others
      transpose = jax.linear_transpose(lambda w: apply((x * x,), w), param)
      (total,) = transpose(cotangent * cotangent)
    else:
      def one(example_others, example_cotangent):
        _, pullback = jax.vjp(
            lambda w: apply(tuple(o[None] for o in example_others), w),
            param)
        return pullback(example_cotangent[None])[0]

      per_example = jax.vmap(one)(others, cotangent)
      total = jnp.sum(jnp.square(per_example), axis=0)
    # The chain permutes elements and casts: squares map back unchanged.
    (total,) = jax.linear_transpose(view, leaf)(total.astype(param.dtype))
    return total.astype(leaf.dtype)

  @jax.custom_vjp
  def op(others, leaf, probe):
    del probe
    return apply(others, view(leaf))

  def forward(others, leaf, probe):
    del probe
    out, pullback = jax.vjp(lambda o, w: apply(o, view(w)), others, leaf)
    return out, (pullback, others, leaf)

  def backward(residuals, cotangent):
    pullback, others, leaf = residuals
    d_others, d_leaf = pullback(cotangent)
    return d_others, d_leaf, squares(others, leaf, cotangent)

  op.defvjp(forward, backward)
  return op


def _evaluate(jaxpr, consts, args, path, plan, leaves, probes):
  """``jax.core.eval_jaxpr`` with the planned targets probed and calls
  inlined (so that targets inside ``jit`` calls are reached)."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    key = path + (id(eqn),)
    invals = [read(v) for v in eqn.invars]
    inner = _inner(eqn) if eqn.primitive.name in _INLINE else None
    if inner is not None:
      outs = _evaluate(inner.jaxpr, inner.consts, invals, key, plan, leaves,
                       probes)
    elif key in plan:
      target, op = plan[key]
      others = tuple(x for j, x in enumerate(invals) if j != target.position)
      outs = [op(others, leaves[target.leaf], probes[target.leaf])]
    else:
      outs = _bind(eqn, *invals)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _batch_size(batch: tuple) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("value_grads_and_squares needs at least one batch "
                     f"array (leading axis: the examples), got batch={batch!r}.")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        "every batch array needs the same leading (example) axis, got "
        f"shapes {[jnp.shape(x) for x in leaves]}.")
  size = sizes.pop()
  if size == 0:
    raise ValueError(
        "`batch` is empty: value_grads_and_squares needs at least one "
        "example (the mean squared gradient of no examples is undefined), "
        f"got batch shapes {[jnp.shape(x) for x in leaves]}.")
  return size


def _check_reduction(reduction: str) -> str:
  if reduction not in _REDUCTIONS:
    raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got "
                     f"reduction={reduction!r}.")
  return reduction


def squares_plan(fn: Callable[..., Any], params: Any, consts: Any,
                 batch: tuple) -> tuple[Any, Any, dict, list[bool]]:
  """``(jaxpr, out_tree, plan, covered)``: ``fn(params, consts, *batch) ->
  (loss, aux)`` traced, its output structure, the operations to probe keyed
  by eqn path, and for each param leaf whether it gets its squares from the
  probes (else from the vmap fallback)."""
  batch_size = _batch_size(batch)
  leaves, treedef = jax.tree.flatten(params)
  closed, out_shape = jax.make_jaxpr(
      lambda ls, c, b: fn(jax.tree.unflatten(treedef, ls), c, *b),
      return_shape=True)(leaves, consts, batch)
  uses = [[] for _ in leaves]
  tags = [(j, ()) for j in range(len(leaves))]
  num_consts = len(jax.tree.leaves(consts))
  num_batch = len(closed.jaxpr.invars) - len(leaves) - num_consts
  tags += [None] * (num_consts + num_batch)
  axes = [FREE] * (len(leaves) + num_consts) + [EX] * num_batch
  outs, _ = _analyse(closed.jaxpr, tags, axes, (), batch_size, uses)
  for t in outs:  # a param returned as (part of) an output
    if t is not None:
      uses[t[0]].append(None)
  plan, covered = {}, []
  for use in uses:
    ok = len(use) <= 1 and all(u is not None for u in use)
    covered.append(ok)
    if ok and use:
      key, target = use[0]
      plan[key] = (target, _probed(target, batch_size))
  return closed, jax.tree.structure(out_shape), plan, covered


def value_grads_squares_aux(fn: Callable[..., Any], params: Any, consts: Any,
                            batch: tuple, reduction: str = "mean"):
  """The engine of :func:`value_grads_and_squares`: ``fn(params, consts,
  *batch) -> (loss, aux)`` with ``consts`` unbatched. Returns ``(value,
  aux, grads, squares)``."""
  _check_reduction(reduction)
  batch_size = _batch_size(batch)
  closed, out_tree, plan, covered = squares_plan(fn, params, consts, batch)
  leaves, treedef = jax.tree.flatten(params)
  n = len(leaves)

  def run(ls, probes):
    flat = jax.tree.leaves((consts, batch))
    outs = _evaluate(closed.jaxpr, closed.consts, [*ls, *flat], (), plan, ls,
                     probes)
    value, aux = jax.tree.unflatten(out_tree, outs)
    if jnp.shape(value) != ():
      raise ValueError("the loss must be a scalar (the mean or sum over the "
                       f"batch), got shape {jnp.shape(value)}.")
    return value, aux

  probes = [jnp.zeros_like(x) for x in leaves]
  (value, aux), (grads, sums) = jax.value_and_grad(
      run, argnums=(0, 1), has_aux=True)(leaves, probes)
  # Example i's gradient is scale * (its contribution to the batch gradient).
  scale = batch_size if reduction == "mean" else 1
  grads = [g * (scale / batch_size) for g in grads]
  squares = [s * (scale * scale / batch_size) for s in sums]

  fallback = [j for j in range(n) if not covered[j]]
  if fallback:
    def example_loss(part, example):
      ls = list(leaves)
      for j, x in zip(fallback, part):
        ls[j] = x
      one = jax.tree.map(lambda a: a[None], example)
      return fn(jax.tree.unflatten(treedef, ls), consts, *one)[0]

    per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(
        [leaves[j] for j in fallback], batch)
    for j, g in zip(fallback, per_example):
      squares[j] = jnp.mean(jnp.square(g), axis=0)
  return (value, aux, jax.tree.unflatten(treedef, grads),
          jax.tree.unflatten(treedef, squares))


def value_grads_and_squares(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    *batch: Any,
    reduction: str = "mean",
) -> tuple[jax.Array, Any, Any]:
  r"""The loss, the mean gradient and the mean squared per-example gradient.

  For a batch of :math:`B` examples with losses :math:`\ell_i(\theta)` and
  ``loss_fn`` their mean (``reduction="mean"``) or sum (``"sum"``):

  .. math::

    \bar g = \frac1B \sum_i \nabla\ell_i(\theta), \qquad
    \hat h = \frac1B \sum_i \bigl(\nabla\ell_i(\theta)\bigr)^2,

  what :func:`blrax.vogn` needs (``update(grads, state, params,
  hessian=squares)``), in one forward and backward pass of the batch instead
  of :math:`B` (:func:`blrax.per_example_grads`). Dense layers (``x @ w``,
  ``nnx.Linear``) get :math:`\sum_i g_i^2 = (x^2)^\top\delta^2` in one
  matmul; layers that share weights within an example (sequences, convolutions,
  biases, scales) get per-example gradients of that layer alone; any other
  param gets its squares from a ``jax.vmap`` over the examples of the
  gradient of ``loss_fn`` with respect to those params (exact, at the cost
  of per-example gradients for them). See the module docstring of
  ``blrax._src.functions.squared_grads`` for how the layers are found.

  Where the examples go is traced through the model, so a layer whose input
  does not keep them on its leading axis (a time-major RNN, a batch axis
  folded into the tokens) falls back instead of being miscounted. The model
  must treat examples independently (no batch statistics, as for
  per-example gradients). Params must be floating point. Jit the caller:
  each call traces ``loss_fn``. With ``mc_samples = S > 1`` draws,
  ``jax.vmap`` it over the draws of :func:`blrax.sample_params`: ``grads``
  and ``squares`` then carry the leading axis ``S`` that ``update`` takes.

  Args:
    loss_fn: ``loss_fn(params, *batch)``, a scalar: the mean (or sum) of the
      examples' losses, where ``loss_fn(params, *example_batch_of_one)`` is an
      example's loss.
    params: the params, or the draw of :func:`blrax.sample_params`.
    *batch: arrays (or pytrees of arrays) whose leading axis is the batch.
    reduction: ``"mean"`` if ``loss_fn`` averages over the batch,
      ``"sum"`` if it sums.

  Returns:
    ``(value, grads, squares)``: ``loss_fn``'s value, :math:`\bar g` and
    :math:`\hat h`, the last two pytrees like ``params``.

  Raises:
    ValueError: for an unknown ``reduction``, no batch, an empty batch (0
      examples), batch arrays whose leading axes differ, or a non-scalar
      loss.

  Examples:
    >>> import jax, jax.numpy as jnp, blrax
    >>> loss = lambda w, x, y: jnp.mean(0.5 * (x @ w - y) ** 2)
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 0.0])
    >>> value, grads, squares = blrax.value_grads_and_squares(
    ...     loss, jnp.ones(2), x, y)
    >>> print(grads, squares)  # per-example grads [0, 0] and [0, 4]
    [0. 2.] [0. 8.]
    >>> example = lambda w, x, y: loss(w, x[None], y[None])
    >>> g = blrax.per_example_grads(example, jnp.ones(2), x, y)
    >>> print(jnp.mean(g, 0), jnp.mean(g ** 2, 0))
    [0. 2.] [0. 8.]

  References:
    Goodfellow, `Efficient Per-Example Gradient Computations
    <https://arxiv.org/abs/1510.01799>`_, 2015.
    Dangel, Kunstner & Hennig, `BackPACK: Packing more into Backprop
    <https://arxiv.org/abs/1912.10985>`_, ICLR 2020.
    Osawa et al., `Practical Deep Learning with Bayesian Principles
    <https://arxiv.org/abs/1906.02506>`_, NeurIPS 2019.
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got loss_fn={loss_fn!r}.")
  value, _, grads, squares = value_grads_squares_aux(
      lambda p, c, *b: (loss_fn(p, *b), None), params, None, batch, reduction)
  return value, grads, squares
