"""The adapted-kernel pytree node and the DeLoRA math on it (METHOD.md)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

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
  layer axes. The static ``in_axes``/``out_axes`` are negative axis numbers of
  ``w``, so slicing leading stacked axes (``nn.scan``, ``vmap``) keeps them valid.
  Users do not build these by hand: :func:`delora_jax.wrap` does.
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

  def replace(self, **changes: Any) -> DeloraKernel:
    """A copy with the given fields changed (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)

  @property
  def rank(self) -> int:
    """The adapter rank ``r`` (the last axis of ``a``)."""
    return self.a.shape[-1]

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
  meta_fields=["in_axes", "out_axes", "dropout"],
)

TRAINABLE_FIELDS = ("a", "b", "lam")
FROZEN_FIELDS = ("w", "w_norm", "res_a", "res_b")


def is_kernel(x: Any) -> bool:
  return isinstance(x, DeloraKernel)


def _perm(ndim: int, in_axes, out_axes) -> tuple[int, ...]:
  io = [ndim + i for i in in_axes] + [ndim + o for o in out_axes]
  return tuple(range(ndim - len(io))) + tuple(io)


def to_matrix(w: jax.Array, in_axes, out_axes) -> jax.Array:
  """Views a kernel as ``(*S, in_flat, out_flat)``."""
  perm = _perm(w.ndim, in_axes, out_axes)
  wt = jnp.transpose(w, perm) if perm != tuple(range(w.ndim)) else w
  n_stack = w.ndim - len(in_axes) - len(out_axes)
  stack = wt.shape[:n_stack]
  in_flat = math.prod(w.shape[i] for i in in_axes)
  out_flat = math.prod(w.shape[o] for o in out_axes)
  return wt.reshape(*stack, in_flat, out_flat)


def from_matrix(m: jax.Array, shape, in_axes, out_axes) -> jax.Array:
  """Inverse of :func:`to_matrix` for a kernel of ``shape``."""
  ndim = len(shape)
  perm = _perm(ndim, in_axes, out_axes)
  m = m.reshape(tuple(shape[p] for p in perm))
  inv = tuple(sorted(range(ndim), key=lambda i: perm[i]))
  return jnp.transpose(m, inv) if perm != tuple(range(ndim)) else m


def in_norms(w: jax.Array, in_axes, out_axes) -> jax.Array:
  """``w_norm (*S, in_flat)``: float32 norms of the kernel's input rows, in matrix-view order.

  Reduced over the output axes in w's own layout, then only the small result is
  transposed and flattened, so a sharded kernel is never rearranged (or gathered).
  """
  w = jnp.asarray(w).astype(jnp.float32)
  ndim = w.ndim
  norms = jnp.sqrt(jnp.sum(w * w, axis=tuple(ndim + o for o in out_axes)))  # (*S, *in, sorted)
  n_stack = ndim - len(in_axes) - len(out_axes)
  order = sorted(ndim + i for i in in_axes)
  perm = tuple(range(n_stack)) + tuple(n_stack + order.index(ndim + i) for i in in_axes)
  if perm != tuple(range(norms.ndim)):
    norms = jnp.transpose(norms, perm)
  return norms.reshape(*norms.shape[:n_stack], -1)


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
  with a residual), ``v = diag(1 / |b_k|) b`` is ``(*S, r, out)`` (see
  :func:`normalised`). ``w_norm`` and the residual are treated as constants (no
  gradient flows into them).
  """
  w_norm = lax.stop_gradient(k.w_norm)
  u, v = normalised(k.a, k.b, k.lam)
  if k.res_a is not None:
    u = jnp.concatenate([u, -lax.stop_gradient(k.res_a)], axis=-1)
    v = jnp.concatenate([v, lax.stop_gradient(k.res_b)], axis=-2)
  return w_norm[..., :, None] * u, v


def delta_matrix(k: DeloraKernel) -> jax.Array:
  """Dense ``ΔW`` in the matrix view ``(*S, in, out)``, adapter dtype."""
  u, v = factors(k)
  return jnp.matmul(u, v, precision=lax.Precision.HIGHEST)


def delta(k: DeloraKernel) -> jax.Array:
  """Dense ``ΔW`` in the kernel's own shape, adapter dtype."""
  return from_matrix(delta_matrix(k), k.w.shape, k.in_axes, k.out_axes)


def merged(k: DeloraKernel) -> jax.Array:
  """``w + ΔW`` in the base dtype; no gradient reaches ``w``."""
  w = lax.stop_gradient(jnp.asarray(k.w))
  return w + delta(k).astype(w.dtype)
