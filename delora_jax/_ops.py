"""The factorised ops: every layer kind that runs without a dense ``ΔW``.

One file lists what runs factorised, for Linen and NNX alike:

- :func:`dense`: flax's own ``nn.Dense``/``nn.DenseGeneral`` and ``nnx.Linear``/
  ``nnx.LinearGeneral`` as one custom-JVP op (:func:`lowrank`): one output
  buffer on XLA:CPU, only ``(tokens, r)`` products in the backward pass.
- :func:`dot`: any ``lax.dot_general`` (``jnp.einsum``, ``jnp.dot``, ``@``) that
  contracts an adapted kernel over its input axes (stacked axes may be batch
  axes).
- :func:`conv`: ``lax.conv_general_dilated`` over the kernel's input axes.
- :func:`ragged_dot`: ``lax.ragged_dot``/``ragged_dot_general`` of MoE experts
  (the expert axis stacked): the low-rank branch grouped the same way.

The interpreter (:mod:`delora_jax._interpret`) calls them only for a contraction
over the kernel's input axes; each returns ``None`` where its form does not apply
otherwise, and the op is then computed on ``w + ΔW`` and reported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from delora_jax import _kernel, _quant


def acc(dtype: Any) -> jnp.dtype:
  """Accumulation dtype: float32 for low-precision compute, else the compute dtype."""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


def cast(x: jax.Array, dtype: Any) -> jax.Array:
  """``x`` in ``dtype``, emitting no convert when it already is (XLA:CPU keeps f32->f32
  converts inside fusions, and cost analysis counts them)."""
  return x if x.dtype == jnp.dtype(dtype) else lax.convert_element_type(x, dtype)


def branch_input(x: jax.Array, rate: float, key: Any) -> jax.Array:
  """PEFT's ``module_dropout``: dropout on the adapter branch's input (none without a key)."""
  if rate > 0.0 and key is not None:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
  return x


# ---------------------------------------------------------------- fused dense


def _contract(x, y, dims, precision=None, out=None):
  """``lax.dot_general`` over ``dims`` with no batch axes, result in ``out``."""
  return lax.dot_general(x, y, (dims, ((), ())), precision=precision, preferred_element_type=out)


_NN = ((1,), (0,))  # a @ b


def _joined(x, h, w, v, precision):
  # One matmul over [x | h] and [w; v]: XLA:CPU does not fuse an add into a
  # matmul's output, so ``x @ w + h @ v`` would leave two output-sized buffers
  # that its fusion pass re-adds inside every consumer, keeping both alive
  # until the backward pass. One dot yields one buffer. [w; v] is a transient
  # copy of the frozen weight, dead before the backward pass; no ΔW and no
  # weight gradient is ever formed.
  return _contract(jnp.concatenate([x, h], axis=1), jnp.concatenate([w, v], axis=0), _NN, precision)


def _split(x, h, w, v, precision):
  # GPU/TPU compilers can fold the add into the second matmul (its epilogue), and a
  # concatenation along a sharded input axis would gather the kernel.
  return _contract(x, w, _NN, precision) + _contract(h, v, _NN)


def join_on_cpu() -> bool:
  """Whether CPU lowerings use the joined matmul: only where this process sees a
  single device. On a multi-device mesh the [w; v] concatenation runs along a
  possibly sharded input axis and would gather the kernel, so sharded (and
  pmapped) programs keep the split form everywhere."""
  return jax.process_count() == 1 and jax.local_device_count() == 1


def _lowrank_out(x, xd, w, u, v, precision):
  h = _contract(xd, u.astype(x.dtype), _NN, out=acc(x.dtype)).astype(x.dtype)
  args = (x, h, w, v.astype(x.dtype))
  split = functools.partial(_split, precision=precision)
  if not join_on_cpu():
    return split(*args), h
  joined = functools.partial(_joined, precision=precision)
  return lax.platform_dependent(*args, cpu=joined, default=split), h


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def lowrank(x, xd, w, u, v, precision):
  """``x @ w + ((xd @ u) @ v)`` for ``x, xd (T, in)``, ``w (in, out)``, ``u (in, r)``,
  ``v (r, out)``; ``x``, ``xd`` and ``w`` in the compute dtype. ``w`` gets no
  derivative. Its derivative rule is linear in the tangents of ``x``, ``xd``, ``u``
  and ``v``, so forward mode (``jax.jvp``, ``jacfwd``) works, and reverse mode
  (its transpose) forms only ``(T, r)``, ``(in, r)`` and ``(r, out)`` products
  besides ``dx``, keeping ``xd`` and ``h = xd @ u`` as the only activations."""
  return _lowrank_out(x, xd, w, u, v, precision)[0]


def _zero(t) -> bool:
  return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _lowrank_jvp(precision, primals, tangents):
  x, xd, w, u, v = primals
  dx, dxd, _, du, dv = tangents  # w is frozen: its tangent is ignored
  y, h = _lowrank_out(x, xd, w, u, v, precision)
  cdt = x.dtype
  a = acc(cdt)
  terms = []
  if not _zero(dxd):
    terms.append(_contract(dxd, u.astype(cdt), _NN, out=a))
  if not _zero(du):
    terms.append(_contract(xd, du.astype(cdt), _NN, out=a))
  out = [] if _zero(dx) else [_contract(dx, w, _NN, precision)]
  if terms:
    out.append(_contract(sum(terms[1:], terms[0]).astype(cdt), v.astype(cdt), _NN))
  if not _zero(dv):
    out.append(_contract(h, dv.astype(cdt), _NN))
  dy = sum(out[1:], out[0]) if out else jnp.zeros_like(y)
  return y, dy.astype(y.dtype)


lowrank.defjvp(_lowrank_jvp, symbolic_zeros=True)


def _widths(x, w, n_in: int, feats: tuple[int, ...], path: str) -> tuple[tuple[int, ...], int, int]:
  """``(leading shape, in_flat, out_flat)`` of a Dense layer's input ``x`` and kernel ``w``."""
  lead, n_i = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in :])
  n_o = math.prod(feats)
  if n_i * n_o != math.prod(w.shape):
    raise ValueError(
      f"{path}: the layer's input has trailing shape {tuple(x.shape[x.ndim - n_in :])}, but its "
      f"kernel {tuple(w.shape)} expects inputs of shape {tuple(w.shape[:n_in])}. Pass inputs "
      "of the width the model was built (and wrapped) for."
    )
  return lead, n_i, n_o


