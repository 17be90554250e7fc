"""Flax kernel paths -> torch module names, for PEFT adapter files."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from delora_jax._kernel import DeloraKernel

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."

ModuleNames = Callable[[str], "str | Sequence[str] | None"] | Mapping[str, "str | Sequence[str]"]

_LLAMA_BLOCK = re.compile(r"layers_(\d+)/(self_attn|mlp)/(\w+)/kernel")
_LLAMA_SCAN = re.compile(r"layers/(self_attn|mlp)/(\w+)/kernel")
_BERT_BLOCK = re.compile(r"encoder/layer_(\d+)/((?:attention|intermediate|output)/[\w/]+)/kernel")
_BERT_SCAN = re.compile(r"encoder/layer/((?:attention|intermediate|output)/[\w/]+)/kernel")


def llama_module_names(path: str) -> str | None:
  """Hugging Face ``LlamaForCausalLM`` module name of a Flax Llama kernel path.

  ``layers_3/self_attn/q_proj/kernel`` -> ``model.layers.3.self_attn.q_proj``,
  ``lm_head/kernel`` -> ``lm_head``; with ``scan_layers=True`` the stacked
  ``layers/mlp/up_proj/kernel`` -> ``model.layers.{}.mlp.up_proj`` (one name
  per layer). Other paths (embeddings, norms) -> ``None``.

  Example:
    >>> from delora_jax.peft import llama_module_names
    >>> llama_module_names("layers_3/self_attn/q_proj/kernel")
    'model.layers.3.self_attn.q_proj'
    >>> llama_module_names("layers/mlp/down_proj/kernel").format(0)
    'model.layers.0.mlp.down_proj'
  """
  if m := _LLAMA_BLOCK.fullmatch(path):
    return f"model.layers.{m[1]}.{m[2]}.{m[3]}"
  if m := _LLAMA_SCAN.fullmatch(path):
    return f"model.layers.{{}}.{m[1]}.{m[2]}"
  if path == "lm_head/kernel":
    return "lm_head"
  return None


def bert_module_names(prefix: str = "") -> Callable[[str], str | None]:
  """A mapping from Flax BERT kernel paths to Hugging Face ``BertModel`` module names.

  ``encoder/layer_0/attention/self/query/kernel`` ->
  ``{prefix}encoder.layer.0.attention.self.query`` (also ``attention/output/
  dense``, ``intermediate/dense``, ``output/dense``, ``pooler/dense``; a
  stacked ``encoder/layer/...`` gives one name per layer). Use
  ``prefix="bert."`` for task models such as ``BertForSequenceClassification``.

  Example:
    >>> from delora_jax.peft import bert_module_names
    >>> bert_module_names("bert.")("encoder/layer_2/intermediate/dense/kernel")
    'bert.encoder.layer.2.intermediate.dense'
  """
  if not isinstance(prefix, str):
    raise TypeError(f"bert_module_names: `prefix` must be a str such as 'bert.'; got {prefix!r}.")

  def names(path: str) -> str | None:
    if m := _BERT_BLOCK.fullmatch(path):
      return f"{prefix}encoder.layer.{m[1]}.{m[2].replace('/', '.')}"
    if m := _BERT_SCAN.fullmatch(path):
      return f"{prefix}encoder.layer.{{}}.{m[1].replace('/', '.')}"
    if path == "pooler/dense/kernel":
      return f"{prefix}pooler.dense"
    return None

  return names


def lookup(module_names: Any, path: str) -> Any:
  """What ``module_names`` (a dict or a callable) gives for ``path``; None if nothing."""
  if isinstance(module_names, Mapping):
    return module_names.get(path)
  if callable(module_names):
    return module_names(path)
  raise TypeError(
    "`module_names` must be a callable path -> torch module name(s) or a dict "
    f"{{path: name}}; got {type(module_names).__name__}."
  )


def resolve(module_names: Any, path: str, k: DeloraKernel) -> list[str]:
  """Torch module names of the kernel at ``path``: one per stacked slice (row-major)."""
  stack = tuple(k.lam.shape)
  n = math.prod(stack)
  if isinstance(module_names, Mapping) and path not in module_names:
    raise ValueError(
      f"{path}: `module_names` has no entry for this adapted kernel. Add "
      f"{{{path!r}: 'torch.module.name'}} (or drop the kernel from the rules)."
    )
  got = lookup(module_names, path)
  if got is None:
    raise ValueError(
      f"{path}: `module_names` gives no torch module name for this adapted "
      "kernel. Extend the mapping (see docs/checkpoints.md) or remove the kernel "
      "from the rules."
    )
  if isinstance(got, str):
    if "{}" in got:
      if not stack:
        raise ValueError(
          f"{path}: `module_names` returned the template {got!r}, but the kernel "
          "is not stacked; return a plain module name."
        )
      return [got.format(i) for i in range(n)]
    if stack:
      raise ValueError(
        f"{path}: the kernel holds {n} stacked adapters (stack shape {stack}); "
        f"`module_names` must give {n} names (a sequence, or a template with "
        f"'{{}}' for the slice index), got the single name {got!r}."
      )
    return [got]
  if isinstance(got, Sequence) and all(isinstance(s, str) for s in got):
    if len(got) != n:
      raise ValueError(
        f"{path}: `module_names` gave {len(got)} names, expected {n} (one per stacked slice, stack shape {stack})."
      )
    return list(got)
  raise TypeError(f"{path}: `module_names` must give a str or a sequence of str; got {got!r}.")


def resolve_all(module_names: Any, ks: dict[str, DeloraKernel]) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  seen: dict[str, str] = {}
  for path, k in ks.items():
    out[path] = resolve(module_names, path, k)
    for name in out[path]:
      if not name or name in seen:
        raise ValueError(
          f"{path}: torch module name {name!r} is empty or also used for "
          f"{seen.get(name)!r}; `module_names` must give distinct names."
        )
      seen[name] = path
  return out


def pattern_key(name: str) -> str:
  """A PEFT ``rank_pattern``/``lambda_pattern`` key matching exactly the module ``name``."""
  return "^" + re.escape(name)


def check_linear(path: str, k: Any, flatten_nd: bool, fn: str) -> None:
  """Raises unless the kernel at ``path`` is something PEFT's DeLoRA (nn.Linear) can hold."""
  if k.res_a is not None and fn != "export_lora":
    fix = (
      "Use delora_jax.peft.export_lora (a LoRA adapter with the same update), or train with init='peft'."
      if fn == "export"
      else "Wrap the target with init='peft' or 'random'."
    )
    raise ValueError(
      f"{path}: this adapter was made with init='paper' (a frozen initial update res_a/res_b), "
      f"which PEFT's DeLoRA cannot represent. {fix}"
    )
  if k.stack and fn != "export_lora":  # to_lora gives the stacked axes first, wherever they sit
    raise ValueError(
      f"{path}: kernel of shape {tuple(k.w.shape)} has its stacked (layer) axes at positions "
      f"{k.stack} (Rule(stack_axes={k.stack})), not leading; PEFT adapter files hold one torch "
      f"module per layer, which {fn} writes and reads only for leading stacked axes. Save and "
      "load these adapters with delora_jax.save_adapters / load_adapters, or merge them "
      "(delora_jax.merge)."
    )
  if len(k.in_axes) + len(k.out_axes) > 2 and not flatten_nd:
    raise ValueError(
      f"{path}: kernel of shape {tuple(k.w.shape)} is N-D (in_axes={k.in_axes}, out_axes="
      f"{k.out_axes}); PEFT adapts only torch nn.Linear. If its torch module is an "
      "nn.Linear(in_flat, out_flat) whose weight.T equals this kernel viewed as (in_flat, "
      "out_flat) (input axes flattened row-major in in_axes order, then output axes), pass "
      f"flatten_nd=True to {fn}. Convolution kernels cannot be written as PEFT adapters."
    )


def safetensors_numpy():
  try:
    import safetensors.numpy as stn
  except ImportError:  # pragma: no cover - safetensors ships with the test extra
    raise ImportError("delora_jax.peft needs the `safetensors` package: pip install safetensors") from None
  return stn
