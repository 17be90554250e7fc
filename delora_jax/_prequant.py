"""Kernels and models a user already quantized (qwix PTQ, gemma's int wrappers): refused, clearly.

delora_jax adapts floating kernels, and stores a base quantized itself with ``Rule(quantize=...)``
(``w_norm`` then comes from the float weights, PEFT's definition). A kernel that arrives quantized
would give ``w_norm`` only from its dequantized values, and its layer runs the user's own quantized op,
which the factorised path does not call: such kernels are refused at ``wrap``, as are models that
``qwix.quantize_model`` transformed or gemma's ``IntWrapper`` wraps (``apply``, ``wrap(like=...)`` and
``nnx.wrap`` ran their adapted layers without the quantized ops, silently). Nothing here imports qwix or
gemma: their types are recognised by name (qwix's ``WithAux``/``QArray``; in ``nnx.state``, where they
are flattened, by their ``<path>/array/qvalue`` and ``<path>/array/scale`` leaves)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from delora_jax import _tree
from delora_jax._kernel import is_kernel

FIX = (
  "Pass the float model and use Rule(quantize='int8'|'int4'|'nf4', tile_size=...): delora_jax then stores the "
  "base quantized as qwix does (same weight_qtype and tile_size numerics) and computes the adapted layers "
  "factorised, with w_norm from the float weights."
)
_WHY = (
  "delora_jax does not adapt an already quantized kernel: its w_norm could only come from the dequantized "
  "values, and its layer runs the quantizer's own op, not the factorised one."
)


def _is_qwix(x: Any, *names: str) -> bool:
  cls = type(x)
  return cls.__module__.split(".")[0] == "qwix" and cls.__name__ in names


def describe(x: Any) -> str | None:
  """What a qwix-quantized parameter is, in words (``None``: not one)."""
  if _is_qwix(x, "WithAux"):
    inner = describe(x.array)
    return f"a qwix PTQ WithAux holding {inner or type(x.array).__name__}"
  if _is_qwix(x, "QArray"):
    zp = " + zero_point" if getattr(x, "zero_point", None) is not None else ""
    return f"a qwix QArray ({x.qtype} qvalue of shape {tuple(x.qvalue.shape)} + scale{zp})"
  return None


def _found(params: Any) -> dict[str, tuple[str, list[str]]]:
  """``{path: (what, paths of the leaves inside)}`` of the qwix-quantized parameters of ``params``: typed
  (Linen params, abstract params) or as ``nnx.state`` flattens them (``<path>/array/{qvalue,scale}``)."""
  items = [
    (_tree.path_str(p), x)
    for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: is_kernel(x) or describe(x) is not None)[
      0
    ]
  ]
  paths = {at for at, _ in items}
  out = {}
  for at, x in items:
    if (what := describe(x)) is not None:
      out[at] = (what, [f"{at}/{_tree.path_str(p)}" for p, _ in jax.tree_util.tree_flatten_with_path(x)[0]])
    elif at.endswith("/array/qvalue") and f"{at[:-6]}scale" in paths and _tree.is_array_like(x):
      base = at[: -len("/array/qvalue")]
      what = f"a qwix QArray ({x.dtype} qvalue of shape {tuple(x.shape)} + scale, as nnx.state holds it)"
      out[base] = (what, [p for p in paths if p.startswith(base + "/")])
  return out


def check_tree(params: Any, rules: list, selects: Callable[[Any, Any, str], bool]) -> None:
  """``TypeError`` if a rule (``(key, regex, rule)`` of ``_wrap._compile``) selects a qwix-quantized
  parameter of ``params``, or any leaf inside one (``.../kernel/array/qvalue``)."""
  for at, (what, inner) in _found(params).items():
    for key, regex, _ in rules:
      if any(selects(key, regex, p) for p in (at, *inner)):
        raise TypeError(f"{at}: rules key {key!r} selects {what}, a kernel already quantized by qwix. {_WHY} {FIX}")


def integer_kernel(path: str, pattern: Any, leaf: Any) -> str | None:
  """The message for an integer kernel (gemma's ``IntWrapper`` / ``gemma.peft.quantize`` keep int4/int8
  values with a separate ``scale``), or ``None`` for any other leaf."""
  if not (jnp.issubdtype(leaf.dtype, jnp.integer) and leaf.ndim >= 2):
    return None
  return (
    f"{path}: rules pattern {pattern!r} matched an integer array of dtype {leaf.dtype} and shape "
    f"{tuple(leaf.shape)}, expected a floating-point kernel. If it is a kernel already quantized (gemma's "
    f"IntWrapper and gemma.peft.quantize store int values with a separate 'scale'): {_WHY} {FIX} If it is not "
    f"a kernel, narrow the pattern {pattern!r}."
  )


def check_model(model: Any, fn: str) -> None:
  """``TypeError`` for a model transformed by ``qwix.quantize_model`` (any provider) or wrapped in gemma's
  ``IntWrapper``: delora_jax computes each adapted layer itself and would skip their quantized ops."""
  if hasattr(type(model), "_unquantized_type"):
    what = "was transformed by qwix.quantize_model (its class intercepts ops for qwix)"
  elif any(c.__name__ == "IntWrapper" and c.__module__.split(".")[0] == "gemma" for c in type(model).__mro__):
    what = "is gemma's IntWrapper (its layers are replaced by int ones)"
  else:
    return
  raise TypeError(
    f"{fn}: `model` {what}; delora_jax computes each adapted layer itself, so the quantized ops would be "
    f"skipped, or the kernel merged (w + ΔW) and quantized with the update. {FIX}"
  )
