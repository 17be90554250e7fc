"""The Linen front-end: `apply` runs a Linen model on an adapted tree, factorised.

Every method of a module that reads an adapted kernel from its own scope is
intercepted (``nn.intercept_methods``). flax's own Dense/DenseGeneral run as one
fused low-rank op (:func:`delora_jax._ops.dense`); any other method is traced
with the kernels as placeholders and evaluated by :mod:`delora_jax._interpret`.
The traced call is functional: whatever the method writes to mutable
collections (``sow``, caches, batch statistics under ``mutable=[...]``) is
returned by the trace and written back after the evaluation, so no tracer
leaks into the state. A read of a kernel anywhere else gets the merged kernel
``w + ΔW`` and is reported (:mod:`delora_jax._report`).

A module that only returns its kernel (a weight holder, as gemma 4's MoE keeps
its experts) escalates: the enclosing method, where the kernel is used, is
traced with it instead. The flax internals this relies on are listed in
:mod:`delora_jax._interpret`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict
from flax.linen import dtypes as nn_dtypes
from jax import lax

from delora_jax import _interpret, _kernel, _layout, _ops, _prequant, _quant, _report, _tree
from delora_jax._kernel import DeloraKernel


@dataclasses.dataclass(frozen=True)
class _Mode:
  """Static data of a call's tracked kernels: identical across `apply` calls with the same
  `strict`, so jit caches (an `nn.jit` model, jnp's own jitted functions) hit on later
  calls; `explain` passes a fresh `token` so that its trace is never a cached one."""

  strict: bool
  token: int = 0
  probe: bool = False  # layout inference: kernels are plain w, contractions recorded (`_layout`)


_TOKENS = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class _Tracked(DeloraKernel):
  """A DeloraKernel that knows its path while `apply` runs; reads as an array.

  Inside a module call that delora_jax traces, the module's scope holds a plain
  placeholder array in its place (`_substituted`). Read anywhere else
  (``jnp.asarray``, ``.astype``, ``@``, ...) it yields the merged kernel
  ``w + ΔW`` and the use is recorded as merged.
  """

  path: str = ""
  stored_ndim: int = 0  # ndim of the stored kernel (before nn.scan slices stacked axes)
  mode: _Mode | None = None

  @property
  def shape(self):
    return self.w.shape

  @property
  def dtype(self):
    return self.w.dtype

  @property
  def ndim(self):
    return self.w.ndim

  def __jax_array__(self):
    if self.mode is None:
      return super().__jax_array__()
    if self.mode.probe:
      return self.w
    if self.mode.strict:
      raise _report.strict_error(self.path)
    _report.note(self.path, "merged")
    return _kernel.merged(self)


jax.tree_util.register_dataclass(
  _Tracked,
  data_fields=["w", "a", "b", "lam", "w_norm", "res_a", "res_b"],
  meta_fields=["in_axes", "out_axes", "dropout", "stack", "path", "stored_ndim", "mode"],
)


def _track(params: Any, mode: _Mode) -> Any:
  fields = {f.name for f in dataclasses.fields(DeloraKernel)}
  return _tree.map_kernels(
    lambda p, k: _Tracked(**{f: getattr(k, f) for f in fields}, path=p, stored_ndim=k.w.ndim, mode=mode), params
  )


# ---------------------------------------------------------------- flax's own Dense


def _dropout_key(mod: nn.Module, k: DeloraKernel) -> Any:
  """PEFT's module_dropout is active when a 'dropout' rng is given (training)."""
  return mod.make_rng("dropout") if k.dropout > 0.0 and mod.has_rng("dropout") else None


def _fused_dense(mod: nn.Module, k: _Tracked, args, kwargs) -> jax.Array | None:
  """flax's Dense/DenseGeneral over trailing input axes as one fused op, or None."""
  x = args[0] if args else kwargs["inputs"]
  feats = tuple(mod.features) if not isinstance(mod.features, int) else (mod.features,)
  axis = getattr(mod, "axis", -1)
  axis = tuple(axis) if not isinstance(axis, int) else (axis,)
  n_in = len(axis)
  stacks, ins, outs = _kernel.positions(k)
  plain = (
    k.w.ndim == n_in + len(feats)
    and not stacks
    and ins == tuple(range(n_in))
    and outs == tuple(range(n_in, n_in + len(feats)))
  )
  if getattr(mod, "batch_dims", ()) or not plain:
    return None
  if (
    tuple(a % x.ndim for a in axis) != tuple(range(x.ndim - n_in, x.ndim))
    or mod.dot_general is not None
    or getattr(mod, "dot_general_cls", None) is not None
  ):
    return None  # other contracting axes or a custom dot_general: the generic evaluator
  bias = mod.scope.get_variable("params", "bias") if getattr(mod, "use_bias", False) else None
  promote = getattr(mod, "promote_dtype", nn_dtypes.promote_dtype)
  if _quant.is_quantized(k.w):  # the base contracted in its quantized form (_ops.qdense)
    xc, _, bias = promote(x, jnp.zeros((), k.w.dtype), bias, dtype=mod.dtype)
    u, v = _kernel.contraction_factors(k, k.w.dtype, xc.dtype)
    xd = _ops.branch_input(xc, k.dropout, _dropout_key(mod, k))
    return _ops.qdense(xc, xd, k.w, u, v, bias, mod.precision, n_in, feats, k.path or "kernel")
  xc, w, bias = promote(x, k.w, bias, dtype=mod.dtype)
  u, v = _kernel.contraction_factors(k, k.w.dtype, xc.dtype)
  xd = _ops.branch_input(xc, k.dropout, _dropout_key(mod, k))
  return _ops.dense(xc, xd, w, u, v, bias, mod.precision, n_in, feats, k.path or "kernel")


def _is_flax_dense(mod: nn.Module) -> bool:
  call = type(mod).__call__
  return call is nn.Dense.__call__ or call is nn.DenseGeneral.__call__


# ---------------------------------------------------------------- any other method


def _owned(mod: nn.Module) -> dict[str, _Tracked]:
  """The adapted kernels this module reads from its own scope (not its children's)."""
  params = mod.scope.variables().get("params", {})
  return {n: k for n, k in params.items() if isinstance(k, _Tracked) and k.mode is not None}


@contextlib.contextmanager
def _substituted(values: list[tuple[nn.Module, str, Any]]):
  """Within the block, each ``(module, name, placeholder)``'s scope reads the placeholder array
  for that param.

  The module then sees plain arrays, so every JAX API works on them (``lax.*``, jitted
  helpers, methods), and a jit cache never keeps a placeholder as a hidden constant.
  """
  by_scope: dict[int, tuple[Any, dict[str, Any]]] = {}
  for mod, name, ph in values:
    by_scope.setdefault(id(mod.scope), (mod.scope, {}))[1][name] = ph
  olds = []
  for scope, phs in by_scope.values():
    old = scope._collection("params")  # noqa: SLF001 (flax has no public hook for this)
    new = {**old, **phs}
    scope._variables["params"] = type(old)(new) if isinstance(old, FrozenDict) else new  # noqa: SLF001
    olds.append((scope, old))
  try:
    yield
  finally:
    for scope, old in olds:
      scope._variables["params"] = old  # noqa: SLF001


def _state_entries(mod: nn.Module) -> list[tuple[dict, str, Any]]:
  """``(container, key, value)`` of every leaf of the call's mutable collections (not params)."""
  out: list[tuple[dict, str, Any]] = []

  def walk(d):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v)
      else:
        out.append((d, k, v))

  for col, d in mod.scope.root.mutable_variables().items():
    if col != "params" and isinstance(d, dict):
      walk(d)
  return out


