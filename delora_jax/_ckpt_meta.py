"""The JSON metadata of an adapter checkpoint, and every check of a checkpoint against its target.

No orbax here: `_checkpoint` reads and writes, this module decides what fits.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

from delora_jax import _quant
from delora_jax._kernel import DeloraKernel

FORMAT, VERSION = "delora_jax.adapters", 1
_SHOWN = 8


def _dtype(x: Any) -> str:
  return str(np.dtype(x.dtype))


def checksum(x: Any) -> str | None:
  """blake2b of the array's bytes; ``None`` when not all shards are on this process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  data = np.ascontiguousarray(np.asarray(x))
  return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def _array_entry(x: Any) -> dict:
  return {"shape": list(x.shape), "dtype": _dtype(x), "checksum": checksum(x)}


def opt_leaves(opt_state: Any) -> tuple[list[str], list[Any], Any]:
  """``(key paths, array leaves, treedef)`` of an optimizer state."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
  keys, leaves = [], []
  for kp, x in flat:
    key = jax.tree_util.keystr(kp)
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise TypeError(
        f"`opt_state` leaf {key} is a {type(x).__name__}, expected an array. Only "
        "array leaves can be checkpointed; convert it, e.g. jnp.asarray(x)."
      )
    keys.append(key)
    leaves.append(x)
  return keys, leaves, treedef


def build(
  ks: dict[str, DeloraKernel], ads: dict[str, dict[str, Any]], leaves, extras: dict[str, Any] | None = None
) -> dict:
  kernels = {}
  for p, k in ks.items():
    kernels[p] = {
      "rank": int(k.rank),
      "w_shape": list(k.w.shape),
      "w_dtype": _dtype(k.w),
      "in_axes": list(k.in_axes),
      "out_axes": list(k.out_axes),
      "dropout": float(k.dropout),
      **({"stack_axes": list(k.stack)} if k.stack else {}),  # stacked axes not leading (positions)
      **({"quantize": _quant.describe(k.w)} if _quant.is_quantized(k.w) else {}),  # Rule(quantize=...)
      "fields": {f: _array_entry(x) for f, x in ads[p].items()},
    }
  # "processes": a save by one process holds every shard, so every array has a checksum, and
  # `verify_checksums` requires them; only a multi-process save may leave some out.
  meta = {"format": FORMAT, "version": VERSION, "processes": jax.process_count(), "kernels": kernels, "opt_state": None}
  if extras:  # plain leaves saved with extra_trainable (a head, biases), by path
    meta["extra"] = {p: _array_entry(x) for p, x in extras.items()}
  if leaves is not None:
    keys, arrays, _ = leaves
    meta["opt_state"] = [{"path": key, **_array_entry(x)} for key, x in zip(keys, arrays)]
  return meta


def check_format(meta: Any, path: str) -> None:
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(
      f"load_adapters: {path!r} is not a delora_jax adapter checkpoint (its metadata lacks format={FORMAT!r})."
    )
  if meta.get("version") != VERSION:
    raise ValueError(
      f"load_adapters: {path!r} has checkpoint format version {meta.get('version')!r}; "
      f"this delora_jax reads version {VERSION}. Upgrade delora_jax."
    )
  if not isinstance(meta.get("kernels"), dict):
    raise ValueError(f"load_adapters: the metadata of {path!r} is corrupt (no 'kernels' table).")


def _kernel_problems(p: str, m: dict, k: DeloraKernel) -> list[str]:
  out = []
  rank = int(k.rank)
  if m.get("rank") != rank:
    out.append(f"{p}: rank {m.get('rank')} in the checkpoint, {rank} in the target")
  if m.get("w_shape") != list(k.w.shape):
    out.append(
      f"{p}: base kernel shape {tuple(m.get('w_shape') or ())} in the checkpoint, {tuple(k.w.shape)} in the target"
    )
  if (m.get("in_axes"), m.get("out_axes")) != (list(k.in_axes), list(k.out_axes)):
    out.append(
      f"{p}: layout in_axes={m.get('in_axes')} out_axes={m.get('out_axes')} in the "
      f"checkpoint, in_axes={list(k.in_axes)} out_axes={list(k.out_axes)} in the target"
    )
  if m.get("stack_axes", []) != list(k.stack):
    out.append(
      f"{p}: stacked axes at positions {m.get('stack_axes', 'leading')} in the checkpoint, "
      f"{list(k.stack) or 'leading'} in the target"
    )
  if m.get("quantize") != _quant.describe(k.w):
    out.append(
      f"{p}: base stored {m.get('quantize') or 'unquantized'} in the checkpoint, "
      f"{_quant.describe(k.w) or 'unquantized'} in the target (Rule(quantize=..., tile_size=...))"
    )
  if m.get("dropout") != float(k.dropout):
    out.append(f"{p}: dropout {m.get('dropout')} in the checkpoint, {k.dropout} in the target")
  fields = m.get("fields") or {}
  want = {f: getattr(k, f) for f in ("a", "b", "lam", "w_norm", "res_a", "res_b") if getattr(k, f) is not None}
  if set(fields) != set(want):
    out.append(
      f"{p}: fields {sorted(fields)} in the checkpoint, {sorted(want)} in the target "
      "(init='paper' adapters carry res_a/res_b)"
    )
    return out
  for f, x in want.items():
    got = fields[f]
    if (problem := _mismatch(f"{p}.{f}", got, x)) is not None:
      out.append(problem)
  return out


def _mismatch(label: str, entry: dict, x: Any) -> str | None:
  """How a stored array's entry (shape, dtype) differs from the target array ``x``, if it does."""
  if (entry.get("shape"), entry.get("dtype")) == (list(x.shape), _dtype(x)):
    return None
  return (
    f"{label}: {entry.get('dtype')}{tuple(entry.get('shape') or ())} in the checkpoint, "
    f"{_dtype(x)}{tuple(x.shape)} in the target"
  )


