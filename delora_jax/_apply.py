"""`apply`: run a Linen model on an adapted tree, factorised wherever possible.

Every method of a module that reads an adapted kernel from its own scope is
intercepted (``nn.intercept_methods``). flax's own Dense/DenseGeneral run as one
fused low-rank op (``_lowrank``); any other layer is traced with the kernel as a
placeholder and evaluated by :mod:`delora_jax._lazy`, which computes every
contraction over the kernel's input axes as the frozen base plus a rank-``r``
branch, never forming ``ΔW`` or a dense weight gradient. Any other use of an
adapted kernel gets the merged kernel ``w + ΔW``; which paths took that path is
reported (a :class:`FallbackWarning`, :func:`explain`), or ``strict=True``
turns it into an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict
from flax.linen import dtypes as nn_dtypes
from jax import lax

from delora_jax import _infer, _kernel, _lazy, _tree
from delora_jax._kernel import DeloraKernel

FallbackWarning = _lazy.FallbackWarning


@dataclasses.dataclass(eq=False)
class _Record:
  """What one `apply`/`explain` call computed how (set for the call, never static data)."""

  strict: bool
  factorised: set = dataclasses.field(default_factory=set)
  merged: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class _Mode:
  """Static data of a call's tracked kernels: identical across `apply` calls with the same
  `strict`, so jit caches (an `nn.jit` model, jnp's own jitted functions) hit on later
  calls; `explain` passes a fresh `token` so that its trace is never a cached one."""

  strict: bool
  token: int = 0
  probe: bool = False  # layout inference: kernels are plain w, uses are recorded (`_infer`)


_RECORD: contextvars.ContextVar[_Record | None] = contextvars.ContextVar("delora_record", default=None)
_TOKENS = itertools.count(1)


def _note(path: str, kind: str) -> None:
  rec = _RECORD.get()
  if rec is not None:
    getattr(rec, kind).add(path)


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
      raise _lazy.strict_error(self.path)
    _note(self.path, "merged")
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


# ---------------------------------------------------------------- delta branch


def _acc(cdt) -> jnp.dtype:
  """Accumulation dtype: float32 for low-precision compute, else the compute dtype."""
  return jnp.dtype(jnp.float32) if jnp.finfo(cdt).bits < 32 else jnp.dtype(cdt)


def _contract(x, y, dims, precision=None, out=None):
  """``lax.dot_general`` over ``dims`` with no batch axes, result in ``out``."""
  return lax.dot_general(x, y, (dims, ((), ())), precision=precision, preferred_element_type=out)


def _adapter_input(mod: nn.Module, k: DeloraKernel, x: jax.Array) -> jax.Array:
  """PEFT's module_dropout: dropout on the branch input when a 'dropout' rng is given."""
  if k.dropout > 0.0 and mod.has_rng("dropout"):
    keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - k.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - k.dropout), jnp.zeros_like(x))
  return x


def _layout(k: DeloraKernel, n_in: int, n_out: int) -> bool:
  if k.w.ndim != n_in + n_out:
    return False
  stacks, ins, outs = _kernel.positions(k)
  return not stacks and ins == tuple(range(n_in)) and outs == tuple(range(n_in, n_in + n_out))


def _bias(mod: nn.Module) -> jax.Array | None:
  if getattr(mod, "use_bias", False) and mod.scope.has_variable("params", "bias"):
    return mod.scope.get_variable("params", "bias")
  return None


# ---------------------------------------------------------------- fused dense


_NN, _NT, _TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))  # a @ b, a @ b.T, a.T @ b


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


def _join_on_cpu() -> bool:
  """Whether CPU lowerings use the joined matmul: only where this process sees a
  single device. On a multi-device mesh the [w; v] concatenation runs along a
  possibly sharded input axis and would gather the kernel, so sharded (and
  pmapped) programs keep the split form everywhere."""
  return jax.process_count() == 1 and jax.local_device_count() == 1


def _lowrank_out(x, xd, w, u, v, precision):
  acc = _acc(x.dtype)
  h = _contract(xd, u.astype(x.dtype), _NN, out=acc).astype(x.dtype)
  args = (x, h, w, v.astype(x.dtype))
  split = functools.partial(_split, precision=precision)
  if not _join_on_cpu():
    return split(*args), h
  joined = functools.partial(_joined, precision=precision)
  return lax.platform_dependent(*args, cpu=joined, default=split), h


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lowrank(x, xd, w, u, v, precision):
  """``x @ w + ((xd @ u) @ v)`` for ``x, xd (T, in)``, ``w (in, out)``, ``u (in, r)``,
  ``v (r, out)``; ``x``, ``xd`` and ``w`` in the compute dtype. ``w`` gets no
  gradient; the backward pass forms only ``(T, r)``, ``(in, r)`` and ``(r, out)``
  products besides ``dx``, and keeps only ``xd`` and ``h = xd @ u`` as residuals."""
  return _lowrank_out(x, xd, w, u, v, precision)[0]


