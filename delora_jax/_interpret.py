"""The interpreter: one evaluation of a traced call, deciding "factorised or merged".

A module call is traced to a jaxpr with each adapted kernel as a plain input
(a placeholder), then evaluated again here with that input bound to a
:class:`Lazy` value: the frozen kernel ``w`` plus its low-rank update kept as
factors. Layout-preserving ops (a float ``convert_element_type``, ``transpose``,
``reshape`` within the layout's groups, a scaling by a scalar, nested
``jit``/``remat`` calls) keep it lazy; the contractions :mod:`delora_jax._ops` lists are computed factorised;
every other op gets the merged value ``w + ΔW`` and is reported
(:mod:`delora_jax._report`). :func:`_rule` is that one decision, for Linen and
NNX alike.

Layout inference is a mode of the same evaluation: a :class:`Lazy` with no
factors (``u is None``) stands for a kernel of unknown layout, and each
contraction that reaches it records the stored axes it contracts
(:class:`Uses`) instead of computing a branch.

Custom derivatives are respected: a kernel that enters a ``custom_jvp`` or
``custom_vjp`` function is merged and the function bound with its own rule.

JAX internals this module relies on (public ``jax.extend`` where it exists):

- primitive names as strings (``pjit``/``jit``, ``closed_call``, ``core_call``,
  ``remat2``/``checkpoint``, ``custom_jvp_call``, ``custom_vjp_call``,
  ``dot_general``, ``conv_general_dilated``, ``ragged_dot_general``,
  ``convert_element_type``, ``copy``/``copy_p``, ``transpose``, ``reshape``):
  there is no public table of them;
- ``Primitive.get_bind_params`` and ``eqn.ctx.manager`` to re-bind an equation
  with its own parameters and context (name stack, sharding), as
  ``jax.core.eval_jaxpr`` does;
- ``jax.extend.core.Literal`` and ``Jaxpr``'s ``invars``/``outvars``/``eqns``;
- ``jax._src.interpreters.partial_eval.dce_jaxpr`` (:func:`delora_jax._report.reached`):
  which adapters a call's outputs depend on, through ``scan``/``cond``/``jit``.

flax internals the front-ends rely on (the only ones):

- Linen (:mod:`delora_jax._linen`): ``Scope._collection``/``Scope._variables`` to let a
  module's scope read placeholder arrays in place of its params (flax has no public hook
  for this), and ``Scope.root.mutable_variables()`` (the live collection dicts) to carry the
  state a traced method writes out of the trace;
- NNX (:mod:`delora_jax._nnx`): ``__class__`` reassignment of a live module to a subclass
  (flax's own ``LoRALinear`` subclasses statically), ``Variable.get_raw_value``/
  ``set_raw_value`` (checked writes of the state a traced call changed), and
  ``nnx.iter_graph`` to find every holder of a tied Variable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax import lax

from delora_jax import _kernel, _ops, _quant, _report
from delora_jax._kernel import DeloraKernel
from delora_jax._report import LayoutError, strict_error


@dataclasses.dataclass
class Uses:
  """What a layout probe saw: per path, the shapes the model saw the kernel with, the axes (of
  that shape) of each contraction, and other ops."""

  shapes: dict[str, set] = dataclasses.field(default_factory=dict)
  contractions: dict[str, set] = dataclasses.field(default_factory=dict)
  others: dict[str, set] = dataclasses.field(default_factory=dict)

  def add(self, path: str, contracted: tuple[int, ...], batch: tuple[int, ...]) -> None:
    self.contractions.setdefault(path, set()).add((contracted, batch))

  def other(self, path: str, op: str) -> None:
    self.others.setdefault(path, set()).add(op)


@dataclasses.dataclass(eq=False)
class Source:
  """Where a lazy kernel came from (static data: hashed by identity)."""

  path: str
  record: Callable[[str, str], None]  # (path, "factorised" | "merged")
  in_axes: tuple[int, ...]  # declared input axes of the stored kernel (positive)
  lead: int = 0  # stacked axes sliced off before the layer sees the kernel (nn.scan)
  strict: bool = False
  dropout: float = 0.0
  uses: Uses | None = None  # layout inference: record contractions instead of computing them
  tied: bool = False  # shared by several layers (NNX tied weights): other contractions are merged, not errors
  defer: bool = False  # other contractions are merged and reported as misfits, raised after the call (Linen)
  quantized: str | None = None  # how the base is stored (Rule(quantize=...)): `base` is it dequantized


@dataclasses.dataclass(frozen=True)
class Lazy:
  """A view of an adapted kernel: ``base`` (the same view of ``w``) plus ``u @ v``.

  ``u`` is ``(*stack, *in, r)`` and ``v`` ``(*stack, r, *out)``; ``stacks``,
  ``ins`` and ``outs`` give the view axis of each of their axes, in their order.
  ``axes[p]`` are the stored kernel's axes that view axis ``p`` covers. With
  ``u = None`` the value has no factors: a probe of unknown layout (``src.uses``
  set), or a merged value whose layout a reshape broke (a later contraction is
  then a :class:`LayoutError`).
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
  q: Any = None  # the quantized kernel `base` dequantizes, while the view is the stored layout

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
    if self.u is None:  # a probe (plain w) or already merged
      if src.uses is not None:
        src.uses.other(src.path, why)
      return self.base
    if src.strict:
      raise strict_error(src.path, f"by `{why}`, which delora_jax cannot compute factorised")
    src.record(src.path, "merged")
    return self.base + self.delta()