def _raise(problems: list[str], path: str, what: str, fix: str) -> None:
  shown = "\n  ".join(problems[:_SHOWN])
  more = f"\n  ... ({len(problems)} differences in all)" if len(problems) > _SHOWN else ""
  raise ValueError(f"load_adapters: the checkpoint {path!r} does not fit {what}:\n  {shown}{more}\n{fix}")


def check_target(meta: dict, ks: dict[str, DeloraKernel], leaves, path: str) -> None:
  """Everything in ``meta`` must match the target tree (and target optimizer state)."""
  stored = meta["kernels"]
  problems = [f"{p}: adapted in the target, absent from the checkpoint" for p in ks if p not in stored]
  problems += [f"{p}: in the checkpoint, not adapted in the target" for p in stored if p not in ks]
  for p, k in ks.items():
    if p in stored:
      problems += _kernel_problems(p, stored[p], k)
  if problems:
    _raise(
      problems,
      path,
      "the target tree",
      "Wrap the target with the same rules (patterns, ranks, layouts, dtypes) the "
      "checkpoint was saved with, on the same base model. Nothing was restored.",
    )
  if leaves is None:
    return
  saved = meta.get("opt_state")
  if saved is None:
    raise ValueError(
      f"load_adapters: the checkpoint {path!r} holds no optimizer state, but "
      "`opt_state` was given. Call load_adapters without opt_state and "
      "initialise the optimizer afresh."
    )
  keys, arrays, _ = leaves
  problems = []
  if [s.get("path") for s in saved] != keys:
    problems.append(
      f"structure: {len(saved)} leaves in the checkpoint, {len(keys)} in the target "
      f"(first difference: {_first_diff([s.get('path') for s in saved], keys)})"
    )
  else:
    for s, key, x in zip(saved, keys, arrays):
      if (problem := _mismatch(f"opt_state{key}", s, x)) is not None:
        problems.append(problem)
  if problems:
    _raise(
      problems,
      path,
      "the target `opt_state`",
      "Build the target with the same optimizer on the same adapted tree "
      "(opt.init(tree) or opt.init(trainable)). Nothing was restored.",
    )