def dense(x, xd, w, u, v, bias, precision, n_in: int, feats: tuple[int, ...], path: str) -> jax.Array:
  """A Dense layer over the trailing ``n_in`` axes of ``x`` as one :func:`lowrank` on
  ``(tokens, in)``: ``x``, ``xd`` (the branch input), ``w`` and ``bias`` already in the
  compute dtype; ``u (in_flat, r)``, ``v (r, out_flat)`` the kernel's factors."""
  lead, n_i, n_o = _widths(x, w, n_in, feats, path)
  y = lowrank(x.reshape(-1, n_i), xd.reshape(-1, n_i), lax.stop_gradient(w).reshape(n_i, n_o), u, v, precision)
  if bias is not None:
    y = y + bias.reshape(1, n_o)
  return y.reshape(*lead, *feats)


# ---------------------------------------------------------------- quantized base


def _per_channel_int8(q: Any) -> bool:
  return q.scheme == "int8" and q.tile is None


def qdense(x, xd, q, u, v, bias, precision, n_in: int, feats: tuple[int, ...], path: str) -> jax.Array:
  """:func:`dense` on a base stored quantized (:class:`delora_jax._quant.QArray`): int8 with
  per-channel scales contracts ``x`` with the int values and scales the output; tiled int8 and
  4-bit bases are dequantized (whole, in the compute dtype) and then contracted. Plain autodiff:
  the frozen base gets no derivative (int values, scales held constant), the branch forms only
  ``(tokens, r)``, ``(in, r)`` and ``(r, out)`` products."""
  lead, n_i, n_o = _widths(x, q, n_in, feats, path)
  cdt, x2 = x.dtype, x.reshape(-1, n_i)
  scale = lax.stop_gradient(q.scale)
  if _per_channel_int8(q):
    y = _contract(x2, q.values.reshape(n_i, n_o), _NN, precision, out=acc(cdt))
    y = (y * scale.reshape(1, n_o).astype(y.dtype)).astype(cdt)
  else:
    w = _quant.dequantize(dataclasses.replace(q, scale=scale), cdt)
    y = _contract(x2, w.reshape(n_i, n_o), _NN, precision)
  h = _contract(xd.reshape(-1, n_i), u.astype(cdt), _NN, out=acc(cdt)).astype(cdt)
  y = y + _contract(h, v.astype(cdt), _NN)
  if bias is not None:
    y = y + bias.reshape(1, n_o)
  return y.reshape(*lead, *feats)


