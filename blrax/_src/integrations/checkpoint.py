"""Checkpoints of the whole posterior, through orbax.

``save_checkpoint``/``restore_checkpoint`` round-trip params and the whole
optimizer state (PRNG key, noise state and step count included), so a resumed
run is bitwise identical to an uninterrupted one. orbax is an optional
dependency (``pip install 'blrax[checkpoint]'``), imported on first use.

Next to orbax's files, ``save_checkpoint`` writes ``blrax_tree.json``: the
saved tree described node by node (each node's type name, such as
``ScaleByBLRState``, ``DiagonalGaussian`` or ``NormalNoiseState``; each
leaf's shape and dtype; PRNG keys are kept as uint32 key data, older
checkpoints' typed keys are recorded as ``key<impl>``), the posteriors it
holds, and optional user metadata. ``restore_checkpoint`` compares the
template with it before reading any array, so a checkpoint never restores
silently into the state of a different optimizer configuration.

What the record cannot tell apart: states of identical structure. IVON,
Vadam and VOGN (with the same noise generator, ``mc_samples`` and params)
all keep a ``ScaleByBLRState`` with momentum and a ``DiagonalGaussian``;
their hyperparameters outside the state (learning rate, ``b1``, ``b2``,
``hess_init``, the flip-noise period, ...) live in the optimizer's closure,
not in the checkpoint. Pass ``metadata={"optimizer": "ivon", ...}`` to both
calls to have such differences checked too.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src import base
from blrax._src.noise import generators as noise_lib

RECORD = "blrax_tree.json"
_FORMAT = 1
_SHOWN = 6  # differences listed in an error message


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError as error:
    raise ImportError(
        "blrax checkpoints need orbax: pip install 'blrax[checkpoint]' "
        "(or orbax-checkpoint).") from error
  return ocp


def _drop_empty(tree: Any) -> Any:
  """Zero-size leaves (the full Gaussian's shape template) become None:
  orbax refuses to save zero-size arrays, and they hold no data."""
  return jax.tree.map(lambda x: None if getattr(x, "size", 1) == 0 else x, tree)


def _leaf(x: Any) -> list[Any]:
  """``[shape, dtype]`` of an array-like leaf, as JSON."""
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  try:
    shape = np.shape(x) if shape is None else shape
    dtype = jnp.result_type(x) if dtype is None else dtype
  except TypeError:  # not an array: record its type only
    return [[], type(x).__name__]
  if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    dtype = jax.dtypes.canonicalize_dtype(dtype)
  return [[int(d) for d in shape], str(dtype)]


def _posterior(node: Any, path: str, owner: str) -> dict[str, Any]:
  key = getattr(node, "key", None)
  noise = getattr(node, "noise_state", None)
  return {"path": path, "type": type(node).__name__, "owner": owner,
          "noise": None if noise is None else type(noise).__name__,
          # typed keys (older states) or their uint32 data
          "mc_samples": None if key is None else int(noise_lib.num_keys(key))}


# Typed-key dtypes as older blrax saved them, and their implementations.
_TYPED_KEYS = {"key<fry>": "threefry2x32", "key<rbg>": "rbg",
               "key<urbg>": "unsafe_rbg"}


def _typed_key_entries(record: dict[str, Any], template: dict[str, Any]
                       ) -> dict[str, str]:
  """``{path: implementation}`` of the saved typed keys the template holds
  as uint32 (key data).

  States kept typed PRNG keys before blrax kept their uint32 data
  (``blrax.noise.key_data``); such a checkpoint restores into today's state,
  its keys converted to key data.
  """
  return {path: _TYPED_KEYS[entry[1]]
          for path, entry in record["entries"].items()
          if isinstance(entry, list) and len(entry) == 2
          and entry[1] in _TYPED_KEYS
          and isinstance(template["entries"].get(path), list)
          and template["entries"][path][1] == "uint32"}


def _as_key_data(record: dict[str, Any], typed: dict[str, str]
                 ) -> dict[str, Any]:
  """``record`` with each typed key's entry that of its key data."""
  entries = dict(record["entries"])
  for path, impl in typed.items():
    shape = entries[path][0]
    entries[path] = [[*shape, noise_lib.KEY_WIDTHS[impl]], "uint32"]
  return {**record, "entries": entries}


def _stored_shape_differences(ocp: Any, directory: str, target: Any
                              ) -> list[str]:
  """``path: saved shape ..., template has ...`` for each leaf whose stored
  shape (orbax's metadata) is not the target's; [] if that cannot be told."""
  try:
    metadata = ocp.StandardCheckpointer().metadata(directory)
    stored = {getattr(m, "name", None): tuple(m.shape) for m in
              jax.tree.leaves(getattr(metadata, "item_metadata", metadata))}
  except Exception:  # noqa: BLE001 - only an error message is at stake
    return []

  def name(path):
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(
        k, "name", k)))) for k in path)

  return [f"{path[0].key}{jax.tree_util.keystr(path[1:])}: saved shape "
          f"{stored[name(path)]}, template has {t.shape}"
          for path, t in jax.tree_util.tree_flatten_with_path(target)[0]
          if name(path) in stored and stored[name(path)] != tuple(t.shape)]


