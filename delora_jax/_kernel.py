"""The adapted-kernel pytree node and the DeLoRA math on it (METHOD.md)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from delora_jax import _quant

#: Lower clamp of the rank-one norms, part of PEFT's definition of DeLoRA.
NORM_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class DeloraKernel:
  """A frozen kernel ``w`` together with its DeLoRA adapter.

  This node stands in the parameter tree where the plain kernel was. Its array
  children are ``w`` (the untouched pretrained kernel), ``a`` ``(*S, in, r)``,
  ``b`` ``(*S, r, out)``, ``lam`` ``(*S,)``, ``w_norm`` ``(*S, in)`` and, for the
  paper's residual initialisation only, ``res_a``/``res_b`` (the frozen initial
  update, ``ΔW0 = diag(w_norm) @ res_a @ res_b``). ``S`` are stacked (scanned)
  layer axes.

  Two layouts. Leading stacked axes (``stack == ()``): the static
  ``in_axes``/``out_axes`` are negative axis numbers of ``w``, so slicing leading
  stacked axes (``nn.scan``, ``vmap``) keeps them valid, and the adapters hold
  ``S`` first, as above. Stacked axes elsewhere (``stack``: their positions in
  the stored ``w``, e.g. ``(1,)`` for MaxText's ``param_scan_axis=1``):
  ``in_axes``/``out_axes`` are positions in the stored ``w`` too, and every adapter
  array holds its stacked axes at those same positions and its own axes (``a``: in, r;
  ``b``: r, out; ``w_norm``: in) in order in the other positions, followed there by
  size-1 axes where it has too few axes for the stacked positions to exist (``lam``
  ``(1, L)`` for ``stack=(1,)``). A framework that slices or moves axis ``p`` of every array
  (``nn.scan(variable_axes={"params": p})``) thus slices kernel and adapters alike;
  a kernel seen with fewer axes than it was stored with has lost its first stacked
  axes. Users do not build these by hand: :func:`delora_jax.wrap` does.
  """

  w: Any
  a: Any
  b: Any
  lam: Any
  w_norm: Any
  res_a: Any = None
  res_b: Any = None
  in_axes: tuple[int, ...] = (-2,)
  out_axes: tuple[int, ...] = (-1,)
  dropout: float = 0.0
  stack: tuple[int, ...] = ()

  def replace(self, **changes: Any) -> DeloraKernel:
    """A copy with the given fields changed (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)

  @property
  def rank(self) -> int:
    """The adapter rank ``r`` (the last axis of ``a`` as :func:`canonical` lays it out)."""
    return self.a.shape[body_axis(self.stack, "a", self.a.ndim, 1)]

  def __array__(self, *args: Any, **kwargs: Any):
    raise TypeError(
      "A DeLoRA-adapted kernel was used as a plain array: the parameter tree "
      "holds DeloraKernel nodes made by `delora_jax.wrap`, which plain "
      "`model.apply` cannot read. Call `delora_jax.apply(model, variables, "
      "...)` instead, or pass `delora_jax.merge(params)` (plain arrays). In Flax NNX "
      "code, do not put a wrapped State into a model: adapt the model itself with "
      "`delora_jax.nnx.wrap(model, rules)` and call it."
    )

  def __jax_array__(self):
    return self.__array__()

  # Array-like use by layers delora_jax did not write (``kernel.astype(x.dtype)``,
  # ``x @ kernel.T``, ...). A plain DeloraKernel refuses (see ``__array__``); inside
  # ``delora_jax.apply`` the kernel resolves to its factorised or merged form.
  def _array(self) -> jax.Array:
    return self.__jax_array__()

  def __getattr__(self, name: str) -> Any:
    if name in _ARRAY_METHODS:
      return getattr(self._array(), name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


_ARRAY_METHODS = frozenset({"astype", "T", "transpose", "reshape", "swapaxes", "squeeze"})


def _forward(op: str) -> Any:
  def method(self: DeloraKernel, *args: Any) -> jax.Array:
    return getattr(self._array(), op)(*args)

  method.__name__ = op
  return method


for _op in ("getitem", "matmul", "rmatmul", "mul", "rmul", "add", "radd", "sub", "rsub", "truediv", "neg"):
  setattr(DeloraKernel, f"__{_op}__", _forward(f"__{_op}__"))


jax.tree_util.register_dataclass(
  DeloraKernel,
  data_fields=["w", "a", "b", "lam", "w_norm", "res_a", "res_b"],
  meta_fields=["in_axes", "out_axes", "dropout", "stack"],
)

TRAINABLE_FIELDS = ("a", "b", "lam")
FROZEN_FIELDS = ("w", "w_norm", "res_a", "res_b")


def is_kernel(x: Any) -> bool:
  return isinstance(x, DeloraKernel)


#: Axes of each adapter field besides its stacked ones: a (in, r), b (r, out), lam (), w_norm (in,).
BODY_NDIM = {"a": 2, "b": 2, "lam": 0, "w_norm": 1, "res_a": 2, "res_b": 2}


def layout_positions(stack, in_axes, out_axes, ndim: int) -> tuple[tuple[int, ...], ...]:
  """``(stacks, ins, outs)``: positions in a kernel array of ``ndim`` axes of its stacked,
  input and output axes (see :class:`DeloraKernel` for the two layouts).

  With stacked axes at ``stack`` (positions in the stored kernel), a kernel seen
  with ``k`` fewer axes than stored has lost its first ``k`` stacked axes (a scan
  sliced them off), so every later axis moved ``k`` places to the left.
  """
  if not stack:
    ins = tuple(ndim + a for a in in_axes)
    outs = tuple(ndim + a for a in out_axes)
    return tuple(range(ndim - len(ins) - len(outs))), ins, outs
  stored = len(stack) + len(in_axes) + len(out_axes)
  cut = stored - ndim
  if not 0 <= cut <= len(stack):
    raise ValueError(
      f"a kernel stored with {stored} axes (stacked axes at positions {tuple(stack)}) is used with "
      f"{ndim} axes; a scan can only remove stacked axes. Wrap the kernel with its stored layout."
    )
  gone = stack[:cut]

  def seen(q: int) -> int:
    return q - sum(p < q for p in gone)

  return tuple(seen(p) for p in stack[cut:]), tuple(map(seen, in_axes)), tuple(map(seen, out_axes))


def positions(k: DeloraKernel, ndim: int | None = None) -> tuple[tuple[int, ...], ...]:
  """``(stacks, ins, outs)`` of ``k``'s kernel as seen (``k.w``, or an array of ``ndim`` axes)."""
  return layout_positions(k.stack, k.in_axes, k.out_axes, k.w.ndim if ndim is None else ndim)


def stored_axes(k: DeloraKernel, ndim: int, lead: int = 0) -> tuple[int, ...]:
  """For each axis of ``k``'s kernel seen with ``ndim`` axes, its axis in the stored kernel
  (``lead``: leading stacked axes sliced off, for the leading layout)."""
  if not k.stack:
    return tuple(lead + p for p in range(ndim))
  stored = len(k.stack) + len(k.in_axes) + len(k.out_axes)
  gone = set(k.stack[: stored - ndim])
  return tuple(q for q in range(stored) if q not in gone)


def _field_stacks(stack, nb: int, ndim: int) -> tuple[int, ...]:
  """Positions of the stacked axes in an adapter array of ``ndim`` axes, ``nb`` of them its own."""
  if not stack:
    return tuple(range(ndim - nb))
  stored = max(len(stack) + nb, stack[-1] + 1)
  cut = min(stored - ndim, len(stack))  # an array rebuilt without padding axes has lost them all
  return tuple(p - cut for p in stack[cut:])


def body_axis(stack, field: str, ndim: int, i: int) -> int:
  """Position of the ``i``-th own axis of adapter ``field`` (e.g. ``a``'s input axis: 0) in an
  array of ``ndim`` axes."""
  st = _field_stacks(stack, BODY_NDIM[field], ndim)
  return [q for q in range(ndim) if q not in st][i]


def _moveaxis(x: Any, src: tuple[int, ...], dst: tuple[int, ...]) -> Any:
  """``jnp.moveaxis``, also of an abstract array (a ``ShapeDtypeStruct``: its sharding's spec moved alike)."""
  if not isinstance(x, jax.ShapeDtypeStruct):
    return jnp.moveaxis(x, src, dst)
  perm = [p for p in range(x.ndim) if p not in src]
  for d, s in sorted(zip(dst, src)):
    perm.insert(d, s)
  sh = x.sharding
  if isinstance(sh, jax.sharding.NamedSharding):
    spec = tuple(sh.spec) + (None,) * (x.ndim - len(sh.spec))
    sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*(spec[p] for p in perm)))
  return jax.ShapeDtypeStruct(tuple(x.shape[p] for p in perm), x.dtype, sharding=sh)