def qdot(q: Any, x: jax.Array, lazy_is_lhs: bool, params: dict, out_dtype: Any) -> jax.Array | None:
  """A ``dot_general`` of ``x`` with an int8 per-channel kernel ``q`` (as stored, contracted over
  its input axes, no batch axes) on the int values, the output scaled per channel; else None."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  kc = lc if lazy_is_lhs else rc
  ins = list(q.input_axes)
  if not _per_channel_int8(q) or lb or rb or sorted(kc) != ins:
    return None
  a = acc(x.dtype)
  lhs, rhs = (q.values, x) if lazy_is_lhs else (x, q.values)
  y = lax.dot_general(
    lhs, rhs, params["dimension_numbers"], precision=params.get("precision"), preferred_element_type=a
  )
  s = lax.stop_gradient(q.scale).reshape([n for p, n in enumerate(q.shape) if p not in ins]).astype(a)
  n_xf = x.ndim - len(kc)
  s = s.reshape((*s.shape, *(1,) * n_xf) if lazy_is_lhs else ((1,) * n_xf + s.shape))
  return (y * s).astype(out_dtype)


# ---------------------------------------------------------------- generic contractions


def _factors(lz: Any, cdt: Any) -> tuple[jax.Array, jax.Array]:
  """``lz``'s ``u (*S, *ins, r)`` and ``v (*S, r, *outs)`` for a contraction in ``cdt``.

  The generic evaluator builds the factors knowing the base's dtype only, so a float32 base
  computed in float16 may hold them folded (``_kernel.contraction_factors``: ``u`` of the size of
  ``a``, ``v`` of its reciprocal), which float16 holds neither way round. In float16 each column of
  ``u`` is brought to norm 1 in float32 first, ``v`` scaled to match: the same product, and the
  bounded halves' ranges.
  """
  u, v = lz.u, lz.v
  if jnp.dtype(cdt) != jnp.float16:
    return u, v
  ns = len(lz.stacks)
  c = _kernel.clamped_norm(u.reshape(*u.shape[:ns], -1, u.shape[-1]), -2)  # (*S, r), float32
  u = (u.astype(c.dtype) / c.reshape(*c.shape[:ns], *(1,) * (u.ndim - ns - 1), -1)).astype(u.dtype)
  v = (v.astype(c.dtype) * c.reshape(*c.shape, *(1,) * (v.ndim - ns - 1))).astype(v.dtype)
  return u, v


def dot(lz: Any, x: jax.Array, lazy_is_lhs: bool, params: dict, out: jax.Array) -> jax.Array | None:
  """``out`` (the op on the base) plus the low-rank branch of a ``dot_general``, or None."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  kc, xc = (lc, rc) if lazy_is_lhs else (rc, lc)
  kb, xb = (lb, rb) if lazy_is_lhs else (rb, lb)
  kc, xc, kb, xb = map(tuple, (kc, xc, kb, xb))
  if not set(kb) <= set(lz.stacks) or set(kc) & set(lz.stacks):
    return None
  precision = params.get("precision")
  xd = branch_input(x, lz.src.dropout, lz.key)
  cdt = x.dtype
  pref = None if acc(cdt) == cdt else acc(cdt)
  ns = len(lz.stacks)
  # h = x . u over the input axes (u's axes are ordered like lz.ins), batched over kb.
  x_of = dict(zip(kc, xc))
  u_con = tuple(ns + i for i in range(len(lz.ins)))
  x_con = tuple(x_of[p] for p in lz.ins)
  u_b = tuple(lz.stacks.index(p) for p in kb)
  lu, lv = _factors(lz, cdt)
  h = lax.dot_general(
    cast(xd, cdt), cast(lu, cdt), ((x_con, u_con), (xb, u_b)), precision=precision, preferred_element_type=pref
  )
  # h: (*batch, *x_free, *rest_stack, r)
  rest = [p for p in lz.stacks if p not in kb]
  nb, nxf = len(kb), x.ndim - len(xc) - len(xb)
  h_rest = tuple(range(nb + nxf, nb + nxf + len(rest)))
  v_b = u_b + tuple(lz.stacks.index(p) for p in rest)
  d = lax.dot_general(
    cast(h, cdt),
    cast(lv, cdt),
    (((h.ndim - 1,), (ns,)), (tuple(range(nb)) + h_rest, v_b)),
    precision=precision,
    preferred_element_type=pref,
  )
  # d: (*batch, *rest_stack, *x_free, *outs) -> dot_general's order for the original operands.
  k_free = [p for p in range(lz.base.ndim) if p not in kc and p not in kb]
  pos = {p: nb + i for i, p in enumerate(rest)}
  pos.update({p: nb + len(rest) + nxf + i for i, p in enumerate(lz.outs)})
  xf = list(range(nb + len(rest), nb + len(rest) + nxf))
  kf = [pos[p] for p in k_free]
  perm = list(range(nb)) + (kf + xf if lazy_is_lhs else xf + kf)
  d = lax.transpose(d, perm) if perm != list(range(d.ndim)) else d
  return out + cast(d, out.dtype)