jax.tree_util.register_dataclass(
  Lazy, data_fields=["base", "u", "v", "key", "q"], meta_fields=["stacks", "ins", "outs", "src", "axes"]
)


def from_kernel(k: DeloraKernel, w: jax.Array, src: Source, key: Any = None) -> Lazy:
  """The Lazy value of kernel ``k`` whose (possibly sliced) base array is ``w``.

  Axes of ``w`` beyond its layout are stacked axes, each slice with its own adapter
  (``_kernel.positions``: leading ones, or wherever the kernel stores them).
  """
  u, v = _kernel.contraction_factors(k, getattr(w, "dtype", None))
  nd = w.ndim
  stacks, ins, outs = _kernel.positions(k, nd)
  stack_shape = tuple(w.shape[p] for p in stacks)
  u = u.reshape(*stack_shape, *(w.shape[p] for p in ins), u.shape[-1])
  v = v.reshape(*stack_shape, v.shape[-2], *(w.shape[p] for p in outs))
  axes = tuple((q,) for q in _kernel.stored_axes(k, nd, src.lead))
  return Lazy(w, u, v, stacks, ins, outs, src, axes, key, k.w if _quant.is_quantized(k.w) else None)


def probe(w: jax.Array, src: Source) -> Lazy:
  """A factor-less Lazy whose contractions are recorded in ``src.uses`` (layout inference)."""
  return Lazy(w, None, None, (), (), (), src, tuple((src.lead + p,) for p in range(w.ndim)))


# ---------------------------------------------------------------- view ops


