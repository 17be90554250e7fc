"""DeLoRA in MaxText: a drop-in for MaxText's LoRA hook, ``maxtext.utils.lora_utils.apply_lora_to_model``.

MaxText (0.2.5, Flax NNX, ``enable_nnx=True``) wires LoRA into its trainers in one function,
``apply_lora_to_model(model, mesh, config)``, which applies qwix's LoRA. :func:`apply_delora_to_model`
has the same signature and contract: it reads the same ``lora`` config keys (``enable_lora``,
``lora_rank``, ``lora_module_path``), adapts the same modules, and returns the model with adapters
typed :class:`delora_jax.nnx.DeloraParam` (an ``nnx.LoRAParam``), so MaxText's SFT trainer and tunix's
``PeftTrainer`` train only ``a``, ``b`` and λ. Unlike MaxText's LoRA, the adapters are sharded like
their kernels (from the kernels' logical axes and the config's ``logical_axis_rules``), not replicated
on every chip, and MaxText's default ``scan_layers=True, param_scan_axis=1`` works as well as
unrolled layers.

Importing this module does not import MaxText; calling :func:`apply_delora_to_model` does (for the
default module paths of MaxText's model families, when ``lora_module_path`` is empty).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from delora_jax import _kernel, _lora, _nnx, _sharding, _wrap
from delora_jax import nnx as delora_nnx
from delora_jax._rule import Modules, Rule, is_module_kernel

__all__ = ["apply_delora_to_model", "module_path", "to_maxtext_lora"]

# The metadata keys flax versions use for a Variable's logical axis names (newest first).
_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")
_LORA_KEYS = ("enable_lora", "lora_rank", "lora_module_path")


def _lora_config(config: Any) -> Any:
  lora = getattr(config, "lora", None)
  missing = [k for k in _LORA_KEYS if lora is None or not hasattr(lora, k)]
  if missing:
    raise ValueError(
      f"apply_delora_to_model: `config` has no `lora.{missing[0]}` (expected a MaxText config, from "
      "maxtext.configs.pyconfig.initialize, with the `lora` keys enable_lora, lora_rank and "
      f"lora_module_path; got a {type(config).__name__}). Pass MaxText's config, with e.g. "
      "lora.enable_lora=True lora.lora_rank=16 in its overrides."
    )
  return lora


def module_path(config: Any) -> str:
  """The module-path regex MaxText's LoRA would adapt for ``config``.

  ``config.lora.lora_module_path`` when it is set; otherwise MaxText's default for the model
  family (``configs/post_train/lora_module_path.yml``, chosen by ``model_name``, with the layer
  index made optional so that scanned and unrolled layers match), as MaxText computes it.

  Args:
    config: a MaxText config (``maxtext.configs.pyconfig.initialize``).

  Returns:
    A regex over ``/``-joined module paths, matched whole (``re.fullmatch``, as qwix does).
  """
  lora = _lora_config(config)
  if lora.lora_module_path:
    return str(lora.lora_module_path)
  from maxtext.utils import lora_utils  # noqa: PLC0415 (MaxText only when it is used)

  return str(lora_utils._get_lora_module_path(config))  # noqa: SLF001 (MaxText's own default table)


def _dummy_inputs(mesh: Any) -> dict[str, Any]:
  """One-token decoder inputs whose batch and length split over ``mesh`` as MaxText's activations do
  (what MaxText passes to qwix to find the modules' contractions)."""
  batch, length = 1, 1
  shape = dict(mesh.shape) if mesh is not None else {}
  for axis in ("data", "fsdp", "fsdp_transpose", "expert"):
    batch *= shape.get(axis, 1)
  for axis in ("tensor_sequence", "context"):
    length *= shape.get(axis, 1)
  tokens = jnp.zeros((batch, length), jnp.int32)
  return {"decoder_input_tokens": tokens, "decoder_positions": tokens, "enable_dropout": False}


def _names(var: nnx.Variable) -> tuple[str | None, tuple[Any, ...] | None]:
  """(metadata key, logical axis names) of a Variable; (None, None) when it declares none."""
  meta = var.get_metadata()
  for key in _NAME_KEYS:
    names = meta.get(key)
    if isinstance(names, (tuple, list, PartitionSpec)):
      return key, tuple(names)
  return None, None


def _logical(entries: tuple[Any, ...], kernel_names: tuple[Any, ...], kernel_spec: tuple[Any, ...]) -> tuple:
  """Logical names for an adapter array whose mesh entries are ``entries``: each dim takes the name
  of a kernel axis split over the same mesh axes (None where unsplit)."""
  out: list[Any] = []
  for e in entries:
    if e is None:
      out.append(None)
      continue
    name = next((n for n, k in zip(kernel_names, kernel_spec) if k == e and n is not None), None)
    out.append(name)
  return tuple(out)


def _lead_spec(spec: PartitionSpec, stack: tuple[int, ...], field: str) -> PartitionSpec:
  """``spec`` of an adapter field in the Linen layout (one entry per axis, padding axes included,
  as ``_sharding.kernel_specs`` gives it), for the array an NNX adapter stores (its stacked axes
  first, no padding axes: ``Adapter.stored``)."""
  nb = _kernel.BODY_NDIM[field]
  stacks = _kernel._field_stacks(stack, nb, len(spec))  # noqa: SLF001
  own = [e for i, e in enumerate(spec) if i not in stacks][:nb]
  return PartitionSpec(*[spec[p] for p in stacks], *own)


def _shard(model: nnx.Module, mesh: Any, rules: Any, split: bool = True) -> None:
  """Gives every adapter of ``model`` its kernel's sharding: logical axis names in its metadata,
  each dim named after the kernel axis whose split it takes (``_sharding.kernel_specs``), and, on a
  mesh of several devices, its arrays placed as those names resolve with ``rules``. ``split=False``:
  replicated, as MaxText's LoRA places its adapters (only a stacked layer axis keeps its name)."""
  from flax.linen import logical_to_mesh_axes  # noqa: PLC0415

  sizes = dict(mesh.shape) if mesh is not None else None
  several = mesh is not None and mesh.size > 1
  for path, owner, name in _nnx.adapted(model):
    var = vars(owner)[name]
    ad = vars(owner)[name + _nnx.SUFFIX]
    key, names = _names(var)
    if names is None:
      if several:
        raise ValueError(
          f"{path}: this kernel carries no logical axes (its Variable has none of the metadata "
          f"{list(_NAME_KEYS)}), so its adapters cannot be sharded like it on the {mesh.size}-device "
          "mesh. Build the model with MaxText's model_creation_utils (its layers declare their axes), "
          "or pass mesh=None to leave the adapters where wrap put them."
        )
      continue
    w = var.get_value()
    kernel_spec = tuple(logical_to_mesh_axes(names, rules) or ()) if rules is not None else names
    kernel_spec = kernel_spec + (None,) * (w.ndim - len(kernel_spec))
    given = kernel_spec if split else tuple(e if p in ad.stack else None for p, e in enumerate(kernel_spec))
    specs = _sharding.kernel_specs(
      path, tuple(w.shape), PartitionSpec(*given), ad.in_axes, ad.out_axes, sizes, ad.stack
    )
    meta = var.get_metadata()
    for field in ("a", "b", "lam", "w_norm", "res_a", "res_b"):
      v = vars(ad).get(field)
      if v is None:
        continue
      x = v.get_value()
      spec = specs[field]
      if field in ("w_norm", "res_a", "res_b") and ad.stack:
        spec = _lead_spec(spec, ad.stack, field)
      entries = tuple(spec) + (None,) * (x.ndim - len(spec))
      logical = _logical(entries, names, kernel_spec)
      if rules is not None:  # placed as MaxText would place it from these names
        entries = tuple(logical_to_mesh_axes(logical, rules) or ())
      update: dict[str, Any] = {str(key): logical}
      if isinstance(v, _nnx.DeloraParam):  # MaxText scans Params at param_scan_axis, the rest at 0
        update.update({k: meta[k] for k in ("partition_name", "param_scan_axis") if k in meta})
      elif "partition_name" in meta:
        update["partition_name"] = meta["partition_name"]
      v.set_metadata(**update)
      if several:
        sh = NamedSharding(mesh, PartitionSpec(*entries))
        abstract = isinstance(x, jax.ShapeDtypeStruct)  # an abstract model (pod plans): the sharding is recorded
        v.set_value(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh) if abstract else jax.device_put(x, sh))


