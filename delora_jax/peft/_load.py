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
from delora_jax._wrap import live_slices, with_adapters, wrap
from delora_jax.peft import _config as _peft_config
from delora_jax.peft._config import pattern_value, resolve_targets, targeted
from delora_jax.peft._extras import load_extras
from delora_jax.peft._names import CONFIG, PREFIX, WEIGHTS, check_linear, resolve_all, safetensors_numpy
from delora_jax.peft._rules import rules as config_rules

FIELDS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
_KEY = re.compile(re.escape(PREFIX) + r"(.+)\.(" + "|".join(FIELDS) + ")")


def _read(directory: str | os.PathLike) -> tuple[str, dict, dict]:
  path = os.path.abspath(os.fspath(directory))
  cfg_file, w_file = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
  for f in (cfg_file, w_file):
    if not os.path.isfile(f):
      raise ValueError(
        f"peft.load: {f!r} does not exist; `directory` must be a PEFT adapter "
        "folder written by save_pretrained or delora_jax.peft.export."
      )
  try:
    with open(cfg_file) as fh:
      config = json.load(fh)
    tensors = safetensors_numpy().load_file(w_file)
  except Exception as e:  # json / safetensors raise their own error types
    raise ValueError(f"peft.load: the adapter files in {path!r} are unreadable ({type(e).__name__}: {e}).") from e
  if not isinstance(config, dict):
    raise ValueError(
      f"peft.load: {cfg_file!r} holds a {type(config).__name__}, expected a JSON "
      "object of DeloraConfig fields (peft_type 'DELORA')."
    )
  try:
    config = _peft_config.check(_peft_config.plain(config, cfg_file), cfg_file)
  except ValueError as e:
    raise ValueError(f"peft.load: {e}") from None
  return path, config, tensors


def _group(tensors: dict) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
  modules: dict[str, dict[str, np.ndarray]] = {}
  others = {}
  for key, value in tensors.items():
    m = _KEY.fullmatch(key)
    if m is None:
      others[key] = value
    else:
      modules.setdefault(m[1], {})[m[2]] = value
  return modules, others


def _own(name: str, got: dict, rank: int) -> list[str]:
  """Problems of one module's tensors on their own: dtypes, NaN/inf, the config's ``rank``."""
  out = []
  for field in FIELDS:
    x = got.get(field)
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      out.append(f"{name}.{field}: dtype {x.dtype} in the file, where PEFT writes a float tensor")
    elif x is not None and not np.isfinite(x).all():
      out.append(f"{name}.{field}: {x.size - np.count_nonzero(np.isfinite(x))} of {x.size} entries are NaN or inf")
  a, b = got.get("delora_A"), got.get("delora_B")
  if (a is not None and a.shape[:1] != (rank,)) or (b is not None and b.shape[-1:] != (rank,)):
    shapes = ", ".join(f"{f} {tuple(got[f].shape)}" for f in ("delora_A", "delora_B") if f in got)
    out.append(f"{name}: rank {rank} in adapter_config.json (`r` or its rank_pattern entry), but {shapes} in the file")
  return out


def _module(name: str, got: dict, config: dict, targets: Any, k: Any, path: str) -> list[str]:
  """Problems of one module's tensors against the config and the target kernel."""
  n_in, n_out = k.a.shape[-2], k.b.shape[-1]
  r_cfg = pattern_value(config["rank_pattern"], name, config["r"])
  out = []
  if not targeted(config, name, targets):
    out.append(f"{name}: not selected by target_modules={config.get('target_modules')!r}")
  if r_cfg != k.rank:
    out.append(f"{name} ({path}): rank {r_cfg} in adapter_config.json, {k.rank} in the target tree")
  missing = sorted(set(FIELDS) - set(got))
  if missing:
    return out + [f"{name}: tensors {missing} missing"]
  want = {"delora_A": (r_cfg, n_in), "delora_B": (n_out, r_cfg), "delora_lambda": (1,), "delora_w_norm": (n_in,)}
  for field, shape in want.items():
    if tuple(got[field].shape) != shape:
      out.append(
        f"{name}.{field}: shape {tuple(got[field].shape)} in the file, expected {shape} "
        f"(rank {r_cfg}, kernel {path} viewed as ({n_in}, {n_out}))"
      )
  return out