def _reshape(x: Any, shape: tuple[int, ...]) -> Any:
  """``x.reshape(shape)`` where only size-1 axes come or go (an abstract array keeps its spec's entries)."""
  if not isinstance(x, jax.ShapeDtypeStruct):
    return x.reshape(shape)
  sh = x.sharding
  if isinstance(sh, jax.sharding.NamedSharding):
    spec = (tuple(sh.spec) + (None,) * len(shape))[: len(shape)]
    sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*spec))
  return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sh)


def lead(x: Any, stack, field: str) -> Any:
  """Adapter array ``field`` with its stacked axes first and no padding axes: ``(*S, *own)``."""
  if x is None or not stack:
    return x
  nb = BODY_NDIM[field]
  st = _field_stacks(stack, nb, x.ndim)
  ns = len(st)
  if st != tuple(range(ns)):
    x = _moveaxis(x, st, tuple(range(ns)))
  return x if x.ndim == ns + nb else _reshape(x, tuple(x.shape[: ns + nb]))


def place(x: Any, stack, field: str) -> Any:
  """Inverse of :func:`lead`: ``(*S, *own)`` with the stacked axes moved to positions ``stack``
  (padded with trailing size-1 axes where the array has too few axes for them)."""
  if x is None or not stack or tuple(stack) == tuple(range(len(stack))):
    return x
  ns, nb = len(stack), BODY_NDIM[field]
  n = max(ns + nb, stack[-1] + 1)
  if n > x.ndim:
    x = _reshape(x, tuple(x.shape) + (1,) * (n - x.ndim))
  return _moveaxis(x, tuple(range(ns)), tuple(stack))