def _typed_target(target: Any, typed: dict[str, str]) -> Any:
  """The orbax target with a typed key where the checkpoint holds one."""

  def leaf(path, t):
    impl = typed.get(f"{path[0].key}{jax.tree_util.keystr(path[1:])}")
    if impl is None:
      return t
    shape = t.shape[:-1] + ((4,) if impl == "unsafe_rbg" else t.shape[-1:])
    return jax.eval_shape(lambda: jax.random.wrap_key_data(
        jnp.zeros(shape, jnp.uint32), impl=impl))

  return jax.tree_util.tree_map_with_path(leaf, target)


def _describe(trees: Mapping[str, Any]) -> dict[str, Any]:
  """The record of ``{"params": ..., "opt_state": ...}``.

  ``entries`` maps each node's path (``opt_state[0].posterior``) to its type
  name and each leaf's path to ``[shape, dtype]``, in tree order.
  """
  entries: dict[str, Any] = {}
  posteriors: list[dict[str, Any]] = []

  def walk(node, path, owner):
    children, treedef = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda x: x is not node)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
      entries[path] = _leaf(node)
      return
    entries[path] = type(node).__name__
    if base.is_posterior(node):
      posteriors.append(_posterior(node, path, owner))
    for key_path, child in children:
      walk(child, path + jax.tree_util.keystr(key_path), type(node).__name__)

  for name, tree in trees.items():
    walk(tree, name, "")
  return {"entries": entries, "posteriors": posteriors,
          "treedefs": {name: str(jax.tree.structure(tree))
                       for name, tree in trees.items()}}


def _json_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
  if metadata is None:
    return {}
  if not isinstance(metadata, Mapping):
    raise TypeError(f"`metadata` must be a mapping, got {type(metadata)}.")
  try:
    return json.loads(json.dumps(dict(metadata)))
  except (TypeError, ValueError) as error:
    raise TypeError(f"`metadata` must be JSON-serialisable: {error}") from error


def _show(entry: Any) -> str:
  if entry is None:
    return "nothing"
  if isinstance(entry, str):
    return f"node {entry}"
  shape, dtype = entry
  return f"shape {tuple(shape)} dtype {dtype}"


def _under(path: str, prefixes: list[str]) -> bool:
  return any(path.startswith(p) and path[len(p):len(p) + 1] in (".", "[")
             for p in prefixes)


def _show_posteriors(posteriors: list[dict[str, Any]]) -> str:
  if not posteriors:
    return "no blrax posterior"
  parts = []
  for p in posteriors:
    noise = f", {p['noise']}" if p["noise"] else ""
    parts.append(f"a {p['type']} posterior of optimizer type {p['owner']} at "
                 f"{p['path']} (mc_samples={p['mc_samples']}{noise})")
  return ", ".join(parts)


