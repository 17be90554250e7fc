"""Factorised evaluation of any code that contracts an adapted kernel.

A module call is traced to a jaxpr with each adapted kernel as a plain input
(a placeholder), then evaluated again here with that input bound to a
:class:`Lazy` value: the frozen kernel ``w`` plus its low-rank update kept as
factors. Layout-preserving ops on it (``convert_element_type``, ``transpose``,
``reshape``, nested ``jit``/``remat``/``custom_jvp`` calls) keep it lazy; a
``dot_general`` or ``conv_general_dilated`` that contracts exactly the
kernel's input axes is computed as ``op(x, w) + (x @ u) @ v``; every other op
gets the merged value ``w + ΔW`` and is recorded as such. This is the single
place that decides "factorised or merged" for code delora_jax did not write
(:mod:`delora_jax._apply` and :mod:`delora_jax._nnx` feed it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax import lax

from delora_jax import _kernel
from delora_jax._kernel import DeloraKernel


class FallbackWarning(UserWarning):
  """An adapted kernel was used outside a factorised layer and was merged."""


def strict_error(path: str, why: str = "outside a layer delora_jax can factorise") -> TypeError:
  return TypeError(
    f"{path}: this adapted kernel is used {why}, so it would be computed through the merged "
    "weight w + ΔW. strict=True forbids that; contract it with a layer or op delora_jax "
    "factorises (any jnp.einsum/jnp.dot/@/lax.dot_general/lax.conv_general_dilated over its "
    "input axes), exclude it from the rules, or call with strict=False to accept the "
    "merged path."
  )


class LayoutError(ValueError):
  """The model contracts an adapted kernel over axes other than its declared inputs."""


@dataclasses.dataclass(eq=False)
class Source:
  """Where a lazy kernel came from: its path, its call's record, dropout (static data:
  hashed by identity)."""

  path: str
  record: Callable[[str, str], None]  # (path, "factorised" | "merged")
  in_axes: tuple[int, ...]  # declared input axes of the stored kernel (positive)
  lead: int = 0  # stacked axes sliced off before the layer sees the kernel (nn.scan)
  strict: bool = False
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class Lazy:
  """A view of an adapted kernel: ``base`` (the same view of ``w``) plus ``u @ v``.

  ``u`` is ``(*stack, *in, r)`` and ``v`` ``(*stack, r, *out)``; ``stacks``,
  ``ins`` and ``outs`` give the view axis of each of their axes, in their order.
  ``axes[p]`` are the stored kernel's axes that view axis ``p`` covers (for errors).
  """

  base: Any
  u: Any
  v: Any
  stacks: tuple[int, ...]
  ins: tuple[int, ...]
  outs: tuple[int, ...]
  src: Source
  axes: tuple[tuple[int, ...], ...] = ()
  key: Any = None  # dropout key of the adapter branch (None: no dropout)

  @property
  def shape(self):
    return self.base.shape

  def delta(self) -> jax.Array:
    """``ΔW`` in this view's axis order and the base dtype."""
    s = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    letter = {p: s[p] for p in range(self.base.ndim)}
    stk = "".join(letter[p] for p in self.stacks)
    eq = (
      f"{stk}{''.join(letter[p] for p in self.ins)}Z,{stk}Z{''.join(letter[p] for p in self.outs)}"
      f"->{''.join(letter[p] for p in range(self.base.ndim))}"
    )
    d = jnp.einsum(eq, self.u, self.v, precision=lax.Precision.HIGHEST)
    return d.astype(self.base.dtype)

  def materialise(self, why: str) -> jax.Array:
    src = self.src
    if src.strict:
      raise strict_error(src.path, f"by `{why}`, which delora_jax cannot compute factorised")
    src.record(src.path, "merged")
    return self.base + self.delta()


jax.tree_util.register_dataclass(
  Lazy, data_fields=["base", "u", "v", "key"], meta_fields=["stacks", "ins", "outs", "src", "axes"]
)


