"""Flax NNX: adapted modules whose calls run factorised (see :mod:`delora_jax.nnx`).

An adapted module is the original module object's copy with its class swapped
for a subclass that (1) keeps the kernel Variable where it was (so the state's
paths are unchanged), (2) holds the adapter next to it as ``<name>_delora``
(``a``, ``b``, ``lam`` as :class:`DeloraParam`, ``w_norm`` as
:class:`DeloraConst`), (3) evaluates ``__call__`` factorised through
:mod:`delora_jax._lazy`, and (4) resolves any other read of the kernel
attribute to the merged weight ``w + ΔW``, reported as a fallback.
"""

from __future__ import annotations

import contextvars
import functools
import types
import warnings
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax import lax

from delora_jax import _infer, _kernel, _lazy
from delora_jax._kernel import DeloraKernel

SUFFIX = "_delora"


class DeloraParam(nnx.LoRAParam):
  """Variable type of the trainable DeLoRA factors ``a``, ``b`` and the bound ``lam``.

  A subclass of ``nnx.LoRAParam``, so filters on it (``nnx.Optimizer(...,
  wrt=nnx.LoRAParam)``, tunix's ``PeftTrainer``) train only the adapters.
  """


class DeloraConst(nnx.Variable):
  """Variable type of an adapter's frozen state: ``w_norm`` (and the paper init's residual)."""


class Adapter(nnx.Module):
  """One kernel's adapter: trainable ``a``, ``b``, ``lam``; frozen ``w_norm``; its layout.

  ``a``, ``b``, ``lam`` are laid out as in the Linen tree (:class:`DeloraKernel`); with
  stacked axes that are not leading, the frozen arrays hold them first instead (see
  :meth:`stored`), as a scan over the model's layers expects of non-``Param`` state
  (MaxText scans ``nnx.Param`` at ``param_scan_axis`` and the rest at axis 0).
  """

  def __init__(self, k: DeloraKernel, path: str, rngs: nnx.Rngs | None, strict: bool):
    self.a = DeloraParam(k.a)
    self.b = DeloraParam(k.b)
    self.lam = DeloraParam(k.lam)
    self.w_norm = DeloraConst(self.stored(k, "w_norm"))
    if k.res_a is not None:
      self.res_a = DeloraConst(self.stored(k, "res_a"))
      self.res_b = DeloraConst(self.stored(k, "res_b"))
    self.in_axes, self.out_axes, self.dropout, self.stack = k.in_axes, k.out_axes, k.dropout, k.stack
    self.path, self.strict = path, strict
    self.rngs = rngs
    self.deterministic = False

  @staticmethod
  def stored(k: DeloraKernel, field: str) -> Any:
    """The array of ``field`` as this module stores it: a frozen one with its stacked axes first."""
    x = getattr(k, field)
    return _kernel.lead(x, k.stack, field) if field in ("w_norm", "res_a", "res_b") else x

  def kernel(self, w: Any) -> DeloraKernel:
    """The :class:`DeloraKernel` of kernel ``w`` (as stored, or a slice a scan took of it)."""
    res = vars(self)
    const = {f: res[f].get_value() if f in res else None for f in ("w_norm", "res_a", "res_b")}
    if self.stack:  # the frozen arrays' stacked axes back where the Linen layout has them
      stacks, _, _ = _kernel.layout_positions(self.stack, self.in_axes, self.out_axes, w.ndim)
      const = {f: _kernel.place(x, stacks, f) for f, x in const.items()}
    return DeloraKernel(
      w=w,
      a=self.a.get_value(),
      b=self.b.get_value(),
      lam=self.lam.get_value(),
      **const,
      in_axes=self.in_axes,
      out_axes=self.out_axes,
      dropout=self.dropout,
      stack=self.stack,
    )


# id(module) -> {kernel name: placeholder} for the module calls being traced now.
_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("delora_nnx_active", default=types.MappingProxyType({}))
_RECORDER: contextvars.ContextVar[Callable[[str, str], None] | None] = contextvars.ContextVar(
  "delora_nnx_recorder", default=None
)


def _record(path: str, kind: str) -> None:
  rec = _RECORDER.get()
  if rec is not None:
    rec(path, kind)
  elif kind == "merged":
    warnings.warn(
      f"delora_jax.nnx: the adapted kernel {path!r} is used outside a call delora_jax can "
      "factorise and was computed through the merged weight w + ΔW (adapter dropout does "
      "not apply there). Pass strict=True to delora_jax.nnx.wrap to make this an error; "
      "delora_jax.explain(adapted, *args) lists the paths.",
      _lazy.FallbackWarning,
      stacklevel=4,
    )


