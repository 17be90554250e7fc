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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from delora_jax import _atomic, _tree
from delora_jax import _ckpt_meta as meta_lib
from delora_jax._kernel import is_kernel
from delora_jax._lora import check_base_norms, check_finite
from delora_jax._split import _extra_matcher
from delora_jax._wrap import adapters as _adapters
from delora_jax._wrap import with_adapters

ADAPTERS, META, OPT, EXTRA = "delora_adapters", "delora_meta", "delora_opt_state", "delora_extra"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_COMMIT_FILE = "commit_success.txt"
# Everything save_adapters writes at the top of a checkpoint folder; overwrite=True replaces
# only a folder that holds nothing else.
_OWN_ENTRIES = {ADAPTERS, META, OPT, EXTRA, _COMMIT_FILE, "_CHECKPOINT_METADATA"}
_LOAD_ATTEMPTS = 10


class CheckpointError(ValueError, OSError):
  """A checkpoint could not be written (disk full, no permission, ...); nothing was replaced."""


def adapter_save_args(
  tree: Any, *, opt_state: Any = None, extra_trainable: str | Sequence[str] | None = None
) -> ocp.args.Composite:
  """orbax save arguments for the adapters of ``tree`` (and ``opt_state``, extra leaves).

  For ``ocp.CheckpointManager.save(step, args=...)``; add items of your own
  with ``ocp.args.Composite(**adapter_save_args(tree), data=...)``. Restore
  with :func:`load_adapters` (``directory=manager.directory, step=step``).

  Args:
    tree: as for :func:`save_adapters`.
    opt_state: as for :func:`save_adapters`.
    extra_trainable: as for :func:`save_adapters`.

  Example:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2})
    >>> with ocp.CheckpointManager(tempfile.mkdtemp()) as mngr:
    ...   _ = mngr.save(0, args=delora_jax.adapter_save_args(tree))
    ...   mngr.wait_until_finished()
    ...   print(mngr.latest_step())
    0
  """
  extras = _extras(tree, extra_trainable)
  tree = _flat_if_nnx(tree)
  ads = _adapters(tree)
  items = {ADAPTERS: ocp.args.StandardSave(ads)}
  leaves = None
  if opt_state is not None:
    leaves = meta_lib.opt_leaves(opt_state)
    if leaves[1]:
      items[OPT] = ocp.args.StandardSave(list(leaves[1]))
  if extras:
    items[EXTRA] = ocp.args.StandardSave(extras)
  items[META] = ocp.args.JsonSave(meta_lib.build(_tree.kernels(tree), ads, leaves, extras))
  return ocp.args.Composite(**items)


def _extras(tree: Any, extra_trainable: Any) -> dict[str, Any]:
  """``{path: leaf}`` of the plain array leaves that ``extra_trainable`` selects."""
  if extra_trainable is None:
    return {}
  from flax import nnx  # noqa: PLC0415

  if isinstance(tree, nnx.Module):
    raise ValueError(
      "save_adapters: `extra_trainable` is for Linen parameter trees; an NNX model's other "
      "Variables (a head) are saved with orbax directly: "
      "ocp.StandardCheckpointer().save(path, nnx.state(model, nnx.Param))."
    )
  match = _extra_matcher(extra_trainable)
  paths, leaves, _ = _tree.flatten(tree)
  out = {p: x for p, x in zip(paths, leaves) if not is_kernel(x) and _tree.is_array_like(x) and match(p)}
  if not out:
    raise ValueError(
      f"save_adapters: `extra_trainable`={extra_trainable!r} selects no plain array leaf of the "
      f"tree (re.fullmatch on '/'-joined paths such as {_tree.sample_paths(paths)}), so nothing "
      "beyond the adapters would be saved. Fix the pattern (the one given to split)."
    )
  return out