def from_kernel(k: DeloraKernel, w: jax.Array, src: Source, key: Any = None) -> Lazy:
  """The Lazy value of kernel ``k`` whose (possibly sliced) base array is ``w``.

  Axes of ``w`` beyond its layout are stacked axes, each slice with its own adapter
  (``_kernel.positions``: leading ones, or wherever the kernel stores them).
  """
  u, v = _kernel.factors(k)
  nd = w.ndim
  stacks, ins, outs = _kernel.positions(k, nd)
  stack_shape = tuple(w.shape[p] for p in stacks)
  u = u.reshape(*stack_shape, *(w.shape[p] for p in ins), u.shape[-1])
  v = v.reshape(*stack_shape, v.shape[-2], *(w.shape[p] for p in outs))
  axes = tuple((q,) for q in _kernel.stored_axes(k, nd, src.lead))
  return Lazy(w, u, v, stacks, ins, outs, src, axes, key)


# ---------------------------------------------------------------- view ops


def _transpose(lz: Lazy, perm) -> Lazy:
  where = {old: new for new, old in enumerate(perm)}
  return dataclasses.replace(
    lz,
    base=lax.transpose(lz.base, perm),
    stacks=tuple(where[p] for p in lz.stacks),
    ins=tuple(where[p] for p in lz.ins),
    outs=tuple(where[p] for p in lz.outs),
    axes=tuple(lz.axes[p] for p in perm),
  )


def _groups(old: tuple[int, ...], new: tuple[int, ...]):
  """Pairs of (old axes, new axes) runs with equal sizes, or None (size-1 ambiguity)."""
  out, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    gi, gj = [i], [j]
    if i >= len(old) or j >= len(new):
      return None
    po, pn = old[i], new[j]
    i, j = i + 1, j + 1
    while po != pn:
      if po < pn:
        if i >= len(old):
          return None
        po *= old[i]
        gi.append(i)
        i += 1
      else:
        if j >= len(new):
          return None
        pn *= new[j]
        gj.append(j)
        j += 1
    out.append((gi, gj))
  return out


def _reshape(lz: Lazy, new_shape) -> Lazy | None:
  groups = _groups(tuple(lz.base.shape), tuple(new_shape))
  if groups is None:
    return None
  kind = {**dict.fromkeys(lz.stacks, "s"), **dict.fromkeys(lz.ins, "i"), **dict.fromkeys(lz.outs, "o")}
  order = {"s": list(lz.stacks), "i": list(lz.ins), "o": list(lz.outs)}
  # Each run of old axes must be of one kind and consecutive, ascending, in that kind's order.
  new_order: dict[str, list[int]] = {"s": [], "i": [], "o": []}
  sizes: dict[str, list[int]] = {"s": [], "i": [], "o": []}
  runs, axes = {}, [()] * len(new_shape)
  for gi, gj in groups:
    for q in gj:
      axes[q] = tuple(sorted({a for p in gi for a in lz.axes[p]}))
    kinds = {kind[p] for p in gi}
    if len(kinds) != 1:
      return None
    kd = kinds.pop()
    idx = [order[kd].index(p) for p in gi]
    if idx != list(range(idx[0], idx[0] + len(idx))):
      return None
    runs[idx[0], kd] = (gj, [new_shape[q] for q in gj], len(gi))
  for kd in "sio":
    k = 0
    while k < len(order[kd]):
      gj, sz, n_old = runs[k, kd]
      new_order[kd].extend(gj)
      sizes[kd].extend(sz)
      k += n_old
  u = lz.u.reshape(*sizes["s"], *sizes["i"], lz.u.shape[-1])
  v = lz.v.reshape(*sizes["s"], lz.v.shape[len(lz.stacks)], *sizes["o"])
  return Lazy(
    lax.reshape(lz.base, tuple(new_shape)),
    u,
    v,
    tuple(new_order["s"]),
    tuple(new_order["i"]),
    tuple(new_order["o"]),
    lz.src,
    tuple(axes),
    lz.key,
  )


# ---------------------------------------------------------------- contractions