def _like(var: nnx.Variable, value: Any) -> nnx.Variable:
  """A Variable of ``var``'s type and metadata holding ``value`` (the module reads it).

  Built from the metadata as it is (no ``__init__``: that would re-run metadata checks and
  their deprecation warnings on every call)."""
  cls = type(var)
  if hasattr(cls, "from_metadata"):
    return cls.from_metadata(value, var.get_metadata())
  return cls(value, **var.get_metadata())


def _kernel_property(name: str) -> property:
  def get(self):
    var = vars(self)[name]
    ph = _ACTIVE.get().get(id(self), {}).get(name)
    if ph is not None:
      return _like(var, ph)
    ad = vars(self)[name + SUFFIX]
    if ad.strict:
      raise _lazy.strict_error(ad.path)
    _record(ad.path, "merged")
    return _like(var, _kernel.merged(ad.kernel(var.get_value())))

  def set_(self, value):
    vars(self)[name] = value

  return property(get, set_, doc=f"The adapted kernel {name!r} (w + ΔW when read directly).")


def _with_placeholders(self, names, base_call, args, kwargs):
  """``self``'s call as a function of one placeholder per kernel ``names`` (read through the
  kernel properties while it runs)."""
  active = _ACTIVE.get()

  def traced(*placeholders):
    token = _ACTIVE.set(types.MappingProxyType({**active, id(self): dict(zip(names, placeholders))}))
    try:
      return base_call(self, *args, **kwargs)
    finally:
      _ACTIVE.reset(token)

  return traced


def _call(self, base_call, args, kwargs):
  names = type(self)._delora_names
  active = _ACTIVE.get()
  if id(self) in active:
    return base_call(self, *args, **kwargs)
  bases, lazies = [], []
  for n in names:
    w = vars(self)[n].get_value()
    ad = vars(self)[n + SUFFIX]
    key = None
    if ad.dropout > 0.0 and not ad.deterministic and ad.rngs is not None:
      key = ad.rngs.dropout()
    in_axes = tuple(ad.in_axes) if ad.stack else tuple(w.ndim + a for a in ad.in_axes)
    src = _lazy.Source(ad.path, _record, in_axes=in_axes, strict=ad.strict, dropout=ad.dropout)
    bases.append(w)
    lazies.append(_lazy.from_kernel(ad.kernel(w), lax.stop_gradient(w), src, key))
  return _lazy.run(_with_placeholders(self, names, base_call, args, kwargs), bases, lazies)


def _subclass(cls: type, names: tuple[str, ...], prefix: str, call, prop) -> type:
  """``cls`` with ``__call__`` routed through ``call`` and each kernel ``names`` a ``prop``."""
  base_call = cls.__call__

  @functools.wraps(base_call)
  def __call__(self, *args, **kwargs):
    return call(self, base_call, args, kwargs)

  ns = {n: prop(n) for n in names}
  ns.update(__call__=__call__, _delora_names=names, _delora_base=cls, __module__=cls.__module__, __doc__=cls.__doc__)
  return type(f"{prefix}{cls.__name__}", (cls,), ns)


@functools.cache
def adapted_class(cls: type, names: tuple[str, ...]) -> type:
  """The subclass of ``cls`` whose kernels ``names`` are adapted."""
  return _subclass(cls, names, "Delora", _call, _kernel_property)


def is_adapted(module: Any) -> bool:
  return isinstance(module, nnx.Module) and "_delora_names" in type(module).__dict__


def modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """``{path: module}`` of every module in ``model``'s graph (first path of shared ones)."""
  out: dict[str, nnx.Module] = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      out.setdefault("/".join(str(p) for p in path), node)
  return out


def kernels(model: nnx.Module) -> dict[str, DeloraKernel]:
  """``{kernel path: DeloraKernel}`` of an adapted model (a flat tree the Linen API reads)."""
  out = {}
  for prefix, mod in modules(model).items():
    if is_adapted(mod):
      for n in type(mod)._delora_names:  # type: ignore[attr-defined]
        ad = vars(mod)[n + SUFFIX]
        out[f"{prefix}/{n}" if prefix else n] = ad.kernel(vars(mod)[n].get_value())
  return out