def canonical(k: DeloraKernel) -> dict[str, Any]:
  """``k``'s adapter arrays (``a``, ``b``, ``lam``, ``w_norm``, ``res_a``, ``res_b``; None where
  absent) in the leading layout ``(*S, *own)``, whatever layout ``k`` stores them in."""
  return {f: lead(getattr(k, f), k.stack, f) for f in BODY_NDIM}


def _perm(ndim: int, in_axes, out_axes, stack=()) -> tuple[int, ...]:
  stacks, ins, outs = layout_positions(stack, in_axes, out_axes, ndim)
  return stacks + ins + outs


def to_matrix(w: jax.Array, in_axes, out_axes, stack=()) -> jax.Array:
  """Views a kernel as ``(*S, in_flat, out_flat)``."""
  perm = _perm(w.ndim, in_axes, out_axes, stack)
  wt = jnp.transpose(w, perm) if perm != tuple(range(w.ndim)) else w
  n_stack = w.ndim - len(in_axes) - len(out_axes)
  stack_shape = wt.shape[:n_stack]
  in_flat = math.prod(w.shape[i] for i in perm[n_stack : n_stack + len(in_axes)])
  out_flat = math.prod(w.shape[o] for o in perm[n_stack + len(in_axes) :])
  return wt.reshape(*stack_shape, in_flat, out_flat)


