"""Trained plain leaves (heads, biases) in PEFT folders: ``modules_to_save`` and ``bias``."""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from delora_jax import _tree
from delora_jax._kernel import is_kernel
from delora_jax._split import _extra_matcher
from delora_jax.peft._config import read
from delora_jax.peft._names import PREFIX
from delora_jax.peft._rules import by_path, names_of

#: Flax leaf name -> torch parameter name (a 2-D ``kernel`` is the transposed ``weight``).
TORCH_PARAM = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def _module(module_names: Any, path: str) -> str | None:
  """The unstacked torch module of the plain leaf at ``path`` (its sibling kernel's name)."""
  parent = path.rpartition("/")[0]
  kpath = f"{parent}/kernel" if parent else "kernel"
  got = names_of(module_names, kpath, (1, 1))
  return got[0][0] if got is not None and got[1] == 0 else None


def leaf_names(tree: Any, module_names: Any) -> dict[str, tuple[str, str, bool]]:
  """``{path: (torch module, torch key after PREFIX, module adapted)}`` of plain leaves."""
  paths, leaves, _ = _tree.flatten(tree)
  adapted = {p.rpartition("/")[0] for p, x in zip(paths, leaves) if is_kernel(x)}
  out = {}
  for p, x in zip(paths, leaves):
    leaf = p.rpartition("/")[2]
    if is_kernel(x) or leaf not in TORCH_PARAM or not _tree.is_array_like(x):
      continue
    module = _module(module_names, p)
    if module is None:
      continue
    is_adapted = p.rpartition("/")[0] in adapted
    key = f"{module}.base_layer.bias" if is_adapted and leaf == "bias" else f"{module}.{TORCH_PARAM[leaf]}"
    out[p] = (module, key, is_adapted)
  return out


def _torch_value(path: str, x: Any) -> np.ndarray:
  x = np.asarray(jnp.asarray(x).astype(jnp.float32))
  return np.ascontiguousarray(x.T if path.endswith("kernel") and x.ndim == 2 else x)


def export_extras(tree: Any, module_names: Any, extra_trainable: Any) -> tuple[dict, list | None, str]:
  """``(tensors, modules_to_save, bias)`` for the leaves ``extra_trainable`` selects."""
  match = _extra_matcher(extra_trainable)
  paths, leaves, _ = _tree.flatten(tree)
  values = dict(zip(paths, leaves))
  names = leaf_names(tree, module_names)
  extras = [p for p in paths if not is_kernel(values[p]) and match(p)]
  if extra_trainable is not None and not extras:
    raise ValueError(
      f"`extra_trainable`={extra_trainable!r} matches no plain leaf of `tree`; "
      f"some paths: {_tree.sample_paths(paths)}. Fix the pattern."
    )
  saved, bias = set(), "none"
  for p in extras:
    if p not in names:
      leaf, kpath = p.rpartition("/")[2], p.rpartition("/")[0] + "/kernel"
      stacked = leaf in TORCH_PARAM and (names_of(module_names, kpath, (1, 1, 1)) or (0, 0))[1] > 0
      why = (
        f"its leaf name {leaf!r} is not one of {sorted(TORCH_PARAM)}"
        if leaf not in TORCH_PARAM
        else f"its module {kpath!r} is stacked (one torch module per slice), which PEFT "
        "folders cannot hold trained leaves of"
        if stacked
        else f"`module_names` gives no torch module for {kpath!r}"
      )
      raise ValueError(
        f"{p}: this extra_trainable leaf cannot be written to a PEFT folder: {why}. "
        "Map its module in `module_names` (a dict entry for the sibling "
        "'<module>/kernel' path) or leave it out of extra_trainable."
      )
    module, _, is_adapted = names[p]
    if not p.endswith("/bias"):
      if is_adapted:
        raise ValueError(
          f"{p}: PEFT cannot save a trained non-bias leaf of an adapted module "
          f"({module!r}); leave it out of extra_trainable."
        )
      saved.add(module)
  for p in extras:
    module, _, is_adapted = names[p]
    if p.endswith("/bias") and module not in saved:
      bias = "all" if not is_adapted else ("delora_only" if bias == "none" else bias)
  tensors = {}
  for p, (module, key, _) in names.items():
    if module in saved or (p in extras and p.endswith("/bias")):
      tensors[PREFIX + key] = _torch_value(p, values[p])
  return tensors, sorted(saved) or None, bias