def _acc(dtype) -> jnp.dtype:
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


def _cast(x: jax.Array, dtype) -> jax.Array:
  """``x`` in ``dtype``, emitting no convert when it already is (XLA:CPU keeps f32->f32
  converts inside fusions, and cost analysis counts them)."""
  return x if x.dtype == jnp.dtype(dtype) else lax.convert_element_type(x, dtype)


def _branch_input(lz: Lazy, x: jax.Array) -> jax.Array:
  src = lz.src
  if src.dropout > 0.0 and lz.key is not None:
    keep = jax.random.bernoulli(lz.key, 1.0 - src.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - src.dropout), jnp.zeros_like(x))
  return x


def _check_contraction(lz: Lazy, contracted: tuple[int, ...], op: str) -> None:
  if set(contracted) == set(lz.ins):
    return
  src = lz.src
  got = tuple(sorted({a for p in contracted for a in lz.axes[p]}))
  raise LayoutError(
    f"{src.path}: the model contracts this kernel over its axes {got} (in `{op}`), but its "
    f"layout declares input axes {tuple(sorted(src.in_axes))}. Declare the axes the model "
    f"contracts, e.g. Rule(r, in_axes={got}, ...), or leave the layout out and let "
    "delora_jax infer it: wrap(params, rules, like=(model, *example_args))."
  )