def from_matrix(m: jax.Array, shape, in_axes, out_axes, stack=()) -> jax.Array:
  """Inverse of :func:`to_matrix` for a kernel of ``shape``."""
  ndim = len(shape)
  perm = _perm(ndim, in_axes, out_axes, stack)
  m = m.reshape(tuple(shape[p] for p in perm))
  inv = tuple(sorted(range(ndim), key=lambda i: perm[i]))
  return jnp.transpose(m, inv) if perm != tuple(range(ndim)) else m


def in_norms(w: jax.Array, in_axes, out_axes, stack=()) -> jax.Array:
  """``w_norm (*S, in_flat)``: float32 norms of the kernel's input rows, in matrix-view order
  (stacked axes first, also for a kernel that stores them elsewhere).

  Reduced over the output axes in w's own layout, then only the small result is
  transposed and flattened, so a sharded kernel is never rearranged (or gathered).
  """
  w = jnp.asarray(w).astype(jnp.float32)
  stacks, ins, outs = layout_positions(stack, in_axes, out_axes, w.ndim)
  norms = jnp.sqrt(jnp.sum(w * w, axis=outs))  # (remaining axes in w's order)
  # A row whose squares overflow (entries past ~1e19) but whose norm does not: scaled by its
  # largest entry first. Elsewhere the plain sum stands, bit for bit.
  top = jnp.max(jnp.abs(w), axis=outs, keepdims=True)
  scaled = jnp.squeeze(top, outs) * jnp.sqrt(jnp.sum(jnp.square(w / jnp.where(top > 0, top, 1.0)), axis=outs))
  norms = jnp.where(jnp.isinf(norms) & jnp.isfinite(jnp.squeeze(top, outs)), scaled, norms)
  remaining = sorted(stacks + ins)
  perm = tuple(remaining.index(p) for p in stacks + ins)
  if perm != tuple(range(norms.ndim)):
    norms = jnp.transpose(norms, perm)
  return norms.reshape(*norms.shape[: len(stacks)], -1)


def _wide(x: jax.Array) -> jax.Array:
  """``x`` in at least float32, where sums of squares neither underflow nor overflow."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def clamped_norm(x: jax.Array, axis: int) -> jax.Array:
  """``max(||x||_2, NORM_EPS)`` along ``axis``, in at least float32; zero gradient below the clamp.

  The square root is taken of the clamped sum of squares, so the gradient is
  finite (zero) at the zero vector, as torch's ``clamp(norm, min)`` gives. The
  sum is taken in float32 even for float16 factors, whose range holds neither
  ``NORM_EPS ** 2`` (it rounds to 0) nor the square of a moderately large entry.
  """
  x = _wide(x)
  sq = jnp.sum(x * x, axis=axis)
  return jnp.sqrt(jnp.maximum(sq, jnp.asarray(NORM_EPS * NORM_EPS, sq.dtype)))


def scales(a: jax.Array, b: jax.Array, lam: jax.Array) -> jax.Array:
  """``s[k] = (λ / r) / (max(|a_k|, eps) max(|b_k|, eps))``, shape ``(*S, r)``, at least float32."""
  r = a.shape[-1]
  return (_wide(lam)[..., None] / r) / (clamped_norm(a, -2) * clamped_norm(b, -1))


def normalised(a: jax.Array, b: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(a diag(λ / (r |a_k|)), diag(1 / |b_k|) b)``: ``a diag(s) b`` split into two bounded halves.

  Their product is ``a diag(s) b``, but neither half carries the product of the
  norms: every column of the first has norm ``|λ| / r`` and every row of the
  second norm at most 1, whatever the scale of ``a`` and ``b``. So nothing
  overflows for large factors (a huge learning rate) nor for float16 factors
  with a small norm, where ``s`` alone exceeds float16's range. The scale is
  computed in float32 and the halves are returned in the factors' dtype.
  """
  r = a.shape[-1]
  sa = (_wide(lam)[..., None] / r) / clamped_norm(a, -2)
  sb = 1.0 / clamped_norm(b, -1)
  return ((_wide(a) * sa[..., None, :]).astype(a.dtype), (_wide(b) * sb[..., :, None]).astype(b.dtype))


