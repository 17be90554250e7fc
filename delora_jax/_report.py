"""Reporting: what a call computed how, for Linen and NNX alike.

Every front-end notes each adapted kernel it runs as ``"factorised"`` or
``"merged"`` into the :class:`Record` of the call in progress (one context
variable). After the call, :func:`warn_merged` turns merged paths into one
:class:`FallbackWarning`, ``strict=True`` turns them into :func:`strict_error`,
and :func:`summary` gives :func:`delora_jax.explain`'s answer. A kernel whose
uses never reach the call's outputs (its adapter gets exactly zero gradient)
is reported ``"unused"``, however it was computed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax


class FallbackWarning(UserWarning):
  """An adapted kernel was used outside a factorised layer and was merged (``w + ΔW``)."""


class LayoutError(ValueError):
  """The model contracts an adapted kernel over axes other than its declared inputs."""


def strict_error(path: str, why: str = "outside a layer delora_jax can factorise") -> TypeError:
  return TypeError(
    f"{path}: this adapted kernel is used {why}, so it would be computed through the merged "
    "weight w + ΔW. strict=True forbids that; contract it with a layer or op delora_jax "
    "factorises (any jnp.einsum/jnp.dot/@/lax.dot_general/lax.conv_general_dilated/"
    "lax.ragged_dot over its input axes), exclude it from the rules, or call with strict=False "
    "to accept the merged path."
  )


@dataclasses.dataclass(eq=False)
class Record:
  """The paths one call computed factorised and merged, and the contractions that did not fit
  a kernel's layout (``misfits``: raised by :meth:`check` unless another use of it fits)."""

  factorised: set = dataclasses.field(default_factory=set)
  merged: set = dataclasses.field(default_factory=set)
  misfits: dict = dataclasses.field(default_factory=dict)

  def note(self, path: str, kind: str) -> None:
    getattr(self, kind).add(path)

  def check(self) -> None:
    """Raises the :class:`LayoutError` of a kernel that no use contracted over its input axes.

    A kernel that one layer contracts over its inputs and another over other axes is tied (a
    Linen ``nn.share_scope``, an embedding read transposed): the other use was merged. A kernel
    only ever contracted otherwise has a wrong layout."""
    for path, err in self.misfits.items():
      if path not in self.factorised:
        raise err


_OPEN: contextvars.ContextVar[tuple[Record, ...]] = contextvars.ContextVar("delora_records", default=())


@contextlib.contextmanager
def recording() -> Iterator[Record]:
  """A fresh :class:`Record` that :func:`note` fills while the block runs (records nest)."""
  rec = Record()
  token = _OPEN.set((*_OPEN.get(), rec))
  try:
    yield rec
  finally:
    _OPEN.reset(token)


def open_records() -> bool:
  """Whether a call's report is being recorded (``apply``, ``explain``): then it warns, not each use."""
  return bool(_OPEN.get())


def note(path: str, kind: str) -> None:
  """Records that ``path`` ran ``kind`` (``"factorised"`` or ``"merged"``) in every open record."""
  for rec in _OPEN.get():
    rec.note(path, kind)


def misfit(path: str, err: LayoutError) -> None:
  """Records a contraction of ``path`` that does not fit its layout in every open record."""
  for rec in _OPEN.get():
    rec.misfits.setdefault(path, err)


def warn_merged(who: str, paths: set, hint: str, stacklevel: int = 3) -> None:
  """One :class:`FallbackWarning` naming the merged ``paths`` of a call (nothing if none)."""
  if not paths:
    return
  shown = sorted(paths)
  listed = ", ".join(repr(p) for p in shown[:6]) + (f", ... ({len(shown)} in all)" if len(shown) > 6 else "")
  warnings.warn(
    f"{who}: adapted kernels [{listed}] are used outside a factorised layer and were computed "
    "through the merged weight w + ΔW (adapter dropout does not apply there). " + hint,
    FallbackWarning,
    stacklevel=stacklevel,
  )


def reached(fn: Callable[[Any], Any], adapters: dict[str, Any]) -> set[str]:
  """The paths of ``adapters`` (``{path: arrays}``) that ``fn(adapters)``'s outputs depend on.

  Dead-code elimination over the traced program (``jax._src.interpreters.partial_eval.dce_jaxpr``,
  which knows ``scan``, ``cond``, ``jit`` and the other higher-order primitives).
  """
  from jax._src.interpreters import partial_eval as pe  # noqa: PLC0415 (JAX internal, see _interpret)

  flat, treedef = jax.tree_util.tree_flatten(adapters)
  owner = [p for p, leaves in adapters.items() for _ in jax.tree_util.tree_leaves(leaves)]
  closed = jax.make_jaxpr(lambda *xs: fn(jax.tree_util.tree_unflatten(treedef, xs)))(*flat)
  _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return {p for p, u in zip(owner, used) if u}


def summary(paths: list[str], rec: Record, live: set[str]) -> dict[str, list[str]]:
  """``explain``'s answer: each path factorised, merged, or unused (no use reaches the outputs)."""
  used = [p for p in paths if p in live and (p in rec.factorised or p in rec.merged)]
  return {
    "factorised": [p for p in used if p not in rec.merged],
    "merged": [p for p in used if p in rec.merged],
    "unused": [p for p in paths if p not in used],
  }


# How each front-end explains a call on its models: (model class, fn(model, variables, *args,
# **kwargs)), the NNX front-end first, the Linen one (any other model) last.
EXPLAINERS: list[tuple[type, Callable[..., dict[str, list[str]]]]] = []


def explain(model: Any, variables: Any = None, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
  """Which adapted kernels a call computes factorised, merged, or not at all.

  Traces the call abstractly (no computation) and returns
  ``{"factorised": [...], "merged": [...], "unused": [...]}`` (paths). A kernel is
  ``"unused"`` when no use of it reaches the call's outputs (never read, or read only
  where the result is dropped, as in gemma 4's KV-shared layers): its adapter then
  gets exactly zero gradient, however it would have been computed. For Linen,
  ``explain(model, variables, *args, **kwargs)`` as for :func:`delora_jax.apply`; for an NNX
  model adapted by :func:`delora_jax.nnx.wrap`, ``explain(adapted, *args, **kwargs)``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, delora_jax
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> tree = delora_jax.wrap(model.init(jax.random.key(0), x)["params"], {"kernel": 2})
    >>> delora_jax.explain(model, {"params": tree}, x)
    {'factorised': ['kernel'], 'merged': [], 'unused': []}
  """
  for cls, fn in sorted(EXPLAINERS, key=lambda e: e[0] is object):
    if isinstance(model, cls):
      return fn(model, variables, *args, **kwargs)
  raise AssertionError("unreachable: the Linen front-end explains any model")
