"""Trainable / frozen halves of an adapted tree (equinox-style `split` / `combine`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

from delora_jax import _tree
from delora_jax._kernel import FROZEN_FIELDS, TRAINABLE_FIELDS, DeloraKernel, is_kernel


def _extra_matcher(extra_trainable: str | Sequence[str] | None):
  if extra_trainable is None:
    return lambda path: False
  if not isinstance(extra_trainable, (str, list, tuple)):
    raise TypeError(
      "`extra_trainable` must be a regex string or a list of them (e.g. "
      f"'head/.*' or ['.*bias']); got {extra_trainable!r}."
    )
  pats = [extra_trainable] if isinstance(extra_trainable, str) else list(extra_trainable)
  compiled = []
  for p in pats:
    if not isinstance(p, str):
      raise TypeError(f"`extra_trainable` must be regex strings; got {p!r}.")
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"`extra_trainable` pattern {p!r} is not a valid regular expression ({e}).") from None
  return lambda path: any(c.fullmatch(path) for c in compiled)


def _none_fields(k: DeloraKernel, fields) -> DeloraKernel:
  return k.replace(**dict.fromkeys(fields))


def split(tree: Any, *, extra_trainable: str | Sequence[str] | None = None) -> tuple[Any, Any]:
  """Splits an adapted tree into ``(trainable, frozen)`` halves.

  Both halves have the tree's structure with ``None`` holes: ``trainable``
  holds each adapter's ``a``, ``b``, ``lam`` (and any leaf whose path matches
  ``extra_trainable``, e.g. a task head); ``frozen`` holds the rest (the base
  kernels, ``w_norm``, biases, ...). Differentiate only ``trainable`` so no
  gradient of a frozen kernel is ever formed. :func:`combine` undoes it.

  Args:
    tree: an adapted tree from :func:`delora_jax.wrap`.
    extra_trainable: regex(es) matched with ``re.fullmatch`` against the paths
      of plain leaves that should train too (``".*bias"`` is PEFT's
      ``bias="all"``; ``"head/.*"`` a new classifier).

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}, {"kernel": 2})
    >>> trainable, frozen = delora_jax.split(tree)
    >>> trainable["bias"] is None, frozen["kernel"].a is None
    (True, True)
    >>> delora_jax.combine(trainable, frozen)["bias"] is tree["bias"]
    True
  """
  extra = _extra_matcher(extra_trainable)
  paths, leaves, treedef = _tree.flatten(tree)
  train: list[Any] = []
  frozen: list[Any] = []
  for p, x in zip(paths, leaves):
    if is_kernel(x):
      train.append(_none_fields(x, FROZEN_FIELDS))
      frozen.append(_none_fields(x, TRAINABLE_FIELDS))
    elif extra(p):
      train.append(x)
      frozen.append(None)
    else:
      train.append(None)
      frozen.append(x)
  unflat = jax.tree_util.tree_unflatten
  return unflat(treedef, train), unflat(treedef, frozen)


def _holes_flatten(tree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or is_kernel(x))
  return [_tree.path_str(p) for p, _ in leaves], [x for _, x in leaves], treedef


def _pick(path: str, field: str, t: Any, f: Any) -> Any:
  if t is not None and f is not None:
    raise ValueError(
      f"combine: {path}{field} is present in both halves; expected it in "
      "exactly one. Pass the two halves `delora_jax.split` returned."
    )
  return f if t is None else t


def combine(trainable: Any, frozen: Any) -> Any:
  """Inverse of :func:`split`: fills the ``None`` holes of each half from the other.

  Raises:
    ValueError: if the halves do not come from the same tree (different
      structure, adapted kernels or layouts, or a leaf present in both).

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2})
    >>> t, f = delora_jax.split(tree)
    >>> delora_jax.combine(t, f)["kernel"].w is tree["kernel"].w
    True
  """
  tp, tl, tdef = _holes_flatten(trainable)
  fp, fl, fdef = _holes_flatten(frozen)
  if tdef != fdef:
    where = next((f"at {a!r} vs {b!r}" for a, b in zip(tp, fp) if a != b), f"({len(tp)} vs {len(fp)} leaves)")
    raise ValueError(
      "combine: the trainable and frozen halves have different structures "
      f"{where}. Pass the two halves that `delora_jax.split` returned for the same tree."
    )
  out = []
  for p, t, f in zip(tp, tl, fl):
    if is_kernel(t) != is_kernel(f):
      raise ValueError(f"combine: {p} is a DeLoRA kernel in one half only.")
    if is_kernel(t):
      if (t.in_axes, t.out_axes, t.stack, t.dropout) != (f.in_axes, f.out_axes, f.stack, f.dropout):
        raise ValueError(f"combine: {p} has different layouts in the two halves.")
      fields = TRAINABLE_FIELDS + FROZEN_FIELDS
      out.append(t.replace(**{k: _pick(p, "." + k, getattr(t, k), getattr(f, k)) for k in fields}))
    else:  # a leaf that is None in both halves was None in the tree split
      out.append(_pick(p, "", t, f))
  return jax.tree_util.tree_unflatten(tdef, out)


def trainable_mask(tree: Any, *, extra_trainable: str | Sequence[str] | None = None) -> Any:
  """A bool tree, True on trainable leaves (``a``, ``b``, ``lam``, extras).

  For ``optax.masked`` / ``optax.partition`` on the full adapted tree; note that
  ``optax.masked`` passes masked-out updates through unchanged, so pair it
  with ``optax.set_to_zero`` (or use :func:`delora_jax.optimizer`).

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}, {"kernel": 2})
    >>> m = delora_jax.trainable_mask(tree)
    >>> m["bias"], m["kernel"].a, m["kernel"].w
    (False, True, False)
  """
  extra = _extra_matcher(extra_trainable)
  paths, leaves, treedef = _tree.flatten(tree)
  out = []
  for p, x in zip(paths, leaves):
    if is_kernel(x):
      out.append(
        x.replace(
          **{
            f: (f in TRAINABLE_FIELDS) if getattr(x, f) is not None else None for f in TRAINABLE_FIELDS + FROZEN_FIELDS
          }
        )
      )
    else:
      out.append(bool(extra(p)))
  return jax.tree_util.tree_unflatten(treedef, out)
