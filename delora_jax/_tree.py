"""Addressing leaves of Flax parameter trees (Linen dicts, FrozenDicts, NNX States) by path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import tree_util as jtu

from delora_jax._kernel import DeloraKernel, is_kernel


def key_name(entry: Any) -> str | None:
  """One path entry as text; ``None`` for a Variable's or box's ``.value``."""
  if isinstance(entry, jtu.DictKey):
    return str(entry.key)
  if isinstance(entry, jtu.GetAttrKey):
    return None if entry.name == "value" else entry.name
  if isinstance(entry, jtu.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jtu.FlattenedIndexKey):
    return str(entry.key)
  return str(entry)


def path_str(path: tuple) -> str:
  """``/``-joined path of a leaf, e.g. ``layers_3/attn/query/kernel``."""
  return "/".join(n for n in map(key_name, path) if n is not None)


def flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = is_kernel):
  """Leaves (DeLoRA nodes kept whole) with their path strings, and the treedef.

  Raises ``ValueError`` if two leaves get the same path (a key holding ``/``).
  """
  leaves, treedef = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
  paths = [path_str(p) for p, _ in leaves]
  if len(set(paths)) != len(paths):
    _raise_collision([p for p, _ in leaves], paths)
  return paths, [x for _, x in leaves], treedef


def _raise_collision(raw: list[tuple], paths: list[str]) -> None:
  seen: dict[str, tuple] = {}
  for entries, p in zip(raw, paths):
    if p in seen:
      keys = sorted({n for e in (*seen[p], *entries) if (n := key_name(e)) and "/" in n})
      raise ValueError(
        f"two leaves of the tree have the path {p!r}: a key that holds '/' ({keys}) joins to the "
        "same path as nested keys, so rules, adapters and checkpoints could not tell them apart "
        "and one kernel would get the other's adapter. Rename the key(s) holding '/' (e.g. "
        "replace '/' by '_') before calling delora_jax."
      )
    seen[p] = entries


def kernels(tree: Any) -> dict[str, DeloraKernel]:
  """``{path: DeloraKernel}`` of an adapted tree, in tree order."""
  paths, leaves, _ = flatten(tree)
  return {p: x for p, x in zip(paths, leaves) if is_kernel(x)}


def sample_paths(paths: list[str], n: int = 6) -> str:
  shown = ", ".join(repr(p) for p in paths[:n])
  more = f", ... ({len(paths)} in all)" if len(paths) > n else ""
  return f"[{shown}{more}]"


def is_array_like(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def map_leaves(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """Replaces every plain leaf ``x`` at ``path`` by ``fn(path, x)``."""
  paths, leaves, treedef = flatten(tree)
  return jax.tree_util.tree_unflatten(treedef, [fn(p, x) for p, x in zip(paths, leaves)])


def map_kernels(fn: Callable[[str, DeloraKernel], Any], tree: Any) -> Any:
  """Replaces every DeLoRA node ``k`` at ``path`` by ``fn(path, k)``."""
  paths, leaves, treedef = flatten(tree)
  new = [fn(p, x) if is_kernel(x) else x for p, x in zip(paths, leaves)]
  return jax.tree_util.tree_unflatten(treedef, new)


_NNX_EQUIVALENT = {
  "merge": "delora_jax.nnx.merge(model)",
  "unwrap": "delora_jax.nnx.unwrap(model)",
  "with_adapters": "delora_jax.load_adapters(path, model)",
}

# Model classes whose adapted kernels a front-end reads (the NNX front-end registers
# nnx.Module), so that this module needs no front-end: {class: model -> {path: kernel}}.
MODEL_KERNELS: dict[type, Callable[[Any], dict[str, DeloraKernel]]] = {}


def require_adapted(tree: Any, fn_name: str, nnx_ok: bool = False) -> dict[str, DeloraKernel]:
  """``{path: DeloraKernel}`` of an adapted Linen/State tree (or, with ``nnx_ok``, of an
  adapted NNX model); a clear error otherwise."""
  read = next((fn for cls, fn in MODEL_KERNELS.items() if isinstance(tree, cls)), None)
  if read is not None:
    if not nnx_ok:
      raise TypeError(
        f"`{fn_name}` takes a parameter tree; got an nnx.Module. For an NNX model adapted by "
        f"delora_jax.nnx.wrap use {_NNX_EQUIVALENT.get(fn_name, 'the delora_jax.nnx functions')}."
      )
    ks = read(tree)
    if not ks:
      raise ValueError(
        f"`{fn_name}` expects an NNX model adapted by `delora_jax.nnx.wrap`, but "
        "it holds no DeLoRA adapter. Call `delora_jax.nnx.wrap(model, rules)` first."
      )
    return ks
  ks = kernels(tree)
  if not ks:
    raise ValueError(
      f"`{fn_name}` expects a tree adapted by `delora_jax.wrap`, but it holds no "
      "DeLoRA-adapted kernel. Call `delora_jax.wrap(params, rules)` first."
    )
  return ks