def _file_key(key: str) -> str | None:
  """A PEFT key without the wrapper segments; None for copies of the frozen originals."""
  if ".original_module." in key:
    return None
  return re.sub(r"\.modules_to_save(\.default)?\.", ".", key)


def load_extras(tensors: dict[str, np.ndarray], tree: Any, module_names: Any) -> tuple[dict[str, Any], list[str]]:
  """``({leaf path: new value}, problems)`` of the non-adapter tensors of a PEFT file."""
  paths, leaves, _ = _tree.flatten(tree)
  values = dict(zip(paths, leaves))
  by_key = {key: p for p, (_, key, _) in leaf_names(tree, module_names).items()}
  out, problems = {}, []
  for raw, t in tensors.items():
    key = _file_key(raw[len(PREFIX) :] if raw.startswith(PREFIX) else raw)
    if key is None:
      continue
    p = by_key.get(key)
    if p is None:
      problems.append(
        f"{raw}: no leaf of the target tree maps to this tensor (a modules_to_save "
        "or bias leaf missing from the tree?); map its module in `module_names` "
        "('<flax path>/kernel' -> torch module; bias/scale siblings follow)"
      )
      continue
    want = values[p]
    got = np.asarray(t)
    got = got.T if p.endswith("kernel") and got.ndim == 2 else got
    if tuple(got.shape) != tuple(want.shape):
      problems.append(
        f"{raw}: shape {tuple(t.shape)} in the file, the tree's {p} needs "
        f"{tuple(want.shape)}{' (transposed)' if p.endswith('kernel') else ''}"
      )
      continue
    if jnp.issubdtype(want.dtype, jnp.floating) and not jnp.issubdtype(got.dtype, jnp.floating):
      problems.append(f"{raw}: dtype {got.dtype} in the file, the tree's {p} is {want.dtype}")
    elif jnp.issubdtype(got.dtype, jnp.floating) and not np.isfinite(got).all():
      problems.append(f"{raw}: {got.size - np.count_nonzero(np.isfinite(got))} of {got.size} entries are NaN or inf")
    else:
      out[p] = jnp.asarray(got).astype(want.dtype)
  return out, problems


def trainable(config: Any, params: Any, *, module_names: Any, model_type: str | None = None) -> list[str]:
  """The ``extra_trainable`` of :func:`delora_jax.split` that trains what PEFT trains.

  Besides the adapters, PEFT trains the modules in ``modules_to_save`` (all
  their parameters; a name matches a module with that name or that
  ``.``-suffix) and, with ``bias="all"``, every bias, with ``"delora_only"``
  the biases of the adapted modules. Returns one exact-path regex per such
  plain leaf of ``params``. A leaf's module is the one ``module_names`` gives
  for its sibling ``kernel``; leaves whose module it does not name (e.g.
  LayerNorm biases under ``bias="all"``, unless you map them) are not listed.

  Args:
    config: a PEFT adapter folder, its ``adapter_config.json``, a dict or a
      ``peft.DeloraConfig``.
    params: the plain Flax parameters.
    module_names: Flax kernel path -> torch module name, as for
      :func:`delora_jax.peft.rules`.
    model_type: as for :func:`delora_jax.peft.rules`.

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> params = {"lin0": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
    ...           "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
    >>> cfg = {"target_modules": ["lin0"], "bias": "delora_only", "modules_to_save": ["head"]}
    >>> delora_jax.peft.trainable(cfg, params, module_names=lambda p: p.split("/")[0])
    ['head/bias', 'head/kernel', 'lin0/bias']
  """
  cfg, source = read(config)
  adapted = {p.rpartition("/")[0] for p in by_path(cfg, source, params, module_names, model_type, "float32")}
  saved = cfg["modules_to_save"] or []
  paths, leaves, _ = _tree.flatten(params)
  out = []
  for p, x in zip(paths, leaves):
    parent, _, leaf = p.rpartition("/")
    module = _module(module_names, p)
    if is_kernel(x) or leaf not in TORCH_PARAM or module is None:
      continue
    in_saved = any(module == m or module.endswith("." + m) for m in saved)
    is_bias = leaf == "bias" and (cfg["bias"] == "all" or (cfg["bias"] == "delora_only" and parent in adapted))
    if in_saved or is_bias:
      out.append(re.escape(p))
  return sorted(out)