def _differences(saved: dict[str, Any], template: dict[str, Any],
                 expected_metadata: dict[str, Any]) -> list[str]:
  """What differs between the saved record and the template's, in tree order.

  Below a node whose type differs (or that only one side has) nothing more is
  listed: its children differ as a consequence.
  """
  diffs = []
  saved_metadata = saved.get("metadata", {})
  for name, want in expected_metadata.items():
    if name not in saved_metadata:
      diffs.append(f"metadata[{name!r}]: the checkpoint has none, "
                   f"expected {want!r}")
    elif saved_metadata[name] != want:
      diffs.append(f"metadata[{name!r}]: saved {saved_metadata[name]!r}, "
                   f"expected {want!r}")
  if saved["posteriors"] != template["posteriors"]:
    diffs.append(f"saved with {_show_posteriors(saved['posteriors'])}; the "
                 f"template has {_show_posteriors(template['posteriors'])}")
  s_entries, t_entries = saved["entries"], template["entries"]
  stop: list[str] = []
  for path in [*t_entries, *(p for p in s_entries if p not in t_entries)]:
    s, t = s_entries.get(path), t_entries.get(path)
    if s == t or _under(path, stop):
      continue
    diffs.append(f"{path}: saved {_show(s)}, template has {_show(t)}")
    if isinstance(s, str) or isinstance(t, str):
      stop.append(path)
  if not diffs and saved["treedefs"] != template["treedefs"]:
    for name, treedef in template["treedefs"].items():
      if saved["treedefs"].get(name) != treedef:
        diffs.append(f"{name} tree: saved {saved['treedefs'].get(name)}, "
                     f"template has {treedef}")
  return diffs


def save_checkpoint(directory: str | os.PathLike, params: Any, opt_state: Any,
                    *, metadata: Mapping[str, Any] | None = None) -> None:
  """Saves params and the whole optimizer state with orbax (blocking).

  Also writes ``blrax_tree.json`` into ``directory``: the saved tree's node
  types, leaf shapes and dtypes, which ``restore_checkpoint`` checks.

  Args:
    directory: the checkpoint directory (must not exist yet).
    params: the params (the posterior mean).
    opt_state: the whole optimizer state.
    metadata: optional JSON-serialisable mapping, e.g. ``{"optimizer":
      "ivon"}``, kept in the record; ``restore_checkpoint(...,
      metadata=...)`` checks it. Use it for what the state's structure does
      not show (which of IVON, Vadam or VOGN saved it, hyperparameters).

  Raises:
    TypeError: if ``metadata`` is not a JSON-serialisable mapping.

  Examples:
    >>> import os, tempfile, jax.numpy as jnp, blrax
    >>> from blrax.checkpoint import save_checkpoint
    >>> opt = blrax.ivon(0.1, ess=100.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   path = os.path.join(tmp, "step_100")
    ...   save_checkpoint(path, params, opt.init(params),
    ...                   metadata={"optimizer": "ivon"})
    ...   print(os.path.exists(os.path.join(path, "blrax_tree.json")))
    True
  """
  ocp = _orbax()
  record = _describe({"params": params, "opt_state": opt_state})
  record = {"format": _FORMAT, **record, "metadata": _json_metadata(metadata)}
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory,
                    _drop_empty({"params": params, "opt_state": opt_state}))
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    temporary = os.path.join(directory, RECORD + ".tmp")
    with open(temporary, "w") as file:
      json.dump(record, file)
    os.replace(temporary, os.path.join(directory, RECORD))


def _read_record(directory: str) -> dict[str, Any] | None:
  path = os.path.join(directory, RECORD)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as file:
      record = json.load(file)
    if not all(k in record for k in ("entries", "posteriors", "treedefs")):
      raise ValueError("it lacks entries, posteriors or treedefs")
  except (OSError, ValueError, TypeError) as error:
    raise ValueError(f"checkpoint {directory}: its structure record {path} is "
                     f"unreadable ({error!r}).") from error
  if record.get("format") != _FORMAT:
    raise ValueError(f"checkpoint {directory}: structure record format "
                     f"{record.get('format')!r}, this blrax reads {_FORMAT}.")
  return record