def _rules(model: nnx.Module, pattern: str, rule: Rule) -> dict[Any, Rule]:
  """``{Modules(pattern): rule}``, with the layer axis declared (``stack_axes``) for each kernel MaxText
  scans (its ``param_scan_axis`` metadata): where a layer count equals another axis of the kernel
  (Llama-3 8B: 32 layers and 32 heads in ``out``'s ``(heads, layers, head_dim, embed)``) the model's
  calls alone cannot tell which axis the scan slices."""
  key = Modules(pattern)
  ((_, regex, _),) = _wrap._compile({key: rule})  # noqa: SLF001 (wrap's own selection; a bad regex: its error)
  found, scanned = 0, {}
  for parts, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    path = "/".join(map(str, parts))
    if not (_wrap.selects(key, regex, path) and is_module_kernel(path, var.get_value())):
      continue
    found += 1
    psa = var.get_metadata().get("param_scan_axis")
    if psa is not None:
      scanned[re.escape(path)] = dataclasses.replace(rule, stack_axes=(int(psa),))
  return scanned if scanned and len(scanned) == found else {**scanned, key: rule}


def apply_delora_to_model(
  model: nnx.Module,
  mesh: jax.sharding.Mesh | None,
  config: Any,
  *,
  lam: float = 15.0,
  init: str = "peft",
  key: jax.Array | None = None,
  strict: bool = False,
  shard_adapters: bool = True,
) -> nnx.Module:
  """DeLoRA in place of MaxText's LoRA: same signature and contract as
  ``maxtext.utils.lora_utils.apply_lora_to_model(model, mesh, config)``.

  Returns ``model`` itself when ``config.lora.enable_lora`` is False (or when
  ``lora_input_adapters_path`` is set, as MaxText does). Otherwise returns a copy with
  DeLoRA adapters of rank ``config.lora.lora_rank`` on the kernels of the modules that
  :func:`module_path` matches (MaxText's ``lora_module_path``, or its default for the model
  family): ``a``, ``b``, ``lam`` typed :class:`delora_jax.nnx.DeloraParam` (an ``nnx.LoRAParam``,
  what MaxText's and tunix's trainers train), every kernel computed factorised. DeLoRA has
  no α: ``lora_alpha`` is not used; λ (``lam``) bounds the update instead.

  Each adapter is sharded as its kernel is (its logical axes resolved with
  ``config.logical_axis_rules``): ``a`` along the kernel's input axes, ``b`` along its output
  axes, so the adapters are not replicated on every chip; the Variables carry logical axis names
  (``out_sharding``) from the kernel's, and MaxText's scan metadata (``param_scan_axis``), so
  MaxText's default ``scan_layers=True, param_scan_axis=1`` runs them.

  Train with :func:`delora_jax.optimizer` (λ undecayed, the update bounded), not MaxText's
  ``optimizers.get_optimizer`` (it would weight-decay λ).

  Args:
    model: MaxText's NNX ``Transformer`` (``model_creation_utils.from_config`` or
      ``from_pretrained``).
    mesh: the model's mesh (``maxtext_utils.get_mesh_from_config(config)``), or None.
    config: the MaxText config (``pyconfig.initialize``), with its ``lora`` keys.
    lam: initial λ of every adapter (PEFT's ``delora_lambda``).
    init: ``"peft"`` (``b = 0``: the model is unchanged at step 0), ``"random"`` or ``"paper"``,
      as in :class:`delora_jax.Rule`.
    key: PRNG key of the adapters' initialisation (default ``jax.random.key(0)``).
    strict: raise instead of merging where a kernel cannot be computed factorised.
    shard_adapters: split each adapter like its kernel (default: adapter memory per chip falls
      with the mesh). ``False`` replicates them on every chip as MaxText's LoRA does: more
      memory, but a step moves the same collective bytes as MaxText's LoRA (no gathers of the
      factors, one all-reduce of their gradients), which pays off when the adapters are a large
      fraction of small kernels (``benchmarks/maxtext_fsdp.py``).

  Returns:
    The adapted model (or ``model`` when LoRA is off in ``config``).

  Raises:
    ValueError: ``config`` lacks the ``lora`` keys, ``lora_rank`` is not positive, a quantized
      base (``lora_weight_qtype``) is asked for, the module path matches no module with a
      kernel, or a kernel carries no logical axes on a mesh of several devices.

  Example:
    In MaxText's SFT setup (``trainers/post_train/sft/train_sft.py``), in place of its hook::

      from delora_jax.integrations.maxtext import apply_delora_to_model

      with jax.set_mesh(mesh), nn_partitioning.axis_rules(config.logical_axis_rules):
        model = apply_delora_to_model(model, mesh, config, lam=15.0)
      optimizer = delora_jax.optimizer(optax.adamw, learning_rate=1e-3, weight_decay=1e-2)
  """
  lora = _lora_config(config)
  if getattr(config, "lora_input_adapters_path", ""):
    return model  # MaxText's serving path loads its LoRA adapters itself
  if not lora.enable_lora:
    return model
  rank = lora.lora_rank
  if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
    raise ValueError(
      f"apply_delora_to_model: `config.lora.lora_rank` must be a positive int when lora.enable_lora "
      f"is True; got {rank!r}. Set e.g. lora.lora_rank=16."
    )
  qtype = getattr(lora, "lora_weight_qtype", None)
  if qtype:
    raise ValueError(
      f"apply_delora_to_model: `config.lora.lora_weight_qtype` is {qtype!r}, but this drop-in does not "
      "store MaxText's base quantized yet (the scales would need their own logical axes on a sharded "
      "mesh). Leave lora.lora_weight_qtype unset, or quantize the base yourself with "
      "delora_jax.nnx.wrap(model, {delora_jax.Modules(path): delora_jax.Rule(r, quantize='nf4', ...)})."
    )
  pattern = module_path(config)
  rules = getattr(config, "logical_axis_rules", None)
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    if rules is not None:
      from flax.linen import partitioning  # noqa: PLC0415

      stack.enter_context(partitioning.axis_rules(rules))
    inputs = _dummy_inputs(mesh)
    adapted = delora_nnx.wrap(
      model,
      _rules(model, pattern, Rule(rank, lam, init=init)),
      like=lambda m: m(**inputs),
      key=key,
      strict=strict,
    )
    _shard(adapted, mesh, rules, split=shard_adapters)
  return adapted


