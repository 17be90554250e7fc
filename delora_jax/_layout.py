"""Layout inference: which axes of each kernel the model's call contracts.

``wrap(..., like=...)`` runs the model's call once, abstractly, with each selected
kernel bound to a factor-less value of the interpreter (:func:`delora_jax._interpret.probe`),
which records the stored axes of every contraction that reaches it (through
``astype``, transposes, reshapes and nested calls) instead of computing a branch.
:func:`resolve` turns what was seen into the Rule's layout: the contracted axes
are its inputs, the other non-stacked axes its outputs; stacked axes are those
``nn.scan`` slices off (or the Rule's ``stack_axes``).
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from delora_jax import _interpret
from delora_jax._interpret import Uses
from delora_jax._rule import Rule

_USES: contextvars.ContextVar[Uses | None] = contextvars.ContextVar("delora_uses", default=None)


def active() -> bool:
  """Whether a layout probe is running (front-ends then trace with :func:`trace`)."""
  return _USES.get() is not None


def trace(fn: Callable[..., Any], bases: list[jax.Array], paths: list[str], leads: list[int]) -> Any:
  """``fn(*bases)``, evaluated with the first ``len(paths)`` bases probes that record their
  contractions (the others, e.g. a module's state, are plain inputs)."""
  uses = _USES.get()
  assert uses is not None, "trace() runs inside probe()"
  values: list[Any] = []
  for w, p, lead in zip(bases, paths, leads):
    uses.lead[p] = lead
    uses.shapes[p] = tuple(w.shape)
    values.append(_interpret.probe(w, _interpret.Source(p, lambda *_: None, (), lead=lead, uses=uses)))
  return _interpret.run(fn, bases, values + list(bases[len(values) :]))


def probe(run: Callable[[], Any]) -> Uses:
  """Runs ``run()`` (an abstract model call whose front-end traces with :func:`trace`)."""
  uses = Uses()
  token = _USES.set(uses)
  try:
    run()
  finally:
    _USES.reset(token)
  return uses


def resolve(path: str, shape: tuple[int, ...], rule: Rule, uses: Uses) -> Rule:
  """The Rule with the layout the model's contractions show (checked against a declared one)."""
  seen = uses.contractions.get(path, set())
  how = f"other uses: {sorted(uses.others[path])}" if path in uses.others else "the call does not use it"
  if not seen:
    raise ValueError(
      f"{path}: cannot infer this kernel's layout: the model's call never contracts it "
      f"({how}). Declare it, e.g. Rule(r, in_axes=...), or exclude it from the rules."
    )
  if len(seen) > 1:
    raise ValueError(
      f"{path}: the model contracts this kernel over different axes in different places "
      f"({sorted(c for c, _ in seen)}), so no single layout fits. Declare one with "
      "Rule(r, in_axes=...) (the other uses will then be merged, or raise with strict=True)."
    )
  ((contracted, batch),) = seen
  # Undeclared, leading batch axes of the contraction (vmapped layers, a ragged_dot's expert
  # axis) are stacked axes: each slice gets its own adapter.
  leading = len(batch) if tuple(batch) == tuple(range(len(batch))) else 0
  stack = rule.stack_axes or max(uses.lead.get(path, 0), leading)
  if any(a >= stack for a in batch) or any(a < stack for a in contracted):
    raise ValueError(
      f"{path}: the model batches this kernel over axes {batch} and contracts axes "
      f"{contracted}; only leading stacked axes (here {stack}) may be batch axes. Declare "
      "the layout with Rule(r, in_axes=..., stack_axes=...)."
    )
  outs = tuple(a for a in range(stack, len(shape)) if a not in contracted)
  if not outs:
    raise ValueError(
      f"{path}: the model contracts every axis {contracted} of this kernel; it has no output axis to adapt."
    )
  if rule.in_axes is not None or rule.out_axes is not None:
    declared_in, _ = rule.layout(path, shape)
    declared = tuple(sorted(len(shape) + a for a in declared_in))
    if declared != contracted:
      raise ValueError(
        f"{path}: the declared layout has input axes {declared} (Rule(in_axes="
        f"{rule.in_axes}, out_axes={rule.out_axes}, stack_axes={rule.stack_axes})), but the "
        f"model contracts axes {contracted} of this kernel of shape {shape}. Use "
        f"Rule(r, in_axes={contracted}, stack_axes={stack}) or leave the layout out."
      )
  return dataclasses.replace(rule, in_axes=contracted, out_axes=outs, stack_axes=stack)