def _snapshot(mod: nn.Module) -> Callable[[], None]:
  """A function that puts the call's mutable collections back as they are now, so that a method
  traced again (a weight holder escalated) does not write its state twice: changed values are
  restored, variables the method created in its own scope removed (with flax's reservation of
  their names). A variable the method created in a child's scope cannot be removed: TypeError."""

  def leaves() -> dict:
    out = {}

    def walk(d, path):
      for k, v in d.items():
        if isinstance(v, dict):
          walk(v, (*path, k))
        else:
          out[(*path, k)] = (d, v)

    for col, d in mod.scope.root.mutable_variables().items():
      if col != "params" and isinstance(d, dict):
        walk(d, (col,))
    return out

  saved = leaves()
  own = tuple(mod.scope.path)

  def restore() -> None:
    for path, (d, _) in leaves().items():
      if path in saved:
        saved[path][0][path[-1]] = saved[path][1]
      elif tuple(path[1:-1]) == own:
        del d[path[-1]]
        mod.scope.reservations[path[-1]].discard(path[0])  # flax has no public way to undo a variable
      else:
        raise TypeError(
          f"{mod.scope.path_text}: this method creates the variable {'/'.join(map(str, path))} in a child "
          "module before a child returns an adapted kernel to it; delora_jax traces the method again to "
          "compute that kernel factorised and cannot undo the child's first write. Create the variable "
          "after the kernel is read, or in the method's own scope."
        )

  return restore