def factors(k: DeloraKernel) -> tuple[jax.Array, jax.Array]:
  """Low-rank factors ``(u, v)`` with ``ΔW = u @ v`` (matrix view).

  ``u = diag(w_norm) a diag(λ / (r |a_k|))`` is ``(*S, in, r)`` (``(*S, in, 2r)``
  with a residual), ``v = diag(1 / |b_k|) b`` is ``(*S, r, out)``, stacked axes
  first whatever the layout (see
  :func:`normalised`). ``w_norm`` and the residual are treated as constants (no
  gradient flows into them).
  """
  c = canonical(k)
  w_norm = lax.stop_gradient(c["w_norm"])
  u, v = normalised(c["a"], c["b"], c["lam"])
  if c["res_a"] is not None:
    u = jnp.concatenate([u, -lax.stop_gradient(c["res_a"])], axis=-1)
    v = jnp.concatenate([v, lax.stop_gradient(c["res_b"])], axis=-2)
  return w_norm[..., :, None] * u, v


def contraction_factors(k: DeloraKernel, *dtypes: Any) -> tuple[jax.Array, jax.Array]:
  """:func:`factors` as a contraction takes them; ``dtypes`` are the base's and the compute dtype.

  Where nothing is float16 (the factors are float32/float64, no dtype in ``dtypes`` is float16) and
  there is no residual, the scales go wholly into ``v``: ``u = diag(w_norm) a``, ``v = diag(s) b``
  with ``s = λ / (r |a_k| |b_k|)``. The product is :func:`factors`' to rounding, and a's side needs
  no per-column scale nor its gradient's reduction against ``a``: about 3 flops per entry of ``a``
  fewer per train step, which counts where the adapters are replicated and each chip has few
  tokens (``benchmarks/maxtext_fsdp.py``). Every entry stays in float32's range, as ``|a_k|`` and
  ``|b_k|`` lie between ``NORM_EPS`` and the optimizer's ``factor_limit``. float16 anywhere keeps
  the bounded halves of :func:`normalised`, whose entries float16 holds at any factor scale. The
  generic evaluator passes the base's dtype only (the compute dtype is not known where it builds
  the factors); its contractions in float16 rebalance the factors first (``_ops._factors``).
  """
  c = canonical(k)
  a, b = c["a"], c["b"]
  wide = all(jnp.dtype(x.dtype).itemsize >= 4 for x in (a, b))
  if not wide or c["res_a"] is not None or any(jnp.dtype(d) == jnp.float16 for d in dtypes if d is not None):
    return factors(k)
  w_norm = lax.stop_gradient(c["w_norm"])
  # λ/r times the two reciprocals, not λ/r over their product: the derivative of a quotient squares
  # its denominator, and (|a_k| |b_k|)² passes float32's range at |a_k| |b_k| ~ 1e19 (each factor may
  # reach 1e12), where its reciprocal flushes to 0 and the norms' gradient terms vanish silently.
  s = (_wide(c["lam"])[..., None] / a.shape[-1]) * (1.0 / clamped_norm(a, -2)) * (1.0 / clamped_norm(b, -1))
  return w_norm[..., :, None] * a, (b * s[..., :, None]).astype(b.dtype)


def delta_matrix(k: DeloraKernel) -> jax.Array:
  """Dense ``ΔW`` in the matrix view ``(*S, in, out)`` (stacked axes first), adapter dtype."""
  u, v = factors(k)
  return jnp.matmul(u, v, precision=lax.Precision.HIGHEST)


def delta(k: DeloraKernel) -> jax.Array:
  """Dense ``ΔW`` in the kernel's own shape, adapter dtype."""
  return from_matrix(delta_matrix(k), k.w.shape, k.in_axes, k.out_axes, k.stack)


def merged(k: DeloraKernel) -> jax.Array:
  """``w + ΔW`` in the base dtype (a quantized base dequantized first); no gradient reaches ``w``."""
  w = lax.stop_gradient(_quant.array(k.w))
  return w + delta(k).astype(w.dtype)
