"""Kernel layouts taken from the model: which axes each call actually contracts.

One abstract trace of the model's call (``wrap(..., like=...)``) records, for
every selected kernel, the axes of each ``dot_general``/``conv_general_dilated``
that consumes it (through ``astype``, transposes, reshapes and nested calls).
The contracted axes are its inputs, the other non-stacked axes its outputs;
stacked axes are those a scan slices off (found by comparing the shape the model
sees with the stored one) or the Rule's ``stack_axes``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex

from delora_jax import _lazy
from delora_jax._rule import Rule, stack_positions

_PASS = ("convert_element_type", "copy", "copy_p")
USES: contextvars.ContextVar[Uses | None] = contextvars.ContextVar("delora_uses", default=None)


@dataclasses.dataclass
class Uses:
  """What one trace saw: per path, the shapes the model saw the kernel with, the axes (of that
  shape) of each contraction, and other ops."""

  shapes: dict[str, set] = dataclasses.field(default_factory=dict)
  contractions: dict[str, set] = dataclasses.field(default_factory=dict)
  others: dict[str, set] = dataclasses.field(default_factory=dict)

  def add(self, path: str, contracted: tuple[int, ...], batch: tuple[int, ...]) -> None:
    self.contractions.setdefault(path, set()).add((contracted, batch))

  def other(self, path: str, op: str) -> None:
    self.others.setdefault(path, set()).add(op)


def _union(axes, dims) -> tuple[int, ...]:
  return tuple(sorted({a for d in dims for a in axes[d]}))


def _walk(jaxpr, tracked: dict, uses: Uses) -> None:
  """``tracked``: jaxpr var -> (path, per-axis stored axes); fills it for derived vars."""
  for eqn in jaxpr.eqns:
    got = [(i, tracked[v]) for i, v in enumerate(eqn.invars) if not isinstance(v, jex.core.Literal) and v in tracked]
    if not got:
      continue
    name = eqn.primitive.name
    out = eqn.outvars[0] if eqn.outvars else None
    if name in _PASS:
      tracked[out] = got[0][1]
    elif name == "transpose":
      path, axes = got[0][1]
      tracked[out] = (path, tuple(axes[p] for p in eqn.params["permutation"]))
    elif name == "reshape" and eqn.params.get("dimensions") is None:
      path, axes = got[0][1]
      groups = _lazy._groups(tuple(eqn.invars[0].aval.shape), tuple(eqn.params["new_sizes"]))
      if groups is None:
        uses.other(path, name)
        continue
      new: list[tuple[int, ...]] = [()] * len(eqn.params["new_sizes"])
      for gi, gj in groups:
        for q in gj:
          new[q] = _union(axes, gi)
      tracked[out] = (path, tuple(new))
    elif name in _lazy._CALLS or name in ("custom_jvp_call", "remat2", "checkpoint"):
      inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      inner = getattr(inner, "jaxpr", inner)
      sub = {inner.invars[i]: t for i, t in got}
      _walk(inner, sub, uses)
      for o, io in zip(eqn.outvars, inner.outvars):
        if not isinstance(io, jex.core.Literal) and io in sub:
          tracked[o] = sub[io]
    elif name == "dot_general":
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      for i, (path, axes) in got:
        con, bat = (lc, lb) if i == 0 else (rc, rb)
        uses.add(path, _union(axes, con), _union(axes, bat))
    elif name == "conv_general_dilated" and got[0][0] == 1:
      path, axes = got[0][1]
      o_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      uses.add(path, _union(axes, [d for d in range(len(axes)) if d != o_dim]), ())
    else:
      for _, (path, _axes) in got:
        uses.other(path, name)


def trace(fn: Callable[..., Any], bases: list[jax.Array], paths: list[str]) -> Any:
  """Traces ``fn(*bases)``, records how it uses each base (in :data:`USES`), returns its output.

  The axes recorded are those of the base as the call sees it (a scan may have sliced stacked
  axes off the stored kernel); :func:`resolve` maps them back to the stored kernel."""
  uses = USES.get()
  assert uses is not None, "trace() runs inside a call that set USES"
  closed, shape = jax.make_jaxpr(fn, return_shape=True)(*bases)
  tracked = {}
  for v, p, w in zip(closed.jaxpr.invars, paths, bases):
    tracked[v] = (p, tuple((d,) for d in range(w.ndim)))
    uses.shapes.setdefault(p, set()).add(tuple(w.shape))
  _walk(closed.jaxpr, tracked, uses)
  outs = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *bases)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)


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


def probe(run: Callable[[], Any]) -> Uses:
  """Runs ``run()`` (an abstract model call with probe kernels) and returns what it saw."""
  uses = Uses()
  token = USES.set(uses)
  try:
    run()
  finally:
    USES.reset(token)
  return uses
