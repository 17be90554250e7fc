"""Writing PEFT folders: DeLoRA (``export``) and LoRA (``export_lora``) adapter files."""

from __future__ import annotations

import collections
import json
import math
import os
import tempfile
from typing import Any

import jax.numpy as jnp
import numpy as np

from delora_jax import _tree
from delora_jax._lora import to_lora
from delora_jax._wrap import _compile, live_slices, selects
from delora_jax.peft._extras import export_extras
from delora_jax.peft._names import CONFIG, PREFIX, WEIGHTS, check_linear, pattern_key, resolve_all, safetensors_numpy


def _slices(x: Any, n_stack: int) -> np.ndarray:
  x = np.asarray(jnp.asarray(x).astype(jnp.float32))
  return x.reshape((math.prod(x.shape[:n_stack]),) + x.shape[n_stack:])


def _default_and_pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  default = collections.Counter(values.values()).most_common(1)[0][0]
  return default, {pattern_key(n): v for n, v in values.items() if v != default}


def _write_json(file: str, config: dict) -> None:
  with open(file, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def _write(directory: str | os.PathLike, config: dict, tensors: dict[str, np.ndarray]) -> str:
  """Writes both files, each to a temporary name first, then renamed into place."""
  path = os.path.abspath(os.fspath(directory))
  os.makedirs(path, exist_ok=True)
  save = safetensors_numpy().save_file
  for name, write in (
    (WEIGHTS, lambda f: save(tensors, f, metadata={"format": "pt"})),
    (CONFIG, lambda f: _write_json(f, config)),
  ):
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path)
    os.close(fd)
    try:
      write(tmp)
      os.replace(tmp, os.path.join(path, name))
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return path


def _dropout(ks: dict) -> float:
  drops = sorted({float(k.dropout) for k in ks.values()})
  if len(drops) > 1:
    raise ValueError(
      f"The adapted kernels use different dropout rates {drops}; PEFT has one "
      "module_dropout per adapter. Use one Rule dropout for all kernels to export."
    )
  return drops[0]


def _initial_lams(rules: Any, ks: dict) -> dict[str, float]:
  compiled = _compile(rules)
  out = {}
  for p in ks:
    rule = next((r for key, rx, r in compiled if selects(key, rx, p)), None)
    if rule is None:
      raise ValueError(
        f"{p}: no pattern of `rules` matches this adapted kernel; pass the rules "
        "the tree was wrapped with (or rules=None to record the trained λ)."
      )
    out[p] = rule.lam
  return out


def export(
  tree: Any,
  directory: str | os.PathLike,
  *,
  module_names: Any,
  rules: Any = None,
  flatten_nd: bool = False,
  extra_trainable: Any = None,
) -> str:
  """Writes the DeLoRA adapters of ``tree`` as a PEFT DeLoRA adapter folder.

  ``adapter_model.safetensors`` holds, per torch module ``m``,
  ``base_model.model.m.delora_A`` ``(r, in)`` (= ``a.T``), ``.delora_B``
  ``(out, r)`` (= ``b.T``), ``.delora_lambda`` ``(1,)`` (the trained λ) and
  ``.delora_w_norm`` ``(in,)``, float32. ``adapter_config.json`` has
  ``peft_type: DELORA``, ``target_modules`` (the exact module names), the most
  common rank and initial λ as ``r``/``delora_lambda`` and exact-name
  ``rank_pattern``/``lambda_pattern`` entries for the others, and
  ``module_dropout``. Slices of a stacked kernel that ``Rule.slices`` leaves
  out are not written (PEFT's ``layers_to_transform``).

  ``extra_trainable`` (the regexes given to :func:`delora_jax.split`) writes
  the trained plain leaves too, as PEFT does: a module with a trained
  non-bias leaf (a task head) goes to ``modules_to_save`` with all its
  leaves (``M.weight`` = ``kernel.T``, ``M.bias``); a trained bias of an
  adapted module is ``M.base_layer.bias`` (``bias="delora_only"``), of any
  other module ``M.bias`` (``bias="all"``). A leaf's module is the one
  ``module_names`` gives for its sibling ``kernel`` path.

  Args:
    tree: an adapted tree (2-D kernels, ``init`` "peft" or "random").
    directory: output folder (created; existing adapter files are replaced).
    module_names: Flax path -> torch module name(s) (module docstring).
    rules: the rules ``tree`` was wrapped with: their λ is written to the
      config as the initial λ. ``None`` writes the trained λ there.
    flatten_nd: allow N-D kernels (e.g. ``DenseGeneral``) whose matrix view is
      a torch ``nn.Linear``'s transposed weight.
    extra_trainable: regex(es) of trained plain leaves to write (above).

  Returns:
    The absolute path of the folder.

  Example:
    >>> import tempfile, jax, delora_jax
    >>> w = jax.random.normal(jax.random.key(0), (12, 32))
    >>> tree = delora_jax.wrap({"lin0": {"kernel": w}}, {"lin0/kernel": 4})
    >>> out = delora_jax.peft.export(tree, tempfile.mkdtemp(), module_names={"lin0/kernel": "lin0"})
    >>> import json, pathlib
    >>> json.loads(pathlib.Path(out, "adapter_config.json").read_text())["target_modules"]
    ['lin0']
  """
  ks = _tree.require_adapted(tree, "export")
  for p, k in ks.items():
    check_linear(p, k, flatten_nd, "export")
  names = resolve_all(module_names, ks)
  lam0 = _initial_lams(rules, ks) if rules is not None else None
  tensors, saved, bias = export_extras(tree, module_names, extra_trainable)
  ranks, lams = {}, {}
  for p, k in ks.items():
    n_stack = k.lam.ndim
    a, b = _slices(k.a, n_stack), _slices(k.b, n_stack)
    lam, w_norm = _slices(k.lam, n_stack), _slices(k.w_norm, n_stack)
    live = live_slices(k) if n_stack else [True]
    for i, name in enumerate(names[p]):
      if not live[i]:
        continue
      pre = PREFIX + name + "."
      tensors[pre + "delora_A"] = np.ascontiguousarray(a[i].T)
      tensors[pre + "delora_B"] = np.ascontiguousarray(b[i].T)
      tensors[pre + "delora_lambda"] = lam[i].reshape(1).copy()
      tensors[pre + "delora_w_norm"] = w_norm[i].copy()
      ranks[name] = k.rank
      lams[name] = lam0[p] if lam0 is not None else float(lam[i])
  r, rank_pattern = _default_and_pattern(ranks)
  lam_default, lambda_pattern = _default_and_pattern(lams)
  config = {
    "peft_type": "DELORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": True,
    "r": r,
    "delora_lambda": lam_default,
    "module_dropout": _dropout(ks),
    "target_modules": sorted(ranks),
    "exclude_modules": None,
    "bias": bias,
    "init_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": rank_pattern,
    "lambda_pattern": lambda_pattern,
    "modules_to_save": saved,
  }
  return _write(directory, config, tensors)


