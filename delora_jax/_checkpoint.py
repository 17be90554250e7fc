"""Adapter-only checkpoints with orbax: `save_adapters`, `load_adapters`, `adapter_save_args`.

Every orbax call of delora_jax lives in this module. A checkpoint is an orbax
composite checkpoint with three items: ``delora_adapters`` (the arrays of
:func:`delora_jax.adapters`, keyed by path), ``delora_meta`` (JSON: paths,
ranks, layouts, shapes, dtypes and checksums, checked against the target before
anything is restored) and, optionally, ``delora_opt_state`` (the leaves of an
optax state). The frozen base is never written (``w_norm`` and, for
``init="paper"``, ``res_a``/``res_b`` aside).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from delora_jax import _ckpt_meta as meta_lib
from delora_jax import _tree
from delora_jax._lora import check_base_norms
from delora_jax._wrap import adapters as _adapters
from delora_jax._wrap import with_adapters

ADAPTERS, META, OPT = "delora_adapters", "delora_meta", "delora_opt_state"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_COMMIT_FILE = "commit_success.txt"


def adapter_save_args(tree: Any, *, opt_state: Any = None) -> ocp.args.Composite:
  """orbax save arguments for the adapters of ``tree`` (and ``opt_state``).

  For ``ocp.CheckpointManager.save(step, args=...)``; add items of your own
  with ``ocp.args.Composite(**adapter_save_args(tree), data=...)``. Restore
  with :func:`load_adapters` (``directory=manager.directory, step=step``).

  Example:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2})
    >>> with ocp.CheckpointManager(tempfile.mkdtemp()) as mngr:
    ...   _ = mngr.save(0, args=delora_jax.adapter_save_args(tree))
    ...   mngr.wait_until_finished()
    ...   print(mngr.latest_step())
    0
  """
  tree = _flat_if_nnx(tree)
  ads = _adapters(tree)
  items = {ADAPTERS: ocp.args.StandardSave(ads)}
  leaves = None
  if opt_state is not None:
    leaves = meta_lib.opt_leaves(opt_state)
    if leaves[1]:
      items[OPT] = ocp.args.StandardSave(list(leaves[1]))
  items[META] = ocp.args.JsonSave(meta_lib.build(_tree.kernels(tree), ads, leaves))
  return ocp.args.Composite(**items)


def save_adapters(directory: str | os.PathLike, tree: Any, *, opt_state: Any = None,
                  overwrite: bool = False) -> str:
  """Writes the DeLoRA adapters of ``tree`` (not the frozen base) to ``directory``.

  The write is atomic (orbax writes a temporary folder and renames it when
  complete), so a crash never leaves a half-written checkpoint under the final
  name. Sharded arrays are written from their shards.

  Args:
    directory: the checkpoint folder to create.
    tree: an adapted tree from :func:`delora_jax.wrap`, or an NNX model from
      :func:`delora_jax.nnx.wrap`.
    opt_state: optionally, an optimizer state to store alongside (e.g. of
      :func:`delora_jax.optimizer`); its array leaves are written.
    overwrite: replace an existing checkpoint at ``directory`` (the old one is
      deleted first, so this replacement is not atomic).

  Returns:
    The absolute path written.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2})
    >>> path = delora_jax.save_adapters(os.path.join(tempfile.mkdtemp(), "ckpt"), tree)
    >>> restored = delora_jax.load_adapters(path, tree)
    >>> bool((restored["kernel"].a == tree["kernel"].a).all())
    True
  """
  path = os.path.abspath(os.fspath(directory))
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"save_adapters: `directory` {path!r} already exists. Pick a new folder, "
                     "or pass overwrite=True to replace it.")
  args = adapter_save_args(tree, opt_state=opt_state)
  with _checkpointer() as ckptr:
    ckptr.save(path, args=args, force=overwrite)
  return path


def load_adapters(directory: str | os.PathLike, tree: Any, *, opt_state: Any = None,
                  step: int | None = None, shardings: Any = None, check_base: bool = True) -> Any:
  """Returns ``tree`` with the adapters stored in ``directory`` put in.

  Before any array is read, the checkpoint's metadata must list exactly the
  adapted paths of ``tree`` with the same ranks, layouts, kernel shapes,
  dropout and dtypes (else ``ValueError`` listing the differences), and agree
  with what orbax stored (no partial restores). After reading, the arrays are
  verified against their checksums and the stored ``w_norm`` must match the
  norms of ``tree``'s base kernels (a different base model is an error). On
  any error nothing is returned and ``tree`` is untouched.

  Args:
    directory: a folder written by :func:`save_adapters`, or with ``step``
      the root folder of an ``ocp.CheckpointManager`` saved with
      :func:`adapter_save_args` (default step names).
    tree: the adapted target tree (from :func:`delora_jax.wrap` with the same
      rules, on the same base weights), or an adapted NNX model (then a new
      adapted model is returned; the given one is not modified).
    opt_state: a target optimizer state (e.g. ``opt.init(tree)``): if given,
      the stored state is restored into its structure and returned too.
    step: the step to read under a ``CheckpointManager`` root.
    shardings: where restored arrays go: ``None`` (the shardings of ``tree``'s
      adapter arrays and of ``opt_state``'s leaves), one
      ``jax.sharding.Sharding`` for all adapter arrays, or
      ``{path: Sharding | {field: Sharding}}``.
    check_base: compare the stored ``w_norm`` with ``tree``'s base kernels.

  Returns:
    The tree with the restored adapters, or ``(tree, opt_state)`` if
    ``opt_state`` was given.

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp, optax, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2})
    >>> opt = delora_jax.optimizer(optax.adam, learning_rate=1e-3)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = delora_jax.save_adapters(path, tree, opt_state=opt.init(tree))
    >>> target = delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2}, key=jax.random.key(1))
    >>> restored, state = delora_jax.load_adapters(path, target, opt_state=opt.init(target))
    >>> bool((restored["kernel"].a == tree["kernel"].a).all())
    True
    >>> delora_jax.load_adapters(path, delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 4}))
    Traceback (most recent call last):
    ...
    ValueError: load_adapters: the checkpoint '...' does not fit the target tree:
      kernel: rank 2 in the checkpoint, 4 in the target
    ...
  """
  from flax import nnx  # noqa: PLC0415
  if isinstance(tree, nnx.Module):  # an adapted NNX model: load into its flat kernel view
    from delora_jax import _nnx  # noqa: PLC0415
    got = load_adapters(directory, _flat_if_nnx(tree), opt_state=opt_state, step=step,
                        shardings=shardings, check_base=check_base)
    flat, state = got if opt_state is not None else (got, None)
    new = _nnx.with_kernels(tree, _tree.kernels(flat))
    return new if opt_state is None else (new, state)
  ks = _tree.require_adapted(tree, "load_adapters")
  path = _checkpoint_dir(directory, step)
  with _checkpointer() as ckptr:
    meta = _read_meta(ckptr, path)
    leaves = meta_lib.opt_leaves(opt_state) if opt_state is not None else None
    meta_lib.check_target(meta, ks, leaves, path)
    _check_stored_layout(ckptr, path, meta)
    items = {ADAPTERS: ocp.args.StandardRestore(_abstract_adapters(tree, shardings))}
    if leaves is not None and leaves[1]:
      items[OPT] = ocp.args.StandardRestore([_abstract(x, _sharding_of(x)) for x in leaves[1]])
    try:
      got = ckptr.restore(path, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data
      raise ValueError(f"load_adapters: could not read the arrays of {path!r} ({type(e).__name__}: "
                       f"{e}). The checkpoint is corrupt or incomplete; restore an earlier one.") from e
  restored = got[ADAPTERS]
  meta_lib.verify_checksums(meta, restored, got[OPT] if OPT in items else [], path)
  if check_base:
    for p, k in ks.items():
      check_base_norms(p, k, restored[p]["w_norm"], f"the checkpoint {path!r}")
  new_tree = with_adapters(tree, restored)
  if opt_state is None:
    return new_tree
  assert leaves is not None  # opt_state was given
  treedef = leaves[2]
  return new_tree, jax.tree_util.tree_unflatten(treedef, list(got[OPT]) if OPT in items else [])


def _flat_if_nnx(tree: Any) -> Any:
  """An adapted NNX model as the flat ``{path: DeloraKernel}`` tree the checkpoint code reads."""
  from flax import nnx  # noqa: PLC0415
  if isinstance(tree, nnx.Module):
    return dict(_tree.require_adapted(tree, "save_adapters", nnx_ok=True))
  return tree


def _checkpointer() -> ocp.Checkpointer:
  handlers = {ADAPTERS: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler(),
              OPT: ocp.StandardCheckpointHandler()}
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))


def _checkpoint_dir(directory: Any, step: int | None) -> str:
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f"load_adapters: `directory` must be a path; got {type(directory).__name__}.")
  root = os.path.abspath(os.fspath(directory))
  if step is not None:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
      raise TypeError(f"load_adapters: `step` must be an int; got {step!r}.")
    steps = ocp.utils.checkpoint_steps(root) if os.path.isdir(root) else []
    if int(step) not in steps:
      raise ValueError(f"load_adapters: no finished checkpoint for step {step} under {root!r} "
                       f"(finished steps: {sorted(steps)}). Use manager.latest_step(), or pass the "
                       "step folder itself as `directory` if it has a custom name.")
    root = os.path.join(root, str(int(step)))
  if not os.path.isdir(root):
    raise ValueError(f"load_adapters: `directory` {root!r} does not exist or is not a folder.")
  if _TMP_SUFFIX in os.path.basename(root) or not os.path.exists(os.path.join(root, _COMMIT_FILE)):
    raise ValueError(
        f"load_adapters: {root!r} is not a finished checkpoint (a temporary or half-written "
        "save, e.g. interrupted by a crash). Restore the latest finished step instead "
        "(CheckpointManager.latest_step() skips unfinished ones).")
  return root


def _read_meta(ckptr, path: str) -> dict:
  if not os.path.isdir(os.path.join(path, META)) or not os.path.isdir(os.path.join(path, ADAPTERS)):
    raise ValueError(
        f"load_adapters: {path!r} is not a delora_jax adapter checkpoint (expected the items "
        f"{META!r} and {ADAPTERS!r}; found {sorted(os.listdir(path))}). Write it with "
        "delora_jax.save_adapters or delora_jax.adapter_save_args.")
  try:
    meta = ckptr.restore(path, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  except Exception as e:
    raise ValueError(f"load_adapters: the metadata of {path!r} is unreadable ({type(e).__name__}: "
                     f"{e}); the checkpoint is corrupt.") from e
  meta_lib.check_format(meta, path)
  return meta


def _check_stored_layout(ckptr, path: str, meta: dict) -> None:
  """The arrays orbax stored must be exactly those the metadata lists (no partial restores)."""
  try:
    items = ckptr.metadata(path).item_metadata
    stored = {ADAPTERS: items[ADAPTERS], OPT: items[OPT] if OPT in items.keys() else None}
  except Exception as e:
    raise ValueError(f"load_adapters: the array index of {path!r} is unreadable ({type(e).__name__}: "
                     f"{e}); the checkpoint is corrupt.") from e
  meta_lib.check_stored(meta, {k: _shapes(v) for k, v in stored.items()}, path)


def _shapes(item_meta) -> Any:
  if item_meta is None:
    return None
  tree = getattr(item_meta, "tree", item_meta)
  return jax.tree_util.tree_map(lambda m: (tuple(m.shape), str(np.dtype(m.dtype))), tree,
                                is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _sharding_of(x: Any):
  s = getattr(x, "sharding", None)
  return s if isinstance(s, jax.sharding.Sharding) else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract(x: Any, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)


def _abstract_adapters(tree: Any, shardings: Any) -> dict:
  ads = _adapters(tree)
  out = {}
  for p, fields in ads.items():
    out[p] = {f: _abstract(x, _pick_sharding(shardings, p, f, x, sorted(fields)))
              for f, x in fields.items()}
  return out


def _pick_sharding(shardings: Any, path: str, field: str, x: Any, fields: list[str]):
  if shardings is None:
    return _sharding_of(x)
  if isinstance(shardings, jax.sharding.Sharding):
    return shardings
  if not isinstance(shardings, Mapping):
    raise TypeError("load_adapters: `shardings` must be None, a jax.sharding.Sharding or a dict "
                    f"{{path: Sharding | {{field: Sharding}}}}; got {type(shardings).__name__}.")
  if path not in shardings:
    raise ValueError(f"load_adapters: `shardings` has no entry for the adapted path {path!r} "
                     f"(its keys: {_tree.sample_paths(list(shardings))}). Give every adapted path.")
  s = shardings[path]
  if isinstance(s, Mapping):
    if field not in s:
      raise ValueError(f"load_adapters: shardings[{path!r}] has no entry for field {field!r}; "
                       f"expected the fields {fields}.")
    s = s[field]
  if not isinstance(s, jax.sharding.Sharding):
    raise TypeError(f"load_adapters: shardings[{path!r}] must be a jax.sharding.Sharding or a "
                    f"dict of them per field; got {type(s).__name__}.")
  return s