def _functional(mod: nn.Module, owned: list[tuple[nn.Module, str, Any]], next_fun, args, kwargs, written: list):
  """``next_fun`` (a method of ``mod``) as a pure function of one placeholder per kernel of
  ``owned`` (``(module, name, kernel)``, in ``mod`` or a child): returns ``(out, new values)``
  of the state entries it writes, listed in ``written``."""

  def traced(*placeholders):
    before = {(id(c), k): v for c, k, v in _state_entries(mod)}
    with _substituted([(m, n, ph) for (m, n, _), ph in zip(owned, placeholders)]):
      out = _enclosing(next_fun, args, kwargs, _Retry)
    written[:] = [(c, k) for c, k, v in _state_entries(mod) if before.get((id(c), k), written) is not v]
    for c, k in written:
      bad = [type(x).__name__ for x in jax.tree.leaves(c[k]) if not isinstance(x, (jax.Array, int, float, bool))]
      if bad:
        raise TypeError(
          f"{mod.scope.path_text}: this module's method reads an adapted kernel and writes {k!r} = a "
          f"{type(c[k]).__name__} holding {sorted(set(bad))}, which delora_jax cannot return from the traced "
          "call it computes factorised. Store arrays in mutable collections, or write the state from a "
          "method that does not read the adapted kernel."
        )
    return out, [c[k] for c, k in written]

  return traced


def _values(mod: nn.Module, ks: list[_Tracked]) -> list[_interpret.Lazy]:
  out = []
  for k in ks:
    src = _interpret.Source(
      k.path,
      _report.note,
      in_axes=tuple(k.in_axes) if k.stack else tuple(k.stored_ndim + a for a in k.in_axes),
      lead=k.stored_ndim - k.w.ndim,
      strict=k.mode.strict,
      dropout=k.dropout,
      defer=True,
      quantized=_quant.describe(k.w),
    )
    out.append(_interpret.from_kernel(k, lax.stop_gradient(_quant.array(k.w)), src, _dropout_key(mod, k)))
  return out


class _Escalate(Exception):  # noqa: N818 (control flow, never seen by users)
  """A method returned its adapted kernel (a weight-holder module, as gemma 4's MoE ``_Weight``):
  the enclosing module method, where the kernel is used, is traced instead."""

  def __init__(self, owned: list[tuple[nn.Module, str, _Tracked]]):
    super().__init__()
    self.owned = owned


class _Retry(_Escalate):  # noqa: N818
  """A holder inside a traced method returned its kernel: trace the method again with it too."""


# How many module methods enclose this point that would trace a kernel returned to them.
_ENCLOSING: contextvars.ContextVar[int] = contextvars.ContextVar("delora_enclosing", default=0)


def _enclosing(next_fun, args, kwargs, as_: type[_Escalate]):
  """``next_fun(*args, **kwargs)`` as a method that catches kernels its children return; a
  :class:`_Escalate` from them is raised again as ``as_``."""
  token = _ENCLOSING.set(_ENCLOSING.get() + 1)
  try:
    return next_fun(*args, **kwargs)
  except _Escalate as e:
    if type(e) is not _Escalate:
      raise
    raise as_(e.owned) from None
  finally:
    _ENCLOSING.reset(token)