def _stack(arrays: list[np.ndarray], like: Any) -> Any:
  """The per-module arrays as one array shaped, typed and placed like ``like``."""
  x = jnp.asarray(np.stack(arrays).reshape(tuple(like.shape))).astype(like.dtype)
  sharding = getattr(like, "sharding", None)
  return jax.device_put(x, sharding) if isinstance(sharding, jax.sharding.Sharding) else x


def _problems(
  config: dict, source: str, model_type: str | None, modules: dict, names: dict, ks: dict, live: dict
) -> list[str]:
  all_names = [n for ns in names.values() for n in ns]
  try:
    targets = resolve_targets(config, source, all_names, model_type)
  except ValueError as e:
    return [str(e)]
  wanted = {n for p, ns in names.items() for n, on in zip(ns, live[p]) if on}
  problems = [
    f"{n}: adapted in the target tree ({p}), absent from the file"
    for p, ns in names.items()
    for n, on in zip(ns, live[p])
    if on and n not in modules
  ]
  problems += [f"{n}: in the file, not adapted in the target tree" for n in modules if n not in wanted]
  for p, ns in names.items():
    for n, on in zip(ns, live[p]):
      if on and n in modules:
        problems += _module(n, modules[n], config, targets, ks[p], p)
  return problems


def _unfit(path: str, problems: list[str], fix: str, what: str = "is not loadable") -> ValueError:
  shown = "\n  ".join(problems[:8])
  more = f"\n  ... ({len(problems)} problems in all)" if len(problems) > 8 else ""
  return ValueError(f"peft.load: the adapter in {path!r} {what}:\n  {shown}{more}\n{fix} Nothing was loaded.")


def _arrays(k: Any, per: list[dict | None]) -> dict[str, Any]:
  """The kernel's new adapter arrays; slices that are not adapted (None) stay zero."""
  n_in, n_out, r = k.a.shape[-2], k.b.shape[-1], k.rank
  zeros = {
    "delora_A": np.zeros((r, n_in), np.float32),
    "delora_B": np.zeros((n_out, r), np.float32),
    "delora_lambda": np.zeros(1, np.float32),
    "delora_w_norm": np.zeros(n_in, np.float32),
  }
  full = [m if m is not None else zeros for m in per]
  return {
    "a": _stack([m["delora_A"].T for m in full], k.a),
    "b": _stack([m["delora_B"].T for m in full], k.b),
    "lam": _stack([m["delora_lambda"].reshape(()) for m in full], k.lam),
    "w_norm": _stack([m["delora_w_norm"] for m in full], k.w_norm),
  }


def _kept_in(x: np.ndarray) -> Any:
  """The coarsest of bfloat16 / float16 that holds ``x`` exactly, else None: low-precision
  adapters keep their norm in that dtype, and export writes it as float32."""
  for dtype in (jnp.bfloat16, jnp.float16):
    if np.array_equal(x.astype(dtype).astype(x.dtype), x):
      return dtype
  return None


def _check_base(p: str, k: Any, per: list[dict | None], source: str) -> None:
  on = [m is not None for m in per]
  stored = np.stack([m["delora_w_norm"] for m in per if m is not None])
  if all(on):
    check_base_norms(p, k, stored.reshape(tuple(k.w_norm.shape)), source, kept_in=_kept_in(stored))
    return
  n_stack = k.w.ndim - len(k.in_axes) - len(k.out_axes)
  w = jnp.asarray(k.w).reshape((-1,) + tuple(k.w.shape[n_stack:]))[np.asarray(on)]
  check_base_norms(p, k.replace(w=w), stored, source, kept_in=_kept_in(stored))


