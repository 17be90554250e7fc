"""Layout inference: which axes of each kernel the model's call contracts.

``wrap(..., like=...)`` runs the model's call once, abstractly, with each selected
kernel bound to a factor-less value of the interpreter (:func:`delora_jax._interpret.probe`),
which records the stored axes of every contraction that reaches it (through
``astype``, transposes, reshapes and nested calls) instead of computing a branch.
:func:`resolve` turns what was seen into the Rule's layout: the contracted axes
are its inputs, the other non-stacked axes its outputs; stacked axes are those a
scan slices off (found by comparing the shape the model sees with the stored one), the
contraction's batch axes, or the Rule's ``stack_axes``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax

from delora_jax import _interpret
from delora_jax._interpret import Uses
from delora_jax._rule import Rule, stack_positions

_USES: contextvars.ContextVar[Uses | None] = contextvars.ContextVar("delora_uses", default=None)


def active() -> bool:
  """Whether a layout probe is running (front-ends then trace with :func:`trace`)."""
  return _USES.get() is not None


def trace(fn: Callable[..., Any], bases: list[jax.Array], paths: list[str], escape: Callable[[], bool] = bool) -> Any:
  """``fn(*bases)``, evaluated with the first ``len(paths)`` bases probes that record their
  contractions (the others, e.g. a module's state, are plain inputs). The axes recorded are
  those of the base as the call sees it (a scan may have sliced stacked axes off the stored
  kernel); :func:`resolve` maps them back to the stored kernel."""
  uses = _USES.get()
  assert uses is not None, "trace() runs inside probe()"
  values: list[Any] = []
  for w, p in zip(bases, paths):
    uses.shapes.setdefault(p, set()).add(tuple(w.shape))
    values.append(_interpret.probe(w, _interpret.Source(p, lambda *_: None, (), uses=uses)))
  return _interpret.run(fn, bases, values + list(bases[len(values) :]), escape=escape)


def probe(run: Callable[[], Any]) -> Uses:
  """Runs ``run()`` (an abstract model call whose front-end traces with :func:`trace`)."""
  uses = Uses()
  token = _USES.set(uses)
  try:
    run()
  finally:
    _USES.reset(token)
  return uses


def _removed(path: str, shape: tuple[int, ...], seen: tuple[int, ...], rule: Rule) -> tuple[int, ...]:
  """The axes of the stored kernel ``shape`` that the model does not see (a scan sliced them
  off): the Rule's first stacked axes if it declares them, else the only axes whose removal
  gives the ``seen`` shape. Raises if that does not fit, or if several choices fit."""
  n_cut = len(shape) - len(seen)
  declared = stack_positions(rule.stack_axes)
  fix = "Declare the stacked axes' positions, e.g. Rule(r, stack_axes=(1,)), or exclude the kernel from the rules."
  if n_cut < 0:
    raise ValueError(
      f"{path}: the model uses this kernel of stored shape {shape} with more axes, shape {seen}; "
      f"delora_jax adapts a kernel the model reads as it is stored or with stacked axes sliced off. {fix}"
    )
  if declared:
    gone = declared[:n_cut]
    kept = tuple(d for q, d in enumerate(shape) if q not in gone)
    if n_cut > len(declared) or kept != seen:
      raise ValueError(
        f"{path}: the model sees this kernel of stored shape {shape} with shape {seen}, which is "
        f"not the stored shape without its first {n_cut} stacked axes (stack_axes="
        f"{rule.stack_axes}: positions {declared}). Declare the positions of the axes the "
        "model's scan slices off, e.g. Rule(r, stack_axes=(1,)), or leave stack_axes out to infer them."
      )
    return gone
  fits = [
    cut
    for cut in itertools.combinations(range(len(shape)), n_cut)
    if tuple(d for q, d in enumerate(shape) if q not in cut) == seen
  ]
  if not fits:
    raise ValueError(
      f"{path}: the model sees this kernel of stored shape {shape} with shape {seen}, which is not "
      f"the stored shape with {n_cut} axis(es) removed; delora_jax cannot tell which stored axes "
      f"the call uses. {fix}"
    )
  if len(fits) > 1:
    raise ValueError(
      f"{path}: the model sees this kernel of stored shape {shape} with shape {seen}: a scan sliced "
      f"off {n_cut} stacked axis(es), but removing any of the axes {fits} gives that shape, so "
      f"which one is the layer axis is ambiguous. Declare it, e.g. Rule(r, stack_axes={fits[-1]}) "
      "if the layer axis is there."
    )
  return fits[0]


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
  shapes = uses.shapes.get(path, {shape})
  if len(shapes) > 1:
    raise ValueError(
      f"{path}: the model uses this kernel of stored shape {shape} with different shapes "
      f"{sorted(shapes)} in different places, so no single layout fits. Declare the layout, e.g. "
      "Rule(r, in_axes=..., stack_axes=...)."
    )
  ((seen_shape,),) = (tuple(shapes),)
  gone = _removed(path, shape, seen_shape, rule)
  kept = [q for q in range(len(shape)) if q not in gone]
  ((contracted, batch),) = seen
  contracted = tuple(sorted(kept[d] for d in contracted))
  batch = tuple(sorted(kept[d] for d in batch))
  stack = tuple(sorted(set(stack_positions(rule.stack_axes)) | set(gone)))
  if not stack_positions(rule.stack_axes):
    # Undeclared batch axes of the contraction (vmapped layers, a ragged_dot's expert axis) are
    # stacked axes: each slice gets its own adapter.
    stack = tuple(sorted(set(stack) | set(batch)))
  if any(a not in stack for a in batch) or any(a in stack for a in contracted):
    raise ValueError(
      f"{path}: the model batches this kernel over axes {batch} and contracts axes "
      f"{contracted} (stored shape {shape}); only stacked axes (here {stack}) may be batch axes. Declare "
      "the layout with Rule(r, in_axes=..., stack_axes=...)."
    )
  outs = tuple(a for a in range(len(shape)) if a not in contracted and a not in stack)
  if not outs:
    raise ValueError(
      f"{path}: the model contracts every axis {contracted} of this kernel; it has no output axis to adapt."
    )
  if rule.in_axes is not None or rule.out_axes is not None:
    declared_in, _ = dataclasses.replace(rule, stack_axes=stack).layout(path, shape)
    declared = tuple(sorted(a % len(shape) for a in declared_in))
    if declared != contracted:
      raise ValueError(
        f"{path}: the declared layout has input axes {declared} (Rule(in_axes="
        f"{rule.in_axes}, out_axes={rule.out_axes}, stack_axes={rule.stack_axes})), but the "
        f"model contracts axes {contracted} of this kernel of shape {shape}. Use "
        f"Rule(r, in_axes={contracted}, stack_axes={_stack_arg(stack)}) or leave the layout out."
      )
  return dataclasses.replace(rule, in_axes=contracted, out_axes=outs, stack_axes=stack)


def _stack_arg(stack: tuple[int, ...]) -> Any:
  return len(stack) if stack == tuple(range(len(stack))) else stack