def restore_checkpoint(directory: str | os.PathLike, params: Any,
                       opt_state: Any, *,
                       metadata: Mapping[str, Any] | None = None
                       ) -> tuple[Any, Any]:
  """Restores ``(params, opt_state)``; the arguments give structure and dtypes.

  Pass e.g. freshly initialised params and ``opt.init(params)`` (or their
  ``jax.eval_shape``). A checkpoint of an older blrax, whose states held
  typed PRNG keys, restores into today's state (which holds their uint32
  data, ``blrax.noise.key_data``): its keys become key data.

  Before reading any array, the template is checked against the checkpoint's
  record (``blrax_tree.json``): the same tree (every node's path and type
  name, e.g. ``ScaleByBLRState``, ``DiagonalGaussian``, ``NormalNoiseState``
  vs ``FlipNoiseState``), the same posteriors (type, optimizer state type,
  ``mc_samples``), and every leaf's shape and dtype (typed keys included).
  The values are restored as saved: ``ess`` and ``weight_decay`` come from
  the checkpoint, not from the template. States of identical structure (IVON,
  Vadam and VOGN with the same noise, ``mc_samples`` and params) cannot be
  told apart from the record; ``metadata`` can. A checkpoint without a
  record (saved by an older blrax) is restored with a warning, checking only
  the restored shapes.

  Args:
    directory: a directory written by ``save_checkpoint``.
    params: params of the saved structure (arrays or ``ShapeDtypeStruct``).
    opt_state: an optimizer state of the saved structure.
    metadata: optional mapping; each of its items must have been saved (with
      ``save_checkpoint(..., metadata=...)``) with an equal value.

  Returns:
    ``(params, opt_state)`` as saved.

  Raises:
    ValueError: naming the paths that differ (e.g.
      ``opt_state[0].posterior.noise_state.key: saved shape (2,) dtype
      uint32, template has shape (2, 2) dtype uint32``), if the template
      or ``metadata`` does not match the checkpoint.

  Examples:
    >>> import os, tempfile, jax.numpy as jnp, blrax
    >>> from blrax.checkpoint import restore_checkpoint, save_checkpoint
    >>> opt = blrax.ivon(0.1, ess=100.0, key=7)
    >>> params = {"w": jnp.ones(2)}
    >>> state = opt.init(params)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   path = os.path.join(tmp, "step_100")
    ...   save_checkpoint(path, params, state)
    ...   template = {"w": jnp.zeros(2)}  # any params of the same structure
    ...   params, state = restore_checkpoint(path, template,
    ...                                      opt.init(template))
    >>> print(params["w"], state[0].posterior.noise_state.key.dtype)
    [1. 1.] uint32
  """
  ocp = _orbax()
  directory = os.path.abspath(directory)
  expected_metadata = _json_metadata(metadata)
  record = _read_record(directory)
  if record is None:
    if expected_metadata:
      raise ValueError(
          f"checkpoint {directory} has no {RECORD} (saved by an older "
          f"blrax), so its metadata cannot be checked against {metadata!r}.")
    warnings.warn(
        f"checkpoint {directory} has no {RECORD} (saved by an older blrax): "
        "its tree structure, node types and dtypes are not checked against "
        "the template.", stacklevel=2)
  typed = {}
  if record is not None:
    described = _describe({"params": params, "opt_state": opt_state})
    typed = _typed_key_entries(record, described)
    diffs = _differences(
        _as_key_data(record, typed), described,
        expected_metadata)
    if diffs:
      more = (f"\n  ... and {len(diffs) - _SHOWN} more"
              if len(diffs) > _SHOWN else "")
      hint = ("" if all(d.startswith("metadata[") for d in diffs) else
              "\nPass params and opt.init(params) of the optimizer and params "
              "the checkpoint was saved with.")
      raise ValueError(
          f"checkpoint {directory} does not match the template "
          f"({len(diffs)} difference{'s' if len(diffs) > 1 else ''}):\n  - "
          + "\n  - ".join(diffs[:_SHOWN]) + more + hint)
  target = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
  saved = _typed_target(target, typed) if typed else target
  try:
    restored = ocp.StandardCheckpointer().restore(directory,
                                                  _drop_empty(saved))
  except ValueError as error:
    wrong = _stored_shape_differences(ocp, directory, saved)
    if not wrong:
      raise
    raise ValueError(f"checkpoint {directory} does not match the template: "
                     + "; ".join(wrong[:_SHOWN])) from error
  restored = jax.tree.map(
      lambda t, r: jnp.zeros(t.shape, t.dtype) if t.size == 0 else r,
      saved, restored)
  restored = jax.tree.map(
      lambda s, t, r: noise_lib.key_data(r) if s is not t else r,
      saved, target, restored)
  wrong = [
      f"{path[0].key}{jax.tree_util.keystr(path[1:])}: saved shape "
      f"{np.shape(r)}, template has {t.shape}"
      for (path, t), r in zip(jax.tree_util.tree_flatten_with_path(target)[0],
                              jax.tree.leaves(restored))
      if np.shape(r) != t.shape]
  if wrong:
    raise ValueError(f"checkpoint {directory} does not match the template: "
                     + "; ".join(wrong[:_SHOWN]))
  return restored["params"], restored["opt_state"]
