"""`delora_jax.peft.load`: a PEFT DeLoRA adapter folder into an adapted tree."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from delora_jax import _tree
from delora_jax._lora import check_base_norms
from delora_jax._peft_names import (CONFIG, PREFIX, WEIGHTS, check_linear, is_targeted,
                                    pattern_value, resolve_all, safetensors_numpy)
from delora_jax._wrap import with_adapters

_KEY = re.compile(re.escape(PREFIX) + r"(.+)\.(delora_A|delora_B|delora_lambda|delora_w_norm)")


def _read(directory: str | os.PathLike) -> tuple[str, dict, dict]:
  path = os.path.abspath(os.fspath(directory))
  cfg_file, w_file = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
  for f in (cfg_file, w_file):
    if not os.path.isfile(f):
      raise ValueError(f"peft.load: {f!r} does not exist; `directory` must be a PEFT adapter "
                       "folder written by save_pretrained or delora_jax.peft.export.")
  try:
    with open(cfg_file) as fh:
      config = json.load(fh)
    tensors = safetensors_numpy().load_file(w_file)
  except Exception as e:  # json / safetensors raise their own error types
    raise ValueError(f"peft.load: the adapter files in {path!r} are unreadable ({type(e).__name__}: "
                     f"{e}).") from e
  if not isinstance(config, dict) or config.get("peft_type") != "DELORA":
    got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
    raise ValueError(f"peft.load: {cfg_file!r} has peft_type {got!r}, expected 'DELORA'. Only PEFT "
                     "DeLoRA adapters (peft.DeloraConfig) can be loaded into a DeLoRA tree.")
  for key in ("r", "delora_lambda"):
    if isinstance(config.get(key), bool) or not isinstance(config.get(key), (int, float)):
      raise ValueError(f"peft.load: {cfg_file!r} has {key}={config.get(key)!r}, expected a number.")
  return path, config, tensors


def _group(tensors: dict, path: str) -> dict[str, dict[str, np.ndarray]]:
  modules: dict[str, dict[str, np.ndarray]] = {}
  unknown = []
  for key, value in tensors.items():
    m = _KEY.fullmatch(key)
    if m is None:
      unknown.append(key)
    else:
      modules.setdefault(m[1], {})[m[2]] = value
  if unknown:
    raise ValueError(f"peft.load: {path!r} holds tensors that are not DeLoRA adapter weights: "
                     f"{_tree.sample_paths(sorted(unknown))}. Only adapters without "
                     "modules_to_save can be loaded.")
  return modules


def _module(name: str, got: dict, config: dict, k: Any, path: str) -> list[str]:
  """Problems of one module's tensors against the config and the target kernel."""
  n_in, n_out = k.a.shape[-2], k.b.shape[-1]
  r_cfg = pattern_value(config.get("rank_pattern") or {}, name, config["r"])
  out = []
  if not is_targeted(config.get("target_modules"), name):
    out.append(f"{name}: not selected by target_modules={config.get('target_modules')!r}")
  if r_cfg != k.rank:
    out.append(f"{name} ({path}): rank {r_cfg} in adapter_config.json, {k.rank} in the target tree")
  missing = sorted({"delora_A", "delora_B", "delora_lambda", "delora_w_norm"} - set(got))
  if missing:
    return out + [f"{name}: tensors {missing} missing"]
  want = {"delora_A": (r_cfg, n_in), "delora_B": (n_out, r_cfg), "delora_lambda": (1,),
          "delora_w_norm": (n_in,)}
  for field, shape in want.items():
    if tuple(got[field].shape) != shape:
      out.append(f"{name}.{field}: shape {tuple(got[field].shape)} in the file, expected {shape} "
                 f"(rank {r_cfg}, kernel {path} viewed as ({n_in}, {n_out}))")
  lam = got["delora_lambda"]
  if lam.size and not np.all(np.isfinite(lam.astype(np.float64))):
    out.append(f"{name}.delora_lambda: {lam.tolist()} is not finite")
  return out