@functools.cache
def _conv_accumulates_differentiably() -> bool:
  """Whether this jax differentiates a float16 convolution with a float32 ``preferred_element_type``
  (jax 0.8's transpose rule refuses it: "requires arguments to have the same dtypes")."""

  def f(x, k):
    return lax.conv_general_dilated(x, k, (1,), "VALID", preferred_element_type=jnp.float32).sum()

  arg = jax.ShapeDtypeStruct((1, 1, 2), jnp.float16)
  try:
    jax.eval_shape(jax.grad(f), arg, arg)
  except TypeError:
    return False
  return True


def conv(lz: Any, x: jax.Array, params: dict, out: jax.Array) -> jax.Array | None:
  """``out`` plus the low-rank branch of a ``conv_general_dilated`` (kernel as rhs), or None."""
  dn = params["dimension_numbers"]
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1 or lz.stacks:
    return None
  o_dim = dn.rhs_spec[0]
  # u as a conv kernel with r output features at the kernel's output-feature axis.
  src_axis = {p: i for i, p in enumerate(lz.ins)}
  src_axis[o_dim] = len(lz.ins)
  cdt = x.dtype
  lu, lv = _factors(lz, cdt)
  uk = jnp.transpose(lu, [src_axis[p] for p in range(lz.base.ndim)])
  pref = None if acc(cdt) == cdt else acc(cdt)
  p = {k: v for k, v in params.items() if k != "preferred_element_type"}
  hdt = cdt
  if pref is not None and not _conv_accumulates_differentiably():
    hdt, pref = pref, None  # the branch's convolution in float32 itself
  h = lax.conv_general_dilated_p.bind(
    cast(branch_input(x, lz.src.dropout, lz.key), hdt), cast(uk, hdt), **p, preferred_element_type=pref
  )
  pref = None if acc(cdt) == cdt else acc(cdt)
  f = dn.out_spec[1]
  d = jnp.tensordot(
    cast(h, cdt), cast(lv.reshape(lv.shape[0], -1), cdt), axes=((f,), (0,)), preferred_element_type=pref
  )
  return out + cast(jnp.moveaxis(d, -1, f), out.dtype)


def ragged_dot(lz: Any, x: jax.Array, group_sizes: jax.Array, params: dict, out: jax.Array) -> jax.Array | None:
  """``out`` plus the grouped low-rank branch of a ``ragged_dot_general`` whose rhs is a stack of
  expert kernels (the group axis stacked, one input and one output axis), or None.

  ``h = ragged_dot(x, u)`` gives each token its expert's ``(in, r)`` projection and
  ``ragged_dot(h, v)`` its ``(r, out)`` one: no per-expert ``ΔW``.
  """
  rdn = params["ragged_dot_dimension_numbers"]
  (xc, kc), (xb, kb) = rdn.dot_dimension_numbers
  groups = tuple(rdn.rhs_group_dimensions)
  if xb or kb or tuple(lz.stacks) != groups or len(lz.ins) != 1 or len(lz.outs) != 1:
    return None
  if params.get("group_offset") is not None:
    return None
  cdt = x.dtype
  pref = None if acc(cdt) == cdt else acc(cdt)
  # u and v laid out like the kernel: (g, in, r) and (g, r, out) in the kernel's axis order.
  g, i, o = groups[0], lz.ins[0], lz.outs[0]
  order = sorted((g, i, o))
  lu, lv = _factors(lz, cdt)
  u = jnp.transpose(lu, [{g: 0, i: 1, o: 2}[p] for p in order])  # r where the output axis is
  v = jnp.transpose(lv, [{g: 0, o: 2, i: 1}[p] for p in order])  # r where the input axis is
  h = lax.ragged_dot_general(
    cast(branch_input(x, lz.src.dropout, lz.key), cdt),
    cast(u, cdt),
    group_sizes,
    rdn,
    precision=params.get("precision"),
    preferred_element_type=pref,
  )
  x_free = [d for d in range(x.ndim) if d not in xc]
  h_rdn = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((h.ndim - 1,), (order.index(i),)), ((), ())),
    lhs_ragged_dimensions=tuple(x_free.index(d) for d in rdn.lhs_ragged_dimensions),
    rhs_group_dimensions=groups,
  )
  d = lax.ragged_dot_general(
    cast(h, cdt), cast(v, cdt), group_sizes, h_rdn, precision=params.get("precision"), preferred_element_type=pref
  )
  return out + cast(d, out.dtype)