def _transpose(lz: Lazy, perm) -> Lazy:
  where = {old: new for new, old in enumerate(perm)}
  return dataclasses.replace(
    lz,
    base=lax.transpose(lz.base, perm),
    q=None,
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
  axes = [()] * len(new_shape)
  for gi, gj in groups:
    for q in gj:
      axes[q] = tuple(sorted({a for p in gi for a in lz.axes[p]}))
  if lz.u is None:
    return dataclasses.replace(lz, base=lax.reshape(lz.base, tuple(new_shape)), axes=tuple(axes))
  kind = {**dict.fromkeys(lz.stacks, "s"), **dict.fromkeys(lz.ins, "i"), **dict.fromkeys(lz.outs, "o")}
  order = {"s": list(lz.stacks), "i": list(lz.ins), "o": list(lz.outs)}
  # Each run of old axes must be of one kind and consecutive, ascending, in that kind's order.
  new_order: dict[str, list[int]] = {"s": [], "i": [], "o": []}
  sizes: dict[str, list[int]] = {"s": [], "i": [], "o": []}
  runs = {}
  for gi, gj in groups:
    kinds = {kind[p] for p in gi}
    kd = next(iter(kinds))
    idx = [order[kd].index(p) for p in gi] if len(kinds) == 1 else [-1, -1]
    if idx != list(range(idx[0], idx[0] + len(idx))):
      # The reshape mixes axes the declared layout keeps apart: merged from here on, and a
      # later contraction of the result shows the layout is wrong (LayoutError).
      merged = lax.reshape(lz.materialise("a reshape across the declared layout"), tuple(new_shape))
      return Lazy(merged, None, None, (), (), (), lz.src, tuple(axes), None)
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


def _stored(lz: Lazy, dims) -> tuple[int, ...]:
  return tuple(sorted({a for d in dims for a in lz.axes[d]}))


def _factorless(lz: Lazy, contracted, batch, op: str) -> None:
  """A contraction of a probe (record it) or of a value a reshape merged (a layout error
  unless it contracts every axis)."""
  src = lz.src
  if src.uses is not None:
    src.uses.add(src.path, _stored(lz, contracted), _stored(lz, batch))
    return
  if len(contracted) + len(batch) < lz.base.ndim:
    raise LayoutError(
      f"{src.path}: the model reshapes this kernel so that its stored axes "
      f"{[_stored(lz, (d,)) for d in range(lz.base.ndim)]} are grouped, then contracts stored axes "
      f"{_stored(lz, contracted)} (in `{op}`), which contradicts the declared input axes "
      f"{tuple(sorted(src.in_axes))}. Declare the layout the model uses, e.g. Rule(r, in_axes="
      f"{_stored(lz, contracted)}), or let delora_jax infer it: wrap(params, rules, like=(model, *example_args))."
    )


def _layout_use(lz: Lazy, contracted: tuple[int, ...], op: str) -> str:
  """How ``op`` contracting view axes ``contracted`` of ``lz`` is computed: ``"in"`` (the
  layer form) or ``"merged"`` (no output axis would be left: a full contraction such as a
  regulariser; or a tied kernel that another of its holders reads otherwise). Any other
  contraction contradicts the declared layout: a :class:`LayoutError`, raised at once, or
  (``src.defer``) after the call unless another use of the kernel fits it."""
  got = set(contracted)
  if got == set(lz.ins):
    return "in"
  if got >= set(lz.ins) | set(lz.outs) or lz.src.tied:
    return "merged"  # a full contraction, or a tied kernel read otherwise by another holder
  src = lz.src
  stored = tuple(sorted({a for p in contracted for a in lz.axes[p]}))
  err = LayoutError(
    f"{src.path}: the model contracts this kernel over its axes {stored} (in `{op}`), but its "
    f"layout declares input axes {tuple(sorted(src.in_axes))}. Declare the axes the model "
    f"contracts, e.g. Rule(r, in_axes={stored}, ...), or leave the layout out and let "
    "delora_jax infer it: wrap(params, rules, like=(model, *example_args))."
  )
  if not src.defer or src.strict:
    raise err
  _report.misfit(src.path, err)  # merged; an error after the call unless another use fits (tied)
  return "merged"


def _dot_general(eqn, invals):
  lhs, rhs = invals
  lazy_is_lhs = isinstance(lhs, Lazy)
  lz, x = (lhs, rhs) if lazy_is_lhs else (rhs, lhs)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return None
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  kc, kb = (lc, lb) if lazy_is_lhs else (rc, rb)
  base_out = lambda: _bind(eqn, [lz.base, x] if lazy_is_lhs else [x, lz.base])[0]  # noqa: E731
  if lz.q is not None:  # int8 with per-channel scales: x contracted with the int values, scaled after
    quantized = _ops.qdot(lz.q, x, lazy_is_lhs, eqn.params, eqn.outvars[0].aval.dtype)
    base_out = (lambda: quantized) if quantized is not None else base_out
  if lz.u is None:
    _factorless(lz, kc, kb, "dot_general")
    return base_out()
  if not set(kb) <= set(lz.stacks) or set(kc) & set(lz.stacks):
    return None  # batched over other than its stacked axes, or contracting them: merged
  if _layout_use(lz, kc, "dot_general") != "in":
    return None
  got = _ops.dot(lz, x, lazy_is_lhs, eqn.params, base_out())
  if got is not None:
    lz.src.record(lz.src.path, "factorised")
  return got


def _conv(eqn, invals):
  x, lz = invals
  if isinstance(x, Lazy) or not isinstance(lz, Lazy):
    return None
  base_out = _bind(eqn, [x, lz.base])[0]
  if lz.u is None:
    o_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    _factorless(lz, [d for d in range(lz.base.ndim) if d != o_dim], (), "conv_general_dilated")
    return base_out
  if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1 or lz.stacks:
    return None
  o_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  if _layout_use(lz, tuple(d for d in range(lz.base.ndim) if d != o_dim), "conv_general_dilated") != "in":
    return None
  got = _ops.conv(lz, x, eqn.params, base_out)
  if got is not None:
    lz.src.record(lz.src.path, "factorised")
  return got


def _ragged(eqn, invals):
  x, lz, sizes = invals[:3]
  if isinstance(x, Lazy) or not isinstance(lz, Lazy) or isinstance(sizes, Lazy) or len(invals) != 3:
    return None
  base_out = _bind(eqn, [x, lz.base, sizes])[0]
  rdn = eqn.params["ragged_dot_dimension_numbers"]
  if lz.u is None:
    (_, kc), (_, kb) = rdn.dot_dimension_numbers
    _factorless(lz, kc, tuple(kb) + tuple(rdn.rhs_group_dimensions), "ragged_dot_general")
    return base_out
  if _layout_use(lz, tuple(rdn.dot_dimension_numbers[0][1]), "ragged_dot_general") != "in":
    return None
  got = _ops.ragged_dot(lz, x, sizes, eqn.params, base_out)
  if got is not None:
    lz.src.record(lz.src.path, "factorised")
  return got


_CONTRACTIONS = {"dot_general": _dot_general, "conv_general_dilated": _conv, "ragged_dot_general": _ragged}


# ---------------------------------------------------------------- the interpreter


_CALLS = ("jit", "pjit", "closed_call", "core_call")
_COPIES = ("copy", "copy_p")


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = []
  if isinstance(params, tuple):  # older jax: (subfuns, params)
    subfuns, params = params
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*subfuns, *invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def _scaled(eqn, invals) -> list | None:
  """``w * c`` for a float scalar ``c`` (gemma 4's per-layer input projection scales its kernel):
  the base and ``u`` scaled, the view still lazy (a probe passes it through)."""
  i = 0 if isinstance(invals[0], Lazy) else 1
  lz, c = invals[i], invals[1 - i]
  if isinstance(c, Lazy) or jnp.ndim(c) != 0 or not jnp.issubdtype(jnp.result_type(c), jnp.floating):
    return None
  base = _bind(eqn, [lz.base, c] if i == 0 else [c, lz.base])[0]
  u = None if lz.u is None else lz.u * jnp.asarray(c, lz.u.dtype)
  return [dataclasses.replace(lz, base=base, u=u, q=None)]


def _plain(x, why):
  return x.materialise(why) if isinstance(x, Lazy) else x


def _rule(eqn, invals):
  """The one decision: keep a kernel view lazy, compute a contraction factorised, or merge."""
  name = eqn.primitive.name
  lz = invals[0]
  if name == "convert_element_type" and jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
    return [dataclasses.replace(lz, base=_bind(eqn, [lz.base])[0])]
  if name in _COPIES:
    return [lz]
  if name == "transpose":
    return [_transpose(lz, tuple(eqn.params["permutation"]))]
  if name == "reshape" and eqn.params.get("dimensions") is None:
    got = _reshape(lz, tuple(eqn.params["new_sizes"]))
    if got is not None:
      return [got]
  if name == "mul" and sum(isinstance(x, Lazy) for x in invals) == 1:
    got = _scaled(eqn, invals)
    if got is not None:
      return got
  if name in _CALLS:
    closed = eqn.params["jaxpr"]
    return evaluate(closed.jaxpr, closed.consts, invals)
  if name in ("remat2", "checkpoint"):
    jaxpr = eqn.params["jaxpr"]
    fn = jax.checkpoint(
      lambda *a: evaluate(jaxpr, (), list(a)), prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"]
    )
    return fn(*invals)
  if name in _CONTRACTIONS and sum(isinstance(x, Lazy) for x in invals) == 1:
    got = _CONTRACTIONS[name](eqn, invals)
    if got is not None:
      return [got]
  # Anything else (custom_jvp/custom_vjp calls included, so their own derivative rules
  # apply): the op on the merged kernel, reported.
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


class Escaped(Exception):  # noqa: N818 (control flow for the front-ends)
  """The evaluated call returns an adapted kernel itself (see :func:`run`'s ``escape``)."""


def run(fn: Callable[..., Any], bases: list[jax.Array], lazies: list[Any], escape: Callable[[], bool] = bool) -> Any:
  """Traces ``fn(*bases)`` and evaluates it with each base bound to its Lazy value.

  When the call returns a kernel (a Lazy output) and ``escape()`` is true, raises
  :class:`Escaped` before evaluating anything, so the caller can trace the code that uses
  the kernel instead; otherwise such an output is merged.
  """
  closed, shape = jax.make_jaxpr(fn, return_shape=True)(*bases)
  if closed.jaxpr.outvars and escape():
    lazy_in = {v for v, x in zip(closed.jaxpr.invars, lazies) if isinstance(x, Lazy)}
    if any(v in lazy_in for v in closed.jaxpr.outvars if not isinstance(v, jex.core.Literal)):
      raise Escaped()
  outs = evaluate(closed.jaxpr, closed.consts, lazies)
  outs = [_plain(x, "a returned kernel") for x in outs]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)