def _lowrank_fwd(x, xd, w, u, v, precision):
  y, h = _lowrank_out(x, xd, w, u, v, precision)
  return y, (xd, h, w, u, v)


def _lowrank_bwd(precision, res, dy):
  xd, h, w, u, v = res
  cdt = xd.dtype
  acc = _acc(cdt)
  dy = dy.astype(cdt)
  # Contract over the shared axis directly (no explicit transposes), the same
  # dot_generals autodiff would emit, so a partitioner reuses the forward
  # pass's gathers of w.
  dh = _contract(dy, v.astype(cdt), _NT, out=acc).astype(cdt)  # (T, r)
  dv = _contract(h, dy, _TN, out=acc).astype(v.dtype)
  du = _contract(xd, dh, _TN, out=acc).astype(u.dtype)
  dx = _contract(dy, w, _NT, precision)
  dxd = _contract(dh, u.astype(cdt), _NT)
  return dx, dxd, None, du, dv


_lowrank.defvjp(_lowrank_fwd, _lowrank_bwd)


def _path(k: DeloraKernel) -> str:
  return getattr(k, "path", "") or "kernel"


def _fused_dense(mod, k, x, feats, n_in):
  """Dense/DenseGeneral over the trailing ``n_in`` axes of ``x`` as one ``_lowrank``
  on ``(tokens, in)``, with flax's own dtype promotion and bias."""
  promote = getattr(mod, "promote_dtype", nn_dtypes.promote_dtype)
  xc, w, bias = promote(x, k.w, _bias(mod), dtype=mod.dtype)
  xd = _adapter_input(mod, k, xc)
  lead, n_i = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in :])
  n_o = math.prod(feats)
  if n_i * n_o != math.prod(k.w.shape):
    raise ValueError(
      f"{_path(k)}: the layer's input has trailing shape {tuple(x.shape[x.ndim - n_in :])}, but its "
      f"kernel {tuple(k.w.shape)} expects inputs of shape {tuple(k.w.shape[:n_in])}. Pass inputs "
      "of the width the model was built (and wrapped) for."
    )
  u, v = _kernel.factors(k)
  y = _lowrank(xc.reshape(-1, n_i), xd.reshape(-1, n_i), lax.stop_gradient(w).reshape(n_i, n_o), u, v, mod.precision)
  if bias is not None:
    y = y + bias.reshape(1, n_o)
  return y.reshape(*lead, *feats)


def _dense_general(mod, k, args, kwargs):
  x = args[0] if args else kwargs["inputs"]
  feats = tuple(mod.features) if not isinstance(mod.features, int) else (mod.features,)
  axis = getattr(mod, "axis", -1)
  axis = tuple(axis) if not isinstance(axis, int) else (axis,)
  if getattr(mod, "batch_dims", ()) or not _layout(k, len(axis), len(feats)):
    return None
  axis = tuple(a % x.ndim for a in axis)
  if (
    axis != tuple(range(x.ndim - len(axis), x.ndim))
    or mod.dot_general is not None
    or getattr(mod, "dot_general_cls", None) is not None
  ):
    return None  # other contracting axes or a custom dot_general: the generic evaluator
  return _fused_dense(mod, k, x, feats, len(axis))


def _handler(mod: nn.Module):
  """The fused one-op form of flax's own Dense/DenseGeneral (``_lowrank``: one output buffer
  on XLA:CPU), or None. Every other layer goes through the generic evaluator (`_lazy`)."""
  call = type(mod).__call__
  if call is nn.Dense.__call__ or call is nn.DenseGeneral.__call__:
    return _dense_general
  return None


def _owned(mod: nn.Module) -> dict[str, _Tracked]:
  """The adapted kernels this module reads from its own scope (not its children's)."""
  params = mod.scope.variables().get("params", {})
  return {n: k for n, k in params.items() if isinstance(k, _Tracked) and k.mode is not None}


@contextlib.contextmanager
def _substituted(mod: nn.Module, values: Mapping[str, Any]):
  """Within the block, ``mod``'s scope reads ``values`` (placeholder arrays) for those params.

  The module then sees plain arrays, so every JAX API works on them (``lax.*``, jitted
  helpers, methods), and a jit cache never keeps a placeholder as a hidden constant.
  """
  scope = mod.scope
  old = scope._collection("params")  # noqa: SLF001 (flax has no public hook for this)
  new = {**old, **values}
  scope._variables["params"] = type(old)(new) if isinstance(old, FrozenDict) else new  # type: ignore[assignment]  # noqa: SLF001
  try:
    yield
  finally:
    scope._variables["params"] = old  # type: ignore[assignment]  # noqa: SLF001


def _with_placeholders(mod: nn.Module, names: list[str], next_fun, args, kwargs):
  """``next_fun`` as a function of one placeholder array per kernel ``names`` of ``mod``."""

  def traced(*placeholders):
    with _substituted(mod, dict(zip(names, placeholders))):
      return next_fun(*args, **kwargs)

  return traced