def with_kernels(model: nnx.Module, ks: dict[str, DeloraKernel]) -> nnx.Module:
  """A copy of the adapted ``model`` whose adapters hold the arrays of ``ks`` (same paths)."""
  new = copy(model)
  for prefix, mod in modules(new).items():
    if is_adapted(mod):
      for n in type(mod)._delora_names:  # type: ignore[attr-defined]
        k, ad = ks[f"{prefix}/{n}" if prefix else n], vars(mod)[n + SUFFIX]
        for f in ("a", "b", "lam", "w_norm", "res_a", "res_b"):
          if f in vars(ad):
            getattr(ad, f).set_value(ad.stored(k, f))
  return new


def copy(model: nnx.Module) -> nnx.Module:
  """A copy with new Variable objects (arrays are shared; they are immutable)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x, state), copy=True)


def restore(model: nnx.Module, merge: bool) -> nnx.Module:
  """A plain copy of ``model``: adapters removed, kernels ``w + ΔW`` or ``w``."""
  new = copy(model)
  for mod in modules(new).values():
    if not is_adapted(mod):
      continue
    cls = type(mod)
    for n in cls._delora_names:  # type: ignore[attr-defined]
      var, ad = vars(mod)[n], vars(mod)[n + SUFFIX]
      if merge:
        var.set_value(_kernel.merged(ad.kernel(var.get_value())))
      delattr(mod, n + SUFFIX)
    mod.__class__ = cls._delora_base  # type: ignore[attr-defined]
  return new


def explain(model: nnx.Module, args: tuple, kwargs: dict) -> dict[str, list[str]]:
  """`delora_jax.explain` for an adapted NNX model: traces ``model(*args, **kwargs)`` abstractly."""
  paths = list(kernels(model))
  if not paths:
    raise ValueError("explain: this nnx.Module holds no DeLoRA adapter; call delora_jax.nnx.wrap(model, rules) first.")
  seen: dict[str, set] = {"factorised": set(), "merged": set()}
  token = _RECORDER.set(lambda path, kind: seen[kind].add(path))
  try:
    nnx.eval_shape(lambda m: m(*args, **kwargs), model)
  finally:
    _RECORDER.reset(token)
  return {
    "factorised": [p for p in paths if p in seen["factorised"] and p not in seen["merged"]],
    "merged": [p for p in paths if p in seen["merged"]],
    "unused": [p for p in paths if p not in seen["factorised"] and p not in seen["merged"]],
  }


# ---------------------------------------------------------------- layout inference


def _probe_property(name: str) -> property:
  def get(self):
    var = vars(self)[name]
    ph = _ACTIVE.get().get(id(self), {}).get(name)
    return var if ph is None else _like(var, ph)

  def set_(self, value):
    vars(self)[name] = value

  return property(get, set_)


def _probe_call(self, base_call, args, kwargs):
  names = type(self)._delora_names
  active = _ACTIVE.get()
  if id(self) in active:
    return base_call(self, *args, **kwargs)
  paths = vars(self)["_delora_paths"]
  bases = [vars(self)[n].get_value() for n in names]
  return _infer.trace(_with_placeholders(self, names, base_call, args, kwargs), bases, [paths[n] for n in names])


@functools.cache
def _probe_class(cls: type, names: tuple[str, ...]) -> type:
  return _subclass(cls, names, "Probe", _probe_call, _probe_property)


def probe(model: nnx.Module, like: Any, paths: set[str]) -> _infer.Uses:
  """How ``model(*like)`` (or ``like(model)``) uses the kernels at ``paths``."""
  new = copy(model)
  mods = modules(new)
  owners: dict[str, dict[str, str]] = {}
  for path in paths:
    prefix, _, name = path.rpartition("/")
    if prefix in mods and isinstance(vars(mods[prefix]).get(name), nnx.Variable):
      owners.setdefault(prefix, {})[name] = path
  for prefix, names in owners.items():
    mod = mods[prefix]
    object.__setattr__(mod, "_delora_paths", names)
    mod.__class__ = _probe_class(type(mod), tuple(sorted(names)))
  if callable(like):
    call = like
  elif isinstance(like, tuple):
    call = lambda m: m(*like)  # noqa: E731
  else:
    raise TypeError(
      "`like` must be a tuple of example arguments for model(*like), or a "
      f"function like(model) that calls it; got {type(like).__name__}."
    )
  return _infer.probe(lambda: nnx.eval_shape(call, new))