def save_adapters(
  directory: str | os.PathLike,
  tree: Any,
  *,
  opt_state: Any = None,
  extra_trainable: str | Sequence[str] | None = None,
  overwrite: bool = False,
) -> str:
  """Writes the DeLoRA adapters of ``tree`` (not the frozen base) to ``directory``.

  The write is atomic and never deletes first: the checkpoint is written into a
  staging folder of its own beside ``directory``, then takes its name in one
  rename (with ``overwrite=True``, one exchange of the two folders, after which
  the old one is deleted). So a crash or a full disk at any moment leaves either
  the old checkpoint or the new one under the name, complete, never neither and
  never a mix; concurrent saves to one path each either succeed with their own
  data or raise. Sharded arrays are written from their shards.

  Args:
    directory: the checkpoint folder to create.
    tree: an adapted tree from :func:`delora_jax.wrap`, or an NNX model from
      :func:`delora_jax.nnx.wrap`.
    opt_state: optionally, an optimizer state to store alongside (e.g. of
      :func:`delora_jax.optimizer`); its array leaves are written.
    extra_trainable: regex(es) of plain leaves to store too (the
      ``extra_trainable`` of :func:`delora_jax.split`: a trained head, biases),
      with shapes, dtypes and checksums; :func:`load_adapters` puts them back.
    overwrite: replace an existing checkpoint at ``directory``. Only a folder
      that ``save_adapters`` wrote (nothing else in it) is replaced; a plain
      file or any other folder is refused and left alone.

  Returns:
    The absolute path written.

  Raises:
    ValueError: ``directory`` exists (without ``overwrite``), is not an adapter
      checkpoint, or was created by another save while this one ran.
    CheckpointError: the write itself failed (a ``ValueError`` and ``OSError``:
      disk full, no permission); whatever was at ``directory`` is unchanged.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2})
    >>> path = delora_jax.save_adapters(os.path.join(tempfile.mkdtemp(), "ckpt"), tree)
    >>> restored = delora_jax.load_adapters(path, tree)
    >>> bool((restored["kernel"].a == tree["kernel"].a).all())
    True
    >>> _ = delora_jax.save_adapters(path, tree, overwrite=True)  # atomic replacement
  """
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f"save_adapters: `directory` must be a path; got {type(directory).__name__}.")
  path = os.path.abspath(os.fspath(directory))
  _check_target(path, overwrite)
  args = adapter_save_args(tree, opt_state=opt_state, extra_trainable=extra_trainable)
  primary = jax.process_index() == 0
  token, lock = None, None
  try:
    try:
      if primary:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _atomic.remove_stale(path)
        token, lock = _atomic.create_staging(path)
      staging = _atomic.staging_path(path, _shared_token(token))
      with _checkpointer() as ckptr:
        ckptr.save(os.path.join(staging, _atomic.CHECKPOINT), args=args)
    except Exception as e:  # orbax/tensorstore raise many types (RESOURCE_EXHAUSTED, OSError, ...)
      kept = "the checkpoint already there is unchanged" if os.path.lexists(path) else "nothing was written"
      raise CheckpointError(
        f"save_adapters: writing the checkpoint {path!r} failed ({type(e).__name__}: {e}); {kept}. "
        "Check the free space and permissions of its parent folder, or pass another "
        "`directory`."
      ) from e
    failure: ValueError | None = None
    if primary:
      try:
        _atomic.commit(staging, path, overwrite=overwrite)
      except FileExistsError:
        failure = ValueError(
          f"save_adapters: {path!r} was created by another save while this one ran, and "
          "`overwrite` is False, so that one was kept and this save discarded. Pass "
          "overwrite=True to replace it, or save to another `directory`."
        )
      except OSError as e:
        failure = CheckpointError(
          f"save_adapters: could not move the finished checkpoint into place at {path!r} "
          f"({e}); whatever was there is unchanged. Check the permissions of its folder."
        )
  finally:
    if token is not None:  # the staging folder (after an exchange: the old checkpoint), then its lock
      _atomic.discard(_atomic.staging_path(path, token), lock)
  failure = _agree(failure)
  if failure is not None:
    raise failure
  return path