def _generic(mod: nn.Module, owned: list[tuple[nn.Module, str, _Tracked]], next_fun, args, kwargs):
  """Any method of any module: traced with each kernel as a placeholder, then evaluated
  with the low-rank form (or, for layout inference, a probe) bound to it."""
  restore = _snapshot(mod)
  while True:
    ks = [k for _, _, k in owned]
    written: list = []
    fn = _functional(mod, owned, next_fun, args, kwargs, written)
    bases: list[Any] = [jax.ShapeDtypeStruct(k.w.shape, k.w.dtype) if _quant.is_quantized(k.w) else k.w for k in ks]
    escape = lambda written=written: _ENCLOSING.get() > 0 and not written  # noqa: E731
    try:
      if ks[0].mode.probe:
        out, new = _layout.trace(fn, bases, [k.path for k in ks], escape=escape)
      else:
        out, new = _interpret.run(fn, bases, _values(mod, ks), escape=escape)
    except _interpret.Escaped:
      raise _Escalate(owned) from None
    except _Retry as e:
      owned = owned + e.owned
      restore()
      continue
    for (c, k), v in zip(written, new):
      c[k] = v
    return out


def _passing(mod: nn.Module, next_fun, args, kwargs):
  """A method that reads no adapted kernel of its own runs as it is; if a child returns its
  kernel to it (:class:`_Escalate`), this method is traced with that kernel instead."""
  restore = _snapshot(mod)
  try:
    return _enclosing(next_fun, args, kwargs, _Retry)
  except _Retry as e:
    restore()
    return _generic(mod, e.owned, next_fun, args, kwargs)


def _interceptor(next_fun, args, kwargs, context):
  """The one decision for Linen: flax's Dense as the fused op, else the generic evaluator for
  any module method that reads adapted kernels from its scope."""
  mod = context.module
  if mod.scope is None or context.method_name == "setup":
    return next_fun(*args, **kwargs)
  owned = _owned(mod)  # empty inside a traced call of this scope: it holds placeholders then
  if not owned:
    return _passing(mod, next_fun, args, kwargs)
  k = owned.get("kernel")
  if (
    len(owned) == 1 and k is not None and not k.mode.probe and context.method_name == "__call__" and _is_flax_dense(mod)
  ):
    out = _fused_dense(mod, k, args, kwargs)
    if out is not None:
      _report.note(k.path, "factorised")
      return out
  return _generic(mod, [(mod, n, k) for n, k in owned.items()], next_fun, args, kwargs)


def probe(like: Any, params: Any, paths: set[str]) -> _interpret.Uses:
  """How ``like`` (``(model, *args)`` or ``fn(params)``) uses the kernels at ``paths``."""
  mode = _Mode(False, next(_TOKENS), probe=True)
  tree = _tree.map_leaves(
    lambda p, w: (
      _Tracked(
        w=w, a=None, b=None, lam=None, w_norm=None, in_axes=(), out_axes=(), path=p, stored_ndim=w.ndim, mode=mode
      )
      if p in paths
      else w
    ),
    params,
  )
  if callable(like):
    call = lambda: like(tree)  # noqa: E731
  elif isinstance(like, tuple) and like and isinstance(like[0], nn.Module):
    _prequant.check_model(like[0], "delora_jax.wrap(like=...)")
    call = lambda: like[0].apply({"params": tree}, *like[1:])  # noqa: E731
  else:
    raise TypeError(
      "`like` must be (model, *example_args) for a Linen model, or a function "
      "like(params) that runs the model's apply on them (also for keyword inputs: "
      "like=lambda p: model.apply({'params': p}, **inputs)); "
      f"got {type(like).__name__}."
    )

  def run():
    with nn.intercept_methods(_interceptor):
      jax.eval_shape(call)

  return _layout.probe(run)