def export_lora(tree: Any, directory: str | os.PathLike, *, module_names: Any, flatten_nd: bool = False) -> str:
  """Writes the updates of ``tree`` as a plain PEFT LoRA adapter folder.

  Uses :func:`delora_jax.to_lora`: ``lora_A.weight = lora_a.T`` ``(r, in)``,
  ``lora_B.weight = lora_b.T`` ``(out, r)``, with ``lora_alpha = r`` for every
  module (``alpha_pattern`` mirrors ``rank_pattern``) so PEFT's scaling is 1 and
  ``PeftModel.from_pretrained`` reproduces the DeLoRA model's outputs with
  stock LoRA. Also works for ``init="paper"`` adapters (rank ``2r``). This is the
  serving route: JAX and torch LoRA servers (vLLM, sglang-jax, tunix's samplers)
  take LoRA adapters, and a DeLoRA update of rank ``r`` is exactly a rank-``r`` LoRA.

  Args:
    tree: an adapted tree from :func:`delora_jax.wrap`, or an NNX model from
      :func:`delora_jax.nnx.wrap` (MaxText's included). Stacked (scanned) kernels
      give one module per layer, wherever their layer axis sits.
    directory: the folder to write (``adapter_config.json``,
      ``adapter_model.safetensors``).
    module_names: Flax path -> torch module name(s), as for :func:`export`: a
      dict, or a function of the path; for a stacked kernel a template with
      ``{}`` for the layer index (``"model.layers.{}.self_attn.q_proj"``).
    flatten_nd: write N-D kernels (attention's ``(embed, heads, head_dim)``)
      as ``nn.Linear`` weights of the flattened sizes (inputs, then outputs,
      row-major); the torch model must hold them that way.

  Returns:
    The folder written.

  Example:
    >>> import tempfile, jax, delora_jax
    >>> w = jax.random.normal(jax.random.key(0), (12, 32))
    >>> tree = delora_jax.wrap({"lin0": {"kernel": w}}, {"lin0/kernel": 4})
    >>> out = delora_jax.peft.export_lora(tree, tempfile.mkdtemp(), module_names={"lin0/kernel": "lin0"})
    >>> import json, pathlib
    >>> cfg = json.loads(pathlib.Path(out, "adapter_config.json").read_text())
    >>> cfg["peft_type"], cfg["r"], cfg["lora_alpha"]
    ('LORA', 4, 4)
  """
  ks = _tree.require_adapted(tree, "export_lora", nnx_ok=True)
  for p, k in ks.items():
    check_linear(p, k, flatten_nd, "export_lora")
  names = resolve_all(module_names, ks)
  factors = to_lora(tree)
  tensors, ranks = {}, {}
  for p, f in factors.items():  # lora_a (*S, in, r), lora_b (*S, r, out): stacked axes first
    la, lb = (_slices(f[n], f[n].ndim - 2) for n in ("lora_a", "lora_b"))
    for i, name in enumerate(names[p]):
      tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(la[i].T)
      tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lb[i].T)
      ranks[name] = int(la.shape[-1])
  r, rank_pattern = _default_and_pattern(ranks)
  config = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": True,
    "r": r,
    "lora_alpha": r,
    "rank_pattern": rank_pattern,
    "alpha_pattern": dict(rank_pattern),
    "target_modules": sorted(ranks),
    "lora_dropout": _dropout(ks),
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
  }
  return _write(directory, config, tensors)