def _check_target(path: str, overwrite: bool) -> None:
  if not os.path.lexists(path):
    return
  if not overwrite:
    raise ValueError(
      f"save_adapters: `directory` {path!r} already exists. Pick a new folder, or pass overwrite=True to replace it."
    )
  if not os.path.isdir(path) or os.path.islink(path):
    raise ValueError(
      f"save_adapters: `directory` {path!r} is a {'link' if os.path.islink(path) else 'file'}, not "
      "an adapter checkpoint; overwrite=True replaces only checkpoints save_adapters wrote, so it "
      "was left alone. Pass another `directory`, or remove it yourself."
    )
  entries = set(os.listdir(path))
  foreign = sorted(entries - _OWN_ENTRIES)
  if foreign or META not in entries or ADAPTERS not in entries:
    found = f"it holds {foreign[:6]}" if foreign else f"it lacks {sorted({META, ADAPTERS} - entries)}"
    raise ValueError(
      f"save_adapters: `directory` {path!r} is not an adapter checkpoint ({found}); "
      "overwrite=True replaces only checkpoints save_adapters wrote, so nothing was touched. "
      "Pass another `directory`, or remove that folder yourself."
    )


def _shared_token(token: str | None) -> str:
  """Process 0's staging token (its staging folder's name), on every process of a save."""
  if jax.process_count() == 1:
    assert token is not None
    return token
  from jax.experimental import multihost_utils  # noqa: PLC0415

  data = np.frombuffer((token or "").encode().ljust(128, b"\0")[:128], np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data), np.uint8)
  return bytes(data).rstrip(b"\0").decode()


def _agree(failure: ValueError | None) -> ValueError | None:
  """Process 0's outcome of the commit, on every process (also a barrier after it)."""
  if jax.process_count() == 1:
    return failure
  from jax.experimental import multihost_utils  # noqa: PLC0415

  mine = np.int32(0 if failure is None else 1 if isinstance(failure, CheckpointError) else 2)
  code = int(multihost_utils.broadcast_one_to_all(mine))
  if code == 0 or failure is not None:
    return failure
  if code == 1:
    return CheckpointError(
      "save_adapters: process 0 could not move the finished checkpoint into place (see its error)."
    )
  return ValueError("save_adapters: another save created the folder first.")


def load_adapters(
  directory: str | os.PathLike,
  tree: Any,
  *,
  opt_state: Any = None,
  step: int | None = None,
  shardings: Any = None,
  check_base: bool = True,
) -> Any:
  """Returns ``tree`` with the adapters stored in ``directory`` put in.

  Before any array is read, the checkpoint's metadata must list exactly the
  adapted paths of ``tree`` with the same ranks, layouts, kernel shapes,
  dropout and dtypes (else ``ValueError`` listing the differences), and agree
  with what orbax stored (no partial restores). After reading, the arrays are
  verified against their checksums and the stored ``w_norm`` must match the
  norms of ``tree``'s base kernels (a different base model is an error). On
  any error nothing is returned and ``tree`` is untouched. Extra leaves saved
  with ``save_adapters(..., extra_trainable=...)`` are checked the same way and
  put back at their paths. A read that races an ``overwrite=True`` save of the
  same folder is retried, so it returns the old or the new checkpoint whole.

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

    got = load_adapters(
      directory, _flat_if_nnx(tree), opt_state=opt_state, step=step, shardings=shardings, check_base=check_base
    )
    flat, state = got if opt_state is not None else (got, None)
    new = _nnx.with_kernels(tree, _tree.kernels(flat))
    return new if opt_state is None else (new, state)
  ks = _tree.require_adapted(tree, "load_adapters")
  for attempt in range(_LOAD_ATTEMPTS):
    path = _checkpoint_dir(directory, step)
    identity = _identity(path)
    try:
      got = _read(path, tree, ks, opt_state, shardings, check_base)
    except (ValueError, OSError):
      # An overwrite swapped the folder while it was read (the old one is then deleted under
      # the reader): read the new one instead. Any other failure is the checkpoint's own.
      if attempt + 1 < _LOAD_ATTEMPTS and _identity(path) != identity:
        continue
      raise
    return got
  raise AssertionError("unreachable")


def _identity(path: str) -> tuple[int, int, int] | None:
  """Which folder is at ``path``: inode numbers are reused at once after a delete, so the
  inode's change time (set by its creation and by the swap's rename) is part of it."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_dev, st.st_ino, st.st_ctime_ns