def _stack(arrays: list[np.ndarray], like: Any) -> Any:
  """The per-module arrays as one array shaped, typed and placed like ``like``."""
  x = jnp.asarray(np.stack(arrays).reshape(tuple(like.shape))).astype(like.dtype)
  sharding = getattr(like, "sharding", None)
  return jax.device_put(x, sharding) if isinstance(sharding, jax.sharding.Sharding) else x


def load(directory: str | os.PathLike, tree: Any, *, module_names: Any, flatten_nd: bool = False,
         check_base: bool = True) -> Any:
  """Returns ``tree`` with the adapters of a PEFT DeLoRA folder put in.

  Checks, before changing anything: ``peft_type`` is ``DELORA``; every module
  that ``module_names`` gives for ``tree``'s adapted kernels is in the file and
  targeted by the config, and the file holds no other module; each module's
  rank (``r``, or its ``rank_pattern`` entry) equals the tree's; tensor shapes
  fit the kernels; λ is finite; ``delora_w_norm`` matches the norms of
  ``tree``'s base kernels (a different base model is an error). Values are
  cast to the tree's adapter dtypes.

  Args:
    directory: a folder from ``PeftModel.save_pretrained`` (DeLoRA) or
      :func:`delora_jax.peft.export`.
    tree: the adapted target (``delora_jax.wrap`` with matching ranks).
    module_names: Flax path -> torch module name(s), as for :func:`export`.
    flatten_nd: accept N-D kernels whose matrix view is the Linear weight.
    check_base: compare ``delora_w_norm`` with the tree's base kernels.

  Example:
    >>> import tempfile, jax, delora_jax
    >>> w = jax.random.normal(jax.random.key(0), (12, 32))
    >>> tree = delora_jax.wrap({"lin0": {"kernel": w}}, {"lin0/kernel": 4})
    >>> names = {"lin0/kernel": "lin0"}
    >>> out = delora_jax.peft.export(tree, tempfile.mkdtemp(), module_names=names)
    >>> back = delora_jax.peft.load(out, tree, module_names=names)
    >>> bool((back["lin0"]["kernel"].a == tree["lin0"]["kernel"].a).all())
    True
  """
  ks = _tree.require_adapted(tree, "peft.load")
  for p, k in ks.items():
    check_linear(p, k, flatten_nd, "peft.load")
  names = resolve_all(module_names, ks)
  path, config, tensors = _read(directory)
  modules = _group(tensors, path)
  wanted = {n for ns in names.values() for n in ns}
  problems = [f"{n}: adapted in the target tree ({p}), absent from the file"
              for p, ns in names.items() for n in ns if n not in modules]
  problems += [f"{n}: in the file, not adapted in the target tree" for n in modules if n not in wanted]
  for p, ns in names.items():
    for n in ns:
      if n in modules:
        problems += _module(n, modules[n], config, ks[p], p)
  if problems:
    shown = "\n  ".join(problems[:8])
    more = f"\n  ... ({len(problems)} problems in all)" if len(problems) > 8 else ""
    raise ValueError(f"peft.load: the adapter in {path!r} does not fit the target tree:\n  {shown}"
                     f"{more}\nWrap the tree with the adapter's ranks and targets and check "
                     "`module_names`. Nothing was loaded.")
  new = {}
  for p, k in ks.items():
    per = [modules[n] for n in names[p]]
    new[p] = {"a": _stack([m["delora_A"].T for m in per], k.a),
              "b": _stack([m["delora_B"].T for m in per], k.b),
              "lam": _stack([m["delora_lambda"].reshape(()) for m in per], k.lam),
              "w_norm": _stack([m["delora_w_norm"] for m in per], k.w_norm)}
    if check_base:
      stored = np.stack([m["delora_w_norm"] for m in per]).reshape(tuple(k.w_norm.shape))
      check_base_norms(p, k, stored, f"the PEFT adapter {path!r}")
  return with_adapters(tree, new)