def load(
  directory: str | os.PathLike,
  tree: Any,
  *,
  module_names: Any,
  flatten_nd: bool = False,
  check_base: bool = True,
  model_type: str | None = None,
) -> Any:
  """Returns ``tree`` with the adapters (and trained heads, biases) of a PEFT DeLoRA folder.

  ``tree`` is either plain parameters, which are first wrapped with the
  folder's own config (:func:`delora_jax.peft.rules`), or an adapted tree.
  Checks, before changing anything: the config is a well-formed DeloraConfig
  (a ``ValueError`` names the file and key otherwise); every module that
  ``module_names`` gives for ``tree``'s adapted kernels (adapted slices only,
  see ``Rule.slices``) is in the file and targeted by the config, and the file
  holds no other module; each module's rank (``r``, or its ``rank_pattern``
  entry) equals its tensors' (before anything is allocated) and the tree's;
  tensor shapes fit the kernels; every tensor is a float tensor without NaN or inf;
  ``delora_w_norm`` matches the norms of ``tree``'s base kernels (a different
  base model is an error; a norm PEFT rounded to a bf16/fp16 base's dtype is
  accepted); every other tensor (``modules_to_save`` modules, ``bias="all"`` /
  ``"delora_only"`` biases) maps to a plain leaf of ``tree`` of the same
  shape. The result's adapters use the folder's ``module_dropout``. Values are
  cast to the tree's dtypes. Nothing is changed if any check fails.

  Args:
    directory: a folder from ``PeftModel.save_pretrained`` (DeLoRA) or
      :func:`delora_jax.peft.export`.
    tree: plain params, or an adapted target (``delora_jax.wrap`` with matching
      ranks).
    module_names: Flax kernel path -> torch module name(s), as for
      :func:`export`; a head's or bias's module is its sibling ``kernel``'s.
    flatten_nd: accept N-D kernels whose matrix view is the Linear weight.
    check_base: compare ``delora_w_norm`` with the tree's base kernels.
    model_type: Hugging Face ``model_type`` for a config whose
      ``target_modules`` is ``None`` (see :func:`rules`).

  Example:
    >>> import tempfile, jax, delora_jax
    >>> w = jax.random.normal(jax.random.key(0), (12, 32))
    >>> tree = delora_jax.wrap({"lin0": {"kernel": w}}, {"lin0/kernel": 4})
    >>> names = {"lin0/kernel": "lin0"}
    >>> out = delora_jax.peft.export(tree, tempfile.mkdtemp(), module_names=names)
    >>> back = delora_jax.peft.load(out, tree, module_names=names)
    >>> bool((back["lin0"]["kernel"].a == tree["lin0"]["kernel"].a).all())
    True
    >>> fresh = delora_jax.peft.load(out, {"lin0": {"kernel": w}}, module_names=names)  # plain
    >>> bool((fresh["lin0"]["kernel"].a == tree["lin0"]["kernel"].a).all())
    True
  """
  path, config, tensors = _read(directory)
  modules, others = _group(tensors)
  broken = [
    problem
    for n, got in modules.items()
    for problem in _own(n, got, pattern_value(config["rank_pattern"], n, config["r"]))
  ]
  if broken:  # before anything is allocated for the config's ranks
    raise _unfit(path, broken, "The folder is damaged or was not written by PEFT's DeLoRA; export it again.")
  if not _tree.kernels(tree):
    try:
      tree = wrap(
        tree, config_rules(os.path.join(path, CONFIG), tree, module_names=module_names, model_type=model_type)
      )
    except ValueError as e:
      raise ValueError(f"peft.load: {e}") from None
  ks = _tree.require_adapted(tree, "peft.load")
  for p, k in ks.items():
    check_linear(p, k, flatten_nd, "peft.load")
  names = resolve_all(module_names, ks)
  live = {p: live_slices(k).tolist() if k.lam.ndim else [True] for p, k in ks.items()}
  problems = _problems(config, os.path.join(path, CONFIG), model_type, modules, names, ks, live)
  extras, extra_problems = load_extras(others, tree, module_names)
  problems += extra_problems
  if problems:
    raise _unfit(
      path,
      problems,
      "Wrap the tree with the adapter's ranks and targets (or pass plain params) and check `module_names`.",
      "does not fit the target tree",
    )
  new = {}
  for p, k in ks.items():
    per = [modules[n] if on else None for n, on in zip(names[p], live[p])]
    new[p] = _arrays(k, per)
    if check_base:
      _check_base(p, k, per, f"the PEFT adapter {path!r}")
  out = with_adapters(tree, new)
  dropout = float(config["module_dropout"])
  out = _tree.map_kernels(lambda _, k: k.replace(dropout=dropout), out)
  return _tree.map_leaves(lambda p, x: extras.get(p, x), out)