def _read(path: str, tree: Any, ks: dict, opt_state: Any, shardings: Any, check_base: bool) -> Any:
  with _checkpointer() as ckptr:
    meta = _read_meta(ckptr, path)
    leaves = meta_lib.opt_leaves(opt_state) if opt_state is not None else None
    meta_lib.check_target(meta, ks, leaves, path)
    plain = _plain_leaves(tree)
    meta_lib.check_extras(meta, plain, path)
    _check_stored_layout(ckptr, path, meta)
    items = {ADAPTERS: ocp.args.StandardRestore(_abstract_adapters(tree, shardings))}
    if leaves is not None and leaves[1]:
      items[OPT] = ocp.args.StandardRestore([_abstract(x, _sharding_of(x)) for x in leaves[1]])
    if meta.get("extra"):
      items[EXTRA] = ocp.args.StandardRestore({p: _abstract(plain[p], _sharding_of(plain[p])) for p in meta["extra"]})
    try:
      got = ckptr.restore(path, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data
      raise ValueError(
        f"load_adapters: could not read the arrays of {path!r} ({type(e).__name__}: "
        f"{e}). The checkpoint is corrupt or incomplete; restore an earlier one."
      ) from e
  restored = got[ADAPTERS]
  extras = dict(got[EXTRA]) if EXTRA in items else {}
  meta_lib.verify_checksums(meta, restored, got[OPT] if OPT in items else [], path, extras)
  for p, fields in restored.items():
    check_finite(p, fields, f"the checkpoint {path!r}")
  if check_base:
    for p, k in ks.items():
      check_base_norms(p, k, restored[p]["w_norm"], f"the checkpoint {path!r}")
  new_tree = with_adapters(tree, restored)
  if extras:
    new_tree = _tree.map_leaves(lambda p, x: extras.get(p, x), new_tree)
  if opt_state is None:
    return new_tree
  assert leaves is not None  # opt_state was given
  treedef = leaves[2]
  return new_tree, jax.tree_util.tree_unflatten(treedef, list(got[OPT]) if OPT in items else [])


def _plain_leaves(tree: Any) -> dict[str, Any]:
  paths, leaves, _ = _tree.flatten(tree)
  return {p: x for p, x in zip(paths, leaves) if not is_kernel(x) and _tree.is_array_like(x)}


def _flat_if_nnx(tree: Any) -> Any:
  """An adapted NNX model as the flat ``{path: DeloraKernel}`` tree the checkpoint code reads."""
  from flax import nnx  # noqa: PLC0415

  if isinstance(tree, nnx.Module):
    return dict(_tree.require_adapted(tree, "save_adapters", nnx_ok=True))
  return tree


def _checkpointer() -> ocp.Checkpointer:
  handlers = {
    ADAPTERS: ocp.StandardCheckpointHandler(),
    META: ocp.JsonCheckpointHandler(),
    OPT: ocp.StandardCheckpointHandler(),
    EXTRA: ocp.StandardCheckpointHandler(),
  }
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
      raise ValueError(
        f"load_adapters: no finished checkpoint for step {step} under {root!r} "
        f"(finished steps: {sorted(steps)}). Use manager.latest_step(), or pass the "
        "step folder itself as `directory` if it has a custom name."
      )
    root = os.path.join(root, str(int(step)))
  if not os.path.isdir(root):
    raise ValueError(f"load_adapters: `directory` {root!r} does not exist or is not a folder.")
  if _TMP_SUFFIX in os.path.basename(root) or not os.path.exists(os.path.join(root, _COMMIT_FILE)):
    raise ValueError(
      f"load_adapters: {root!r} is not a finished checkpoint (a temporary or half-written "
      "save, e.g. interrupted by a crash). Restore the latest finished step instead "
      "(CheckpointManager.latest_step() skips unfinished ones)."
    )
  return root


def _read_meta(ckptr, path: str) -> dict:
  if not os.path.isdir(os.path.join(path, META)) or not os.path.isdir(os.path.join(path, ADAPTERS)):
    raise ValueError(
      f"load_adapters: {path!r} is not a delora_jax adapter checkpoint (expected the items "
      f"{META!r} and {ADAPTERS!r}; found {sorted(os.listdir(path))}). Write it with "
      "delora_jax.save_adapters or delora_jax.adapter_save_args."
    )
  try:
    meta = ckptr.restore(path, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  except Exception as e:
    raise ValueError(
      f"load_adapters: the metadata of {path!r} is unreadable ({type(e).__name__}: {e}); the checkpoint is corrupt."
    ) from e
  meta_lib.check_format(meta, path)
  return meta


def _check_stored_layout(ckptr, path: str, meta: dict) -> None:
  """The arrays orbax stored must be exactly those the metadata lists (no partial restores)."""
  try:
    items = ckptr.metadata(path).item_metadata
    stored = {
      ADAPTERS: items[ADAPTERS],
      OPT: items[OPT] if OPT in items.keys() else None,
      EXTRA: items[EXTRA] if EXTRA in items.keys() else None,
    }
  except Exception as e:
    raise ValueError(
      f"load_adapters: the array index of {path!r} is unreadable ({type(e).__name__}: {e}); the checkpoint is corrupt."
    ) from e
  meta_lib.check_stored(meta, {k: _shapes(v) for k, v in stored.items()}, path)


def _shapes(item_meta) -> Any:
  if item_meta is None:
    return None
  tree = getattr(item_meta, "tree", item_meta)
  return jax.tree_util.tree_map(
    lambda m: (tuple(m.shape), str(np.dtype(m.dtype))),
    tree,
    is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
  )


def _sharding_of(x: Any):
  s = getattr(x, "sharding", None)
  return s if isinstance(s, jax.sharding.Sharding) else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract(x: Any, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)


def _abstract_adapters(tree: Any, shardings: Any) -> dict:
  ads = _adapters(tree)
  out = {}
  for p, fields in ads.items():
    out[p] = {f: _abstract(x, _pick_sharding(shardings, p, f, x, sorted(fields))) for f, x in fields.items()}
  return out


def _pick_sharding(shardings: Any, path: str, field: str, x: Any, fields: list[str]):
  if shardings is None:
    return _sharding_of(x)
  if isinstance(shardings, jax.sharding.Sharding):
    return shardings
  if not isinstance(shardings, Mapping):
    raise TypeError(
      "load_adapters: `shardings` must be None, a jax.sharding.Sharding or a dict "
      f"{{path: Sharding | {{field: Sharding}}}}; got {type(shardings).__name__}."
    )
  if path not in shardings:
    raise ValueError(
      f"load_adapters: `shardings` has no entry for the adapted path {path!r} "
      f"(its keys: {_tree.sample_paths(list(shardings))}). Give every adapted path."
    )
  s = shardings[path]
  if isinstance(s, Mapping):
    if field not in s:
      raise ValueError(
        f"load_adapters: shardings[{path!r}] has no entry for field {field!r}; expected the fields {fields}."
      )
    s = s[field]
  if not isinstance(s, jax.sharding.Sharding):
    raise TypeError(
      f"load_adapters: shardings[{path!r}] must be a jax.sharding.Sharding or a "
      f"dict of them per field; got {type(s).__name__}."
    )
  return s