def _probe_call(mod, owned: dict[str, _Tracked], next_fun, args, kwargs):
  names, ks = list(owned), list(owned.values())
  return _infer.trace(_with_placeholders(mod, names, next_fun, args, kwargs), [k.w for k in ks], [k.path for k in ks])


def probe(like: Any, params: Any, paths: set[str]) -> _infer.Uses:
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
    call = lambda: like[0].apply({"params": tree}, *like[1:])  # noqa: E731
  else:
    raise TypeError(
      "`like` must be (model, *example_args) for a Linen model, or a function "
      f"like(params) that runs the model's apply on them; got {type(like).__name__}."
    )

  def run():
    with nn.intercept_methods(_interceptor):
      jax.eval_shape(call)

  return _infer.probe(run)


def _generic(mod: nn.Module, owned: dict[str, _Tracked], next_fun, args, kwargs):
  """Any method of any module: traced with each kernel as a placeholder, then evaluated
  with the low-rank form bound to it (`_lazy`)."""
  names, ks = list(owned), list(owned.values())
  lazies = []
  for k in ks:
    key = mod.make_rng("dropout") if k.dropout > 0.0 and mod.has_rng("dropout") else None
    src = _lazy.Source(
      k.path,
      _note,
      in_axes=tuple(k.in_axes) if k.stack else tuple(k.stored_ndim + a for a in k.in_axes),
      lead=k.stored_ndim - k.w.ndim,
      strict=k.mode.strict,
      dropout=k.dropout,
    )
    lazies.append(_lazy.from_kernel(k, lax.stop_gradient(k.w), src, key))
  return _lazy.run(_with_placeholders(mod, names, next_fun, args, kwargs), [k.w for k in ks], lazies)


def _interceptor(next_fun, args, kwargs, context):
  """The one decision for Linen: a built-in layer's own factorised form, else the generic
  evaluator for any module method that reads adapted kernels from its scope."""
  mod = context.module
  if mod.scope is None or context.method_name == "setup":
    return next_fun(*args, **kwargs)
  owned = _owned(mod)  # empty inside a traced call of this scope: it holds placeholders then
  if not owned:
    return next_fun(*args, **kwargs)
  if next(iter(owned.values())).mode.probe:
    return _probe_call(mod, owned, next_fun, args, kwargs)
  handler = _handler(mod) if context.method_name == "__call__" and "kernel" in owned else None
  if handler is not None and len(owned) == 1:
    out = handler(mod, owned["kernel"], args, kwargs)
    if out is not None:
      _note(owned["kernel"].path, "factorised")
      return out
  return _generic(mod, owned, next_fun, args, kwargs)


def _check_variables(variables: Any, fn: str, model: Any = None) -> None:
  from flax import nnx  # noqa: PLC0415

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
  rec = _Record(strict=mode.strict)
  token = _RECORD.set(rec)
  try:
    with nn.intercept_methods(_interceptor):
      out = model.apply({**variables, "params": _track(variables["params"], mode)}, *args, **kwargs)
  finally:
    _RECORD.reset(token)
  return out, rec


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

  Dense layers run as one custom-VJP op whose backward keeps only the layer
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
  out, rec = _run(model, variables, args, kwargs, _Mode(bool(strict)))
  if rec.merged:
    warnings.warn(
      f"delora_jax.apply: adapted kernels {_tree.sample_paths(sorted(rec.merged))} are used "
      "outside a factorised layer and were computed through the merged weight w + ΔW "
      "(adapter dropout does not apply there). Pass strict=True to make this an error; "
      "delora_jax.explain(...) lists the paths.",
      FallbackWarning,
      stacklevel=2,
    )
  return out


def explain(model: Any, variables: Any = None, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
  """Which adapted kernels a call computes factorised, merged, or not at all.

  Traces the call abstractly (no computation) and returns
  ``{"factorised": [...], "merged": [...], "unused": [...]}`` (paths). For Linen,
  ``explain(model, variables, *args, **kwargs)`` as for :func:`apply`; for an NNX
  model adapted by :func:`delora_jax.nnx.wrap`, ``explain(adapted, *args, **kwargs)``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, delora_jax
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> tree = delora_jax.wrap(model.init(jax.random.key(0), x)["params"], {"kernel": 2})
    >>> delora_jax.explain(model, {"params": tree}, x)
    {'factorised': ['kernel'], 'merged': [], 'unused': []}
  """
  from flax import nnx  # noqa: PLC0415

  if isinstance(model, nnx.Module):
    from delora_jax import _nnx  # noqa: PLC0415

    return _nnx.explain(model, (() if variables is None else (variables,)) + args, kwargs)
  _check_variables(variables, "explain")
  box = {}

  def run():
    out, box["rec"] = _run(model, variables, args, kwargs, _Mode(False, next(_TOKENS)))
    return out

  jax.eval_shape(run)
  rec = box["rec"]
  paths = list(_tree.kernels(variables["params"]))
  return {
    "factorised": [p for p in paths if p in rec.factorised and p not in rec.merged],
    "merged": [p for p in paths if p in rec.merged],
    "unused": [p for p in paths if p not in rec.factorised and p not in rec.merged],
  }
