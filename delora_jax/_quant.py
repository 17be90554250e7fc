"""A quantized frozen kernel (``Rule(quantize=...)``): int8, int4 or nf4 values plus float32 scales.

Numerics are qwix's (what tunix and MaxText use): symmetric absmax scales, one per output channel
(reduced over every input axis of the kernel) or, with ``tile_size``, one per block of ``tile_size``
entries along the kernel's innermost input axis; ``scale = absmax / B`` with ``B`` = 127.5 (int8),
7.5 (int4) or 1 (nf4), a scale below ``sqrt(tiny)`` replaced by 1; int values rounded half to even
and clipped to the type's range; nf4 stored as ``uint4`` indices into the 16-value NF4 table
(QLoRA, Appendix E), the nearest entry. ``tests/test_quantized_qwix.py`` checks values and scales
against qwix's own on the same weights.

Written by hand (about 60 lines) rather than calling qwix: qwix is not a dependency of delora_jax,
and adding one (with its own jax/flax pins, on CI's lower-bounds stack too) for four array functions
would cost more than it gives; the scale layout must also follow the kernel's input axes as the
Rule declares them, which decides where the output side can be scaled. nf4's nearest entry is
found by a sorted search over the 15 midpoints (qwix takes an ``argmin`` over the 16 entries for
each weight); the indices are the same, ties going to the lower entry in both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("int8", "int4", "nf4")
_BOUND = {"int8": 127.5, "int4": 7.5, "nf4": 1.0}
_RANGE = {"int8": (-128, 127), "int4": (-8, 7)}
_STORED = {"int8": jnp.int8, "int4": jnp.int4, "nf4": jnp.uint4}
#: The NF4 table (QLoRA, arXiv 2305.14314, Appendix E), as float32.
NF4 = np.array(
  [
    *(-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453),
    *(-0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0),
    *(0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224),
    *(0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0),
  ],
  np.float32,
)


@dataclasses.dataclass(frozen=True)
class QArray:
  """A kernel stored quantized: ``values`` (the kernel's shape, int8/int4, or uint4 nf4 indices)
  and ``scale`` (float32, the kernel's shape with each input axis of size 1, except the tiled one,
  of size ``n // tile``). ``in_axes`` are the kernel's input axes: negative (valid for a kernel seen
  without some leading stacked axes), or, with stacked axes at positions ``stack`` that are not
  leading, positions in the stored kernel of ``stored_ndim`` axes (a scan over the layers removes
  stacked axes first, as :func:`delora_jax._kernel.layout_positions` says); ``base_dtype`` is the
  dtype it was quantized from. The scale keeps every stacked axis, so a scan slices it with the values."""

  values: Any
  scale: Any
  scheme: str
  base_dtype: str
  in_axes: tuple[int, ...]
  tile: int | None = None
  stack: tuple[int, ...] = ()
  stored_ndim: int = 0

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def ndim(self) -> int:
    return len(self.values.shape)

  @property
  def dtype(self) -> jnp.dtype:
    """The dtype of the kernel it stands for (what :func:`dequantize` returns)."""
    return jnp.dtype(self.base_dtype)

  @property
  def input_axes(self) -> tuple[int, ...]:
    """Positions (in ``values`` as seen, maybe a scan's slice) of the kernel's input axes, sorted."""
    if not self.stack:
      return tuple(sorted(a % self.ndim for a in self.in_axes))
    gone = self.stack[: self.stored_ndim - self.ndim]
    return tuple(sorted(a - sum(p < a for p in gone) for a in self.in_axes))

  @property
  def tiled_axis(self) -> int:
    """Position (in ``values``) of the innermost input axis, the one ``tile`` blocks."""
    return self.input_axes[-1]

  def __array__(self, *args: Any, **kwargs: Any):
    raise TypeError(
      "A quantized base kernel (Rule(quantize=...)) was used as a plain array. delora_jax.apply and "
      "delora_jax.merge / unwrap (dequantized float kernels) read it; plain model.apply cannot."
    )


jax.tree_util.register_dataclass(
  QArray,
  data_fields=["values", "scale"],
  meta_fields=["scheme", "base_dtype", "in_axes", "tile", "stack", "stored_ndim"],
)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QArray)


def check_floating(path: str, w: Any, scheme: str) -> None:
  """``Rule(quantize=...)`` quantizes floating kernels only (TypeError naming the path)."""
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(
      f"{path}: Rule(quantize={scheme!r}) quantizes a floating-point kernel; got dtype {w.dtype} (already "
      "quantized, e.g. by qwix or gemma's IntWrapper?). Pass the float pretrained kernel to wrap and let "
      "quantize= store it quantized, or drop quantize."
    )


def _blocked(x: jax.Array, ax: int, tile: int | None) -> jax.Array:
  """``x`` with axis ``ax`` split into ``(n // tile, tile)`` (unchanged without a tile)."""
  if tile is None:
    return x
  return x.reshape(*x.shape[:ax], x.shape[ax] // tile, tile, *x.shape[ax + 1 :])


@functools.partial(jax.jit, static_argnames=("scheme", "in_axes", "tile", "stack"))
def quantize(
  w: jax.Array, scheme: str, in_axes: tuple[int, ...], tile: int | None = None, stack: tuple[int, ...] = ()
) -> QArray:
  """``w`` (floating) quantized with one scale per output channel (over ``in_axes``) or per block
  of ``tile`` entries of the innermost input axis; see the module docstring for the numerics.
  ``stack``: positions of stacked axes that are not leading (``in_axes`` then count from 0)."""
  base = jnp.dtype(w.dtype).name
  in_axes = tuple(a % w.ndim for a in in_axes) if stack else tuple(a % w.ndim - w.ndim for a in in_axes)
  ins = sorted(a % w.ndim for a in in_axes)
  ax = ins[-1]
  x = _blocked(w.astype(jnp.float32), ax, tile)
  red = tuple(ins[:-1]) + ((ax + 1,) if tile else (ax,))
  scale = jnp.max(jnp.abs(x), axis=red, keepdims=True) / _BOUND[scheme]
  scale = jnp.where(scale < np.sqrt(np.finfo(np.float32).tiny), jnp.ones_like(scale), scale)
  y = x / scale
  if scheme == "nf4":
    mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    q = jnp.searchsorted(mids, y, side="left")  # elementwise (no flattening: a sharded kernel stays split)
  else:
    lo, hi = _RANGE[scheme]
    q = jnp.clip(jnp.round(y), lo, hi)
  values = q.astype(_STORED[scheme]).reshape(w.shape)
  scale = scale.reshape(scale.shape[: ax + 1] + scale.shape[ax + 2 :]) if tile else scale
  return QArray(values, scale, scheme, base, in_axes, tile, tuple(stack), w.ndim if stack else 0)


def levels(q: QArray) -> jax.Array:
  """The quantized values as float32 before scaling (ints, or the NF4 table's entries)."""
  if q.scheme == "nf4":
    return jnp.asarray(NF4)[q.values.astype(jnp.int32)]
  return q.values.astype(jnp.float32)


def dequantize(q: QArray, dtype: Any = None) -> jax.Array:
  """The float kernel ``q`` stands for, in ``dtype`` (default: the dtype it was quantized from)."""
  return _dequantize(q, jnp.dtype(q.dtype if dtype is None else dtype).name)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q: QArray, dtype: str) -> jax.Array:
  ax = q.tiled_axis
  x = _blocked(levels(q), ax, q.tile)
  s = jnp.expand_dims(q.scale, ax + 1) if q.tile else q.scale
  return (x * s).reshape(q.shape).astype(dtype)


def array(w: Any) -> jax.Array:
  """``w`` as a plain array: a :class:`QArray` dequantized, anything else as it is."""
  return dequantize(w) if isinstance(w, QArray) else w


def describe(w: Any) -> str | None:
  """``"int8"``, ``"nf4/tile 32"``, ...: how a base kernel is stored (None: not quantized)."""
  if not isinstance(w, QArray):
    return None
  return w.scheme + (f"/tile {w.tile}" if w.tile else "")