def _dot(lz: Lazy, x: jax.Array, lazy_is_lhs: bool, params: dict, out: jax.Array) -> jax.Array | None:
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  kc, xc = (lc, rc) if lazy_is_lhs else (rc, lc)
  kb, xb = (lb, rb) if lazy_is_lhs else (rb, lb)
  kc, xc, kb, xb = map(tuple, (kc, xc, kb, xb))
  if not set(kb) <= set(lz.stacks) or set(kc) & set(lz.stacks):
    return None
  _check_contraction(lz, kc, "dot_general")
  precision = params.get("precision")
  xd = _branch_input(lz, x)
  cdt = x.dtype
  acc = _acc(cdt)
  ns = len(lz.stacks)
  # h = x . u over the input axes (u's axes are ordered like lz.ins), batched over kb.
  x_of = dict(zip(kc, xc))
  u_con = tuple(ns + i for i in range(len(lz.ins)))
  x_con = tuple(x_of[p] for p in lz.ins)
  u_b = tuple(lz.stacks.index(p) for p in kb)
  pref = None if acc == cdt else acc
  h = lax.dot_general(
    _cast(xd, cdt), _cast(lz.u, cdt), ((x_con, u_con), (xb, u_b)), precision=precision, preferred_element_type=pref
  )
  # h: (*batch, *x_free, *rest_stack, r)
  rest = [p for p in lz.stacks if p not in kb]
  nb, nxf = len(kb), x.ndim - len(xc) - len(xb)
  h_rest = tuple(range(nb + nxf, nb + nxf + len(rest)))
  v_b = u_b + tuple(lz.stacks.index(p) for p in rest)
  d = lax.dot_general(
    _cast(h, cdt),
    _cast(lz.v, cdt),
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
  lz.src.record(lz.src.path, "factorised")
  return out + _cast(d, out.dtype)


def _conv(lz: Lazy, x: jax.Array, params: dict, out: jax.Array) -> jax.Array | None:
  dn = params["dimension_numbers"]
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1 or lz.stacks:
    return None
  o_dim = dn.rhs_spec[0]
  _check_contraction(lz, tuple(p for p in range(lz.base.ndim) if p != o_dim), "conv_general_dilated")
  # u as a conv kernel with r output features at the kernel's output-feature axis.
  src_axis = {p: i for i, p in enumerate(lz.ins)}
  src_axis[o_dim] = len(lz.ins)
  perm = [src_axis[p] for p in range(lz.base.ndim)]
  uk = jnp.transpose(lz.u, perm)
  cdt = x.dtype
  acc = _acc(cdt)
  pref = None if acc == cdt else acc
  p = {k: v for k, v in params.items() if k != "preferred_element_type"}
  h = lax.conv_general_dilated_p.bind(
    _cast(_branch_input(lz, x), cdt), _cast(uk, cdt), **p, preferred_element_type=pref
  )
  f = dn.out_spec[1]
  d = jnp.tensordot(
    _cast(h, cdt), _cast(lz.v.reshape(lz.v.shape[0], -1), cdt), axes=((f,), (0,)), preferred_element_type=pref
  )
  d = jnp.moveaxis(d, -1, f)
  lz.src.record(lz.src.path, "factorised")
  return out + _cast(d, out.dtype)


# ---------------------------------------------------------------- the interpreter


_CALLS = ("jit", "pjit", "closed_call", "core_call")


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = []
  if isinstance(params, tuple):  # older jax: (subfuns, params)
    subfuns, params = params
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*subfuns, *invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def _plain(x, why):
  return x.materialise(why) if isinstance(x, Lazy) else x


def _rule(eqn, invals):
  name = eqn.primitive.name
  lazies = [x for x in invals if isinstance(x, Lazy)]
  if name == "convert_element_type" and jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
    lz = invals[0]
    return [dataclasses.replace(lz, base=_bind(eqn, [lz.base])[0])]
  if name == "copy" or name == "copy_p":
    return [invals[0]]
  if name == "transpose":
    return [_transpose(invals[0], tuple(eqn.params["permutation"]))]
  if name == "reshape" and eqn.params.get("dimensions") is None:
    got = _reshape(invals[0], tuple(eqn.params["new_sizes"]))
    if got is not None:
      return [got]
  if name in _CALLS:
    closed = eqn.params["jaxpr"]
    return evaluate(closed.jaxpr, closed.consts, invals)
  if name == "custom_jvp_call":
    closed = eqn.params["call_jaxpr"]
    return evaluate(closed.jaxpr, closed.consts, invals)
  if name in ("remat2", "checkpoint"):
    jaxpr = eqn.params["jaxpr"]
    fn = jax.checkpoint(
      lambda *a: evaluate(jaxpr, (), list(a)), prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"]
    )
    return fn(*invals)
  if name == "dot_general" and len(lazies) == 1:
    lhs, rhs = invals
    lazy_is_lhs = isinstance(lhs, Lazy)
    lz, x = (lhs, rhs) if lazy_is_lhs else (rhs, lhs)
    if jnp.issubdtype(x.dtype, jnp.inexact):
      base_out = _bind(eqn, [lz.base, x] if lazy_is_lhs else [x, lz.base])[0]
      got = _dot(lz, x, lazy_is_lhs, eqn.params, base_out)
      if got is not None:
        return [got]
  if name == "conv_general_dilated" and isinstance(invals[1], Lazy) and not isinstance(invals[0], Lazy):
    lz, x = invals[1], invals[0]
    base_out = _bind(eqn, [x, lz.base])[0]
    got = _conv(lz, x, eqn.params, base_out)
    if got is not None:
      return [got]
  return _bind(eqn, [_plain(x, name) for x in invals])


def _read(env, v):
  return v.val if isinstance(v, jex.core.Literal) else env[v]


def evaluate(jaxpr, consts, args) -> list:
  """Evaluates ``jaxpr`` on ``args`` (some of them :class:`Lazy`); outputs may be Lazy."""
  env = {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [_read(env, v) for v in eqn.invars]
    if any(isinstance(x, Lazy) for x in invals):
      outs = _rule(eqn, invals)
    else:
      outs = _bind(eqn, invals)
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [_read(env, v) for v in jaxpr.outvars]


def run(fn: Callable[..., Any], bases: list[jax.Array], lazies: list[Lazy]) -> Any:
  """Traces ``fn(*bases)`` and evaluates it with each base bound to its Lazy value."""
  closed, shape = jax.make_jaxpr(fn, return_shape=True)(*bases)
  outs = evaluate(closed.jaxpr, closed.consts, lazies)
  outs = [_plain(x, "a returned kernel") for x in outs]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)