def to_maxtext_lora(model: nnx.Module, config: Any) -> dict[str, Any]:
  """The DeLoRA updates of ``model`` as MaxText's own LoRA parameters, exactly.

  A DeLoRA update of rank ``r`` is a rank-``r`` LoRA update (:func:`delora_jax.to_lora`). This
  lays it out as MaxText's LoRA (``apply_lora_to_model``: qwix) holds its adapters, so everything
  MaxText does with LoRA takes it: its LoRA checkpoints, its HF converters
  (``checkpoint_conversion/to_huggingface.py``, which read only ``<kernel>_lora_a/_lora_b``),
  maxengine serving. For every adapted kernel at ``<module>/kernel``: ``<module>/kernel_lora_a``
  of shape ``(in, r)`` and ``<module>/kernel_lora_b`` of shape ``(r, out)`` (inputs and outputs
  flattened), a scanned kernel's layer axis at ``config.param_scan_axis`` of both, and ``b``
  divided by ``lora_alpha / lora_rank`` so that MaxText's scaled update equals ΔW.

  Args:
    model: an adapted model from :func:`apply_delora_to_model` (or ``delora_jax.nnx.wrap``), with
      ``init="peft"`` or ``"random"``.
    config: the MaxText config of the LoRA model that will hold the result: its ``lora_rank``
      must be the adapters' rank and ``lora_alpha`` gives the scaling.

  Returns:
    ``{path: array}`` with ``/``-joined paths (e.g. ``decoder/layers/mlp/wi_0/kernel_lora_a``),
    nest it and ``nnx.update`` MaxText's LoRA model with it (see ``docs/maxtext.md``).

  Raises:
    ValueError: ``config`` lacks the ``lora`` keys or ``lora_alpha``, or its rank is not the
      adapters' (a ``init="paper"`` adapter is rank ``2r`` as a LoRA).
  """
  lora = _lora_config(config)
  alpha = getattr(lora, "lora_alpha", None)
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
    raise ValueError(
      f"to_maxtext_lora: `config.lora.lora_alpha` must be a positive number (MaxText's LoRA scales "
      f"its update by lora_alpha / lora_rank; its default 0.0 turns the update off); got {alpha!r}. Pass "
      "the config of the MaxText LoRA model that will hold the parameters, with e.g. lora.lora_alpha=16."
    )
  psa = int(getattr(config, "param_scan_axis", 1))
  out: dict[str, Any] = {}
  for path, f in _lora.to_lora(model).items():
    a, b = f["lora_a"], f["lora_b"]  # (*S, in, r), (*S, r, out)
    r = a.shape[-1]
    if r != lora.lora_rank:
      raise ValueError(
        f"{path}: its update is a rank-{r} LoRA, but `config.lora.lora_rank` is {lora.lora_rank}. Give "
        f"MaxText's LoRA model lora_rank={r} (an init='paper' adapter of rank r is a rank-2r LoRA)."
      )
    if a.ndim > 3:
      raise ValueError(f"{path}: {a.ndim - 2} stacked axes; MaxText's LoRA stacks one layer axis. Convert per stack.")
    stem = path.removesuffix("/kernel")
    if stem == path:
      raise ValueError(f"{path}: MaxText's LoRA adapts module kernels named 'kernel'; this path is not one.")
    b = (b.astype(jnp.float32) * (r / alpha)).astype(b.dtype)
    if a.ndim == 3:  # the layer axis where MaxText's scan keeps Params
      a, b = jnp.moveaxis(a, 0, psa), jnp.moveaxis(b, 0, psa)
    out[f"{stem}/kernel_lora_a"], out[f"{stem}/kernel_lora_b"] = a, b
  return out