def check_extras(meta: dict, plain: dict[str, Any], path: str) -> None:
  """Every extra leaf in the checkpoint must be a plain leaf of the target, same shape and dtype."""
  stored = meta.get("extra") or {}
  if not isinstance(stored, dict):
    raise ValueError(f"load_adapters: the metadata of {path!r} is corrupt (its 'extra' table).")
  problems = []
  for p, e in stored.items():
    x = plain.get(p)
    if x is None:
      problems.append(f"{p}: an extra leaf in the checkpoint (saved with extra_trainable), absent from the target tree")
    elif (problem := _mismatch(p, e, x)) is not None:
      problems.append(problem)
  if problems:
    _raise(
      problems,
      path,
      "the target tree's extra leaves",
      "Load into a tree of the same model (the same head and biases) that the checkpoint "
      "was saved from. Nothing was restored.",
    )


def _first_diff(a: list, b: list) -> str:
  for x, y in zip(a, b):
    if x != y:
      return f"{x!r} vs {y!r}"
  return f"{a[len(b)]!r} in the checkpoint only" if len(a) > len(b) else f"{b[len(a)]!r} in the target only"


def expected_stored(meta: dict) -> dict:
  ads = {p: {f: (tuple(e["shape"]), e["dtype"]) for f, e in m["fields"].items()} for p, m in meta["kernels"].items()}
  opt = meta.get("opt_state")
  opt = [(tuple(e["shape"]), e["dtype"]) for e in opt] if opt else None
  extra = {p: (tuple(e["shape"]), e["dtype"]) for p, e in (meta.get("extra") or {}).items()} or None
  return {"delora_adapters": ads, "delora_opt_state": opt, "delora_extra": extra}


def check_stored(meta: dict, stored: dict, path: str) -> None:
  """The arrays orbax holds must be exactly those ``meta`` describes."""
  want = expected_stored(meta)
  for item, expected in want.items():
    got = stored.get(item)
    if got != expected:
      raise ValueError(
        f"load_adapters: the checkpoint {path!r} is corrupt: the arrays stored in item {item!r} "
        f"do not match its metadata (stored {_summary(got)}, metadata lists {_summary(expected)}). "
        "Restore an earlier checkpoint."
      )


def _summary(x: Any) -> str:
  if x is None:
    return "nothing"
  if isinstance(x, dict):
    return f"{len(x)} entries {list(x)[:3]}"
  return f"{len(x)} arrays"


def verify_checksums(
  meta: dict, restored: dict, opt_restored: list, path: str, extras: dict[str, Any] | None = None
) -> None:
  # A save by one process writes a checksum for every array: there a missing one is damage (or
  # an edit), not an array whose shards were spread over processes.
  required = meta.get("processes", 1) == 1

  def differs(entry: dict, x: Any) -> bool:
    got = checksum(x)  # None where this process does not hold every shard: nothing to compare
    stored = entry.get("checksum")
    return got is not None and (stored != got if stored is not None else required)

  bad = [f"{p}.{f}" for p, m in meta["kernels"].items() for f, e in m["fields"].items() if differs(e, restored[p][f])]
  bad += [
    f"opt_state{e.get('path', i)}"
    for i, (e, x) in enumerate(zip(meta.get("opt_state") or [], opt_restored))
    if differs(e, x)
  ]
  bad += [p for p, e in (meta.get("extra") or {}).items() if differs(e, (extras or {})[p])]
  if bad:
    raise ValueError(
      f"load_adapters: the checkpoint {path!r} is corrupt: the data read for "
      f"{bad[:_SHOWN]} differs from what was written (checksum mismatch, or no checksum where "
      "one process saved every array). Restore an earlier checkpoint."
    )