def _check_variables(variables: Any, fn: str, model: Any = None) -> None:
  _prequant.check_model(model, f"delora_jax.{fn}")
  if isinstance(model, nnx.Module):
    raise TypeError(
      f"{fn}: `model` is a Flax NNX module; delora_jax.{fn} runs Linen modules. Adapt an NNX "
      "model with delora_jax.nnx.wrap(model, rules) and call it directly: adapted(x)"
      + (" (delora_jax.explain(adapted, x) reports it)." if fn == "apply" else ".")
    )
  if not isinstance(variables, Mapping) or "params" not in variables:
    got = f"keys {sorted(variables)}" if isinstance(variables, Mapping) else type(variables).__name__
    raise TypeError(f"{fn}: `variables` must be a dict with a 'params' collection, as for model.apply; got {got}.")
  _tree.require_adapted(variables["params"], fn)


def _run(model, variables, args, kwargs, mode: _Mode):
  with nn.intercept_methods(_interceptor):
    return model.apply({**variables, "params": _track(variables["params"], mode)}, *args, **kwargs)


def apply(model: nn.Module, variables: Mapping[str, Any], *args: Any, strict: bool = False, **kwargs: Any) -> Any:
  """Drop-in for ``model.apply(variables, *args, **kwargs)`` with adapted params.

  ``variables["params"]`` is a tree from :func:`delora_jax.wrap` (or
  ``combine(trainable, frozen)``); other collections and every keyword of
  ``model.apply`` (``rngs``, ``mutable``, ``method``) pass through. Every layer
  that contracts an adapted kernel over its input axes (``nn.Dense``, ``Conv``,
  ``Einsum``, gemma's ``Einsum``, a custom ``jnp.einsum``/``@``/``lax.dot_general``)
  is computed in factorised form with ``w`` and ``w_norm`` frozen. Adapter dropout
  (``Rule(dropout=p)``, PEFT's ``module_dropout``) is active when a
  ``"dropout"`` rng is passed (``rngs={"dropout": key}``), as in training.

  Dense layers run as one custom-JVP op whose backward keeps only the layer
  input and the ``(tokens, r)`` projection. In programs on a single CPU device
  it is one matmul over ``[x | x @ u]`` and ``[w; v]`` (XLA:CPU would otherwise
  keep both halves of ``x @ w + h @ v`` alive until the backward pass); with
  ``b = 0`` the output then equals the base model's up to float rounding rather
  than bitwise. GPU/TPU, meshes and ``pmap`` use ``x @ w + h @ v``.

  Args:
    model: a Flax Linen module.
    variables: ``{"params": adapted_tree, ...}``.
    strict: raise ``TypeError`` instead of merging when an adapted kernel is
      used outside a factorised layer. Otherwise such kernels are computed
      through ``w + ΔW`` and a :class:`FallbackWarning` names them.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, delora_jax
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tree = delora_jax.wrap(params, {"kernel": delora_jax.Rule(2, init="random")})
    >>> y = delora_jax.apply(model, {"params": tree}, x, strict=True)
    >>> bool(jnp.allclose(y, model.apply({"params": delora_jax.merge(tree)}, x), atol=1e-5))
    True
  """
  _check_variables(variables, "apply", model)
  with _report.recording() as rec:
    out = _run(model, variables, args, kwargs, _Mode(bool(strict)))
  rec.check()
  _report.warn_merged(
    "delora_jax.apply",
    rec.merged,
    "Pass strict=True to make this an error; delora_jax.explain(...) lists the paths.",
  )
  return out


def _explain(model: Any, variables: Any = None, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
  """`explain` for a Linen model (see :func:`delora_jax._report.explain`)."""
  _check_variables(variables, "explain")
  params = variables["params"]
  ks = _tree.kernels(params)
  mode = _Mode(False, next(_TOKENS))

  def call(trained):
    tree = _tree.map_kernels(lambda p, k: k.replace(a=trained[p][0], b=trained[p][1], lam=trained[p][2]), params)
    return _run(model, {**variables, "params": tree}, args, kwargs, mode)

  with _report.recording() as rec:
    live = _report.reached(call, {p: (k.a, k.b, k.lam) for p, k in ks.items()})
  rec.check()
  return _report.summary(list(ks), rec, live)


_report.EXPLAINERS.append((object, _explain))
