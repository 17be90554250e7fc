"""Flax NNX: adapted modules whose calls run factorised (see :mod:`delora_jax.nnx`).

An adapted module is the original module object's copy with its class swapped
for a subclass that (1) keeps the kernel Variable where it was (so the state's
paths are unchanged), (2) holds the adapter next to it as ``<name>_delora``
(``a``, ``b``, ``lam`` as :class:`DeloraParam`, ``w_norm`` as
:class:`DeloraConst`), (3) evaluates ``__call__`` factorised through
:mod:`delora_jax._interpret`, traced as a pure function of the module's state
(:func:`_functional`: ``nnx.split``/``nnx.merge`` around the call, the Variables
it wrote set back after), and (4) resolves any other read of the kernel
attribute to the merged weight ``w + ΔW``, reported as a fallback.

Tied weights: every module holding an adapted Variable (:func:`holders`) gets
the same adapter object, so the update is trained once and merged once; the
kernel is named by its state path (its first path in the graph).
"""

from __future__ import annotations

import contextvars
import functools
import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.errors import TraceContextError
from jax import lax

from delora_jax import _interpret, _kernel, _layout, _ops, _quant, _report, _tree
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
    self.tied = False  # held by several modules (nnx.wrap sets it)

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


def _record(path: str, kind: str) -> None:
  """Notes ``path`` in the open report; a merged use outside any report warns at once."""
  _report.note(path, kind)
  if kind == "merged" and not _report.open_records():
    _report.warn_merged(
      "delora_jax.nnx",
      {path},
      "Pass strict=True to delora_jax.nnx.wrap to make this an error; delora_jax.explain(adapted, *args) "
      "lists the paths.",
      stacklevel=5,
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
    ad = vars(self).get(name + SUFFIX)
    if ad is None:  # a module being probed for its layout (no adapter yet): the plain kernel
      return var
    if ad.strict:
      raise _report.strict_error(ad.path)
    _record(ad.path, "merged")
    return _like(var, _kernel.merged(ad.kernel(var.get_value())))

  def set_(self, value):
    vars(self)[name] = value

  return property(get, set_, doc=f"The adapted kernel {name!r} (w + ΔW when read directly).")


def _functional(self, names, base_call, args, kwargs, run):
  """Runs ``self``'s call as a pure function of its state and writes the state it changed back.

  The call is traced (by ``run(fn, kernels, values)``: the interpreter, or layout inference) as
  ``fn(*kernels, *values) -> (out, new state)``: ``nnx.merge`` rebuilds ``self`` inside the trace
  from its state (``values``, with a placeholder for each kernel ``names``, which the kernel
  properties return), the call runs on that copy, ``nnx.split`` takes its state after. So a
  call that writes Variables (a cache, batch statistics, ``sow``, an ``nnx.Rngs`` draw) writes
  the copy; the Variables it changed (or created) are then set in ``self``, as a plain call would.
  """
  kvars = {n: vars(self)[n] for n in names}
  kpaths: dict[tuple, str] = {}  # state path of each kernel -> its (first) name
  for p, node in nnx.iter_graph(self):
    for n, var in kvars.items():
      if node is var:
        kpaths.setdefault(p, n)

  def is_kernel(path, _):
    return path in kpaths

  def is_ref(_, var):  # a Variable holding a mutable array reference: written in place, not returned
    # (the raw value's type, not ref=True: flax 0.12.1 records ref=True but holds a plain array)
    return isinstance(var.get_raw_value(), getattr(jax, "Ref", ()))

  graphdef, kstate, rstate, state = nnx.split(self, is_kernel, is_ref, ...)
  kflat = list(nnx.to_flat_state(kstate))
  values, tree = jax.tree.flatten((rstate, state))
  active = _ACTIVE.get()
  after = []  # the copy's graphdef after the call (static, so kept aside)

  def fn(*flat):
    ph = dict(zip(names, flat[: len(names)]))
    ks = nnx.from_flat_state([(p, var.replace(ph[kpaths[p]])) for p, var in kflat])
    copy = nnx.merge(graphdef, ks, *jax.tree.unflatten(tree, flat[len(names) :]))
    token = _ACTIVE.set(types.MappingProxyType({**active, id(copy): ph}))
    try:
      out = base_call(copy, *args, **kwargs)
    finally:
      _ACTIVE.reset(token)
    new_graphdef, _, _, new_state = nnx.split(copy, is_kernel, is_ref, ...)
    after.append(new_graphdef)
    return out, new_state

  try:
    out, new_state = run(fn, [_placeholder(var.get_value()) for var in kvars.values()], values)
  except TraceContextError as e:
    raise TypeError(
      f"{_where(self)}: its call writes NNX state that is not part of the module (a Variable or "
      "Module passed as an argument, or held outside it), which delora_jax cannot carry out of the "
      "call it traces. Keep that state in the module (or return it), or leave this module's "
      f"kernels out of the rules. ({e})"
    ) from None
  _write_back(self, graphdef, (kstate, rstate, state), after[-1], new_state)
  return out


def _placeholder(w: Any) -> Any:
  """What a traced call gets for kernel ``w``: the kernel, or for a base stored quantized the
  float kernel it stands for (shape and dtype; the call's contractions then read the QArray)."""
  return jax.ShapeDtypeStruct(w.shape, w.dtype) if _quant.is_quantized(w) else w


def _where(module) -> str:
  """Names an adapted (or probed) module by its kernels' paths, for errors."""
  paths = vars(module).get("_delora_paths")
  if paths is None:
    paths = {n: vars(module)[n + SUFFIX].path for n in type(module)._delora_names}
  return "the module holding " + ", ".join(repr(p) for p in sorted(paths.values()))


def _write_back(self, graphdef, states, new_graphdef, new_state) -> None:
  """Sets in ``self`` the Variables whose values the traced call changed, and adds those it created.

  Raises ``TypeError`` (before writing anything) when the call changed more than Variables (a
  plain attribute, a submodule): that cannot be carried out of the trace."""
  old = dict(nnx.to_flat_state(states[-1]))
  new = dict(nnx.to_flat_state(new_state))
  added = {p: v for p, v in new.items() if p not in old}
  if new_graphdef != graphdef:
    probe = nnx.merge(graphdef, *states, copy=True)
    if added:
      nnx.update(probe, nnx.from_flat_state(added))
    if old.keys() - new.keys() or nnx.graphdef(probe) != new_graphdef:
      raise TypeError(
        f"{_where(self)}: its call changes the module's structure (an attribute that is not an "
        "nnx.Variable, a submodule, or a removed Variable), which delora_jax cannot carry out of "
        "the call it traces (it runs the call as a pure function of the module's Variables). Keep "
        "state that changes during the call in nnx.Variables, or leave this module's kernels out "
        "of the rules."
      )
  for p, var in old.items():
    got = new[p].get_raw_value()
    if jax.tree.structure(got) != jax.tree.structure(var.get_raw_value()) or any(  # type: ignore[operator]
      a is not b for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(var.get_raw_value()))
    ):
      var.set_raw_value(got)  # checked: raises TraceContextError where a plain write would
  if added:
    nnx.update(self, nnx.from_flat_state(added))


def _dropout_key(ad: Adapter) -> Any:
  if ad.dropout > 0.0 and not ad.deterministic and ad.rngs is not None:
    return ad.rngs.dropout()
  return None


def _fused_linear(self, ad: Adapter, args, kwargs) -> Any:
  """``nnx.Linear``'s own call as the fused op (:func:`delora_jax._ops.dense`), or None."""
  if (
    type(self)._delora_base.__call__ is not nnx.Linear.__call__
    or self.dot_general is not lax.dot_general
    or self.preferred_element_type is not None
    or kwargs.get("out_sharding") is not None
    or len(args) != 1
    or ad.in_axes != (-2,)
    or ad.out_axes != (-1,)
  ):
    return None
  w = vars(self)["kernel"].get_value()
  if w.ndim != 2:
    return None
  bias = self.bias.get_value() if self.bias is not None else None
  k = ad.kernel(w)
  if _quant.is_quantized(w):  # the base contracted in its quantized form
    x, _, bias = self.promote_dtype((args[0], jnp.zeros((), w.dtype), bias), dtype=self.dtype)
    u, v = _kernel.contraction_factors(k, w.dtype, x.dtype)
    xd = _ops.branch_input(x, ad.dropout, _dropout_key(ad))
    return _ops.qdense(x, xd, w, u, v, bias, self.precision, 1, (w.shape[1],), ad.path)
  base_dtype = w.dtype
  x, w, bias = self.promote_dtype((args[0], w, bias), dtype=self.dtype)
  u, v = _kernel.contraction_factors(k, base_dtype, x.dtype)
  xd = _ops.branch_input(x, ad.dropout, _dropout_key(ad))
  return _ops.dense(x, xd, w, u, v, bias, self.precision, 1, (w.shape[1],), ad.path)


def _call(self, base_call, args, kwargs):
  names = type(self)._delora_names
  active = _ACTIVE.get()
  if id(self) in active:
    return base_call(self, *args, **kwargs)
  if "_delora_paths" in vars(self):  # layout inference: the kernels as probes
    paths = [vars(self)["_delora_paths"][n] for n in names]
    # _layout.trace probes the first len(paths) inputs (the kernels); the state values follow.
    run = lambda fn, bases, values: _layout.trace(fn, [*bases, *values], paths)  # noqa: E731
    return _functional(self, names, base_call, args, kwargs, run)
  outer = {id(ph) for phs in active.values() for ph in phs.values()}
  if names == ("kernel",) and not _layout.active() and id(vars(self)["kernel"].get_value()) not in outer:
    ad = vars(self)["kernel" + SUFFIX]
    out = _fused_linear(self, ad, args, kwargs)
    if out is not None:
      _report.note(ad.path, "factorised")
      return out
  lazies = []
  for n in names:
    w = vars(self)[n].get_value()
    if id(w) in outer:  # a tied kernel an enclosing adapted call made lazy already: its ΔW is counted there
      lazies.append(w)
      continue
    ad = vars(self)[n + SUFFIX]
    src = _interpret.Source(
      ad.path,
      _record,
      in_axes=tuple(ad.in_axes) if ad.stack else tuple(w.ndim + a for a in ad.in_axes),
      strict=ad.strict,
      dropout=ad.dropout,
      tied=ad.tied,
      quantized=_quant.describe(w),
    )
    base = lax.stop_gradient(_quant.array(w))  # a quantized base: dequantized (int8 per channel reads the ints)
    lazies.append(_interpret.from_kernel(ad.kernel(w), base, src, _dropout_key(ad)))
  run = lambda fn, bases, values: _interpret.run(fn, [*bases, *values], [*lazies, *values])  # noqa: E731
  return _functional(self, names, base_call, args, kwargs, run)


@functools.cache
def adapted_class(cls: type, names: tuple[str, ...]) -> type:
  """The subclass of ``cls`` whose kernels ``names`` are adapted: ``__call__`` runs through
  :func:`_call`, each kernel attribute is a :func:`_kernel_property`."""
  base_call = cls.__call__

  @functools.wraps(base_call)
  def __call__(self, *args, **kwargs):
    return _call(self, base_call, args, kwargs)

  ns: dict[str, Any] = {n: _kernel_property(n) for n in names}
  ns.update(__call__=__call__, _delora_names=names, _delora_base=cls, __module__=cls.__module__, __doc__=cls.__doc__)
  return type(f"Delora{cls.__name__}", (cls,), ns)


def is_adapted(module: Any) -> bool:
  return isinstance(module, nnx.Module) and "_delora_names" in type(module).__dict__


def modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """``{path: module}`` of every module in ``model``'s graph (first path of shared ones)."""
  out: dict[str, nnx.Module] = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      out.setdefault("/".join(str(p) for p in path), node)
  return out


def adapted(model: nnx.Module):
  """``(kernel path, module, name)`` of each adapted kernel of ``model``, once.

  A tied kernel (one Variable held by several modules, all with its adapter) is given once, by
  its state path (its first path in the graph), with the first module that holds it."""
  first = {id(node): "/".join(str(p) for p in path) for path, node in nnx.iter_graph(model)}
  seen = set()
  for mod in modules(model).values():
    if is_adapted(mod):
      for n in type(mod)._delora_names:  # type: ignore[attr-defined]
        var = vars(mod)[n]
        if id(var) not in seen:
          seen.add(id(var))
          yield first[id(var)], mod, n


def kernels(model: nnx.Module) -> dict[str, DeloraKernel]:
  """``{kernel path: DeloraKernel}`` of an adapted model (a flat tree the Linen API reads)."""
  return {path: vars(mod)[n + SUFFIX].kernel(vars(mod)[n].get_value()) for path, mod, n in adapted(model)}


_tree.MODEL_KERNELS[nnx.Module] = kernels


def with_kernels(model: nnx.Module, ks: dict[str, DeloraKernel]) -> nnx.Module:
  """A copy of the adapted ``model`` whose adapters hold the arrays of ``ks`` (same paths)."""
  new = copy(model)
  for path, mod, n in adapted(new):
    k, ad = ks[path], vars(mod)[n + SUFFIX]
    for f in ("a", "b", "lam", "w_norm", "res_a", "res_b"):
      if f in vars(ad):
        getattr(ad, f).set_value(ad.stored(k, f))
  return new


def holders(model: nnx.Module, variables: dict[str, nnx.Variable]) -> dict[str, list[tuple[nnx.Module, str]]]:
  """``{path: [(module, attribute), ...]}``: every module that holds the Variable ``variables[path]``.

  Tied weights give several (the same Variable object assigned to two modules). Raises
  ``TypeError`` when the Variable is also held by something that is not a module attribute
  (a list, a dict): a use through it could not be routed through the adapter."""
  by_id = {id(v): p for p, v in variables.items()}
  out: dict[str, list[tuple[nnx.Module, str]]] = {p: [] for p in variables}
  for mod in modules(model).values():
    for attr, value in vars(mod).items():
      if id(value) in by_id:
        out[by_id[id(value)]].append((mod, attr))
  dups = nnx.find_duplicates(model, only=lambda _, node: id(node) in by_id)
  first = dict(nnx.iter_graph(model)) if dups else {}
  for paths in dups:
    path = by_id[id(first[paths[0]])]
    if len(paths) != len(out[path]):
      where = ", ".join(repr("/".join(map(str, p))) for p in paths)
      raise TypeError(
        f"{path}: this kernel's Variable is held at {where}, not all of them attributes of "
        "nnx.Modules, so a use through the others could not be routed through its adapter. Tie "
        "the weight by assigning the Variable to each module (`b.kernel = a.kernel`), or leave "
        "it out of the rules."
      )
  return out


def copy(model: nnx.Module) -> nnx.Module:
  """A copy with new Variable objects (arrays are shared; they are immutable)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x, state), copy=True)


def restore(model: nnx.Module, merge: bool) -> nnx.Module:
  """A plain copy of ``model``: adapters removed, kernels ``w + ΔW`` (once for a tied kernel) or ``w``."""
  new = copy(model)
  done = set()
  for mod in modules(new).values():
    if not is_adapted(mod):
      continue
    cls = type(mod)
    for n in cls._delora_names:  # type: ignore[attr-defined]
      var, ad = vars(mod)[n], vars(mod)[n + SUFFIX]
      if id(var) not in done:  # once for a tied kernel; unwrap gives a base stored quantized back dequantized
        done.add(id(var))
        w = var.get_value()
        if merge:
          var.set_value(_kernel.merged(ad.kernel(w)))
        elif _quant.is_quantized(w):
          var.set_value(_quant.dequantize(w))
      delattr(mod, n + SUFFIX)
    mod.__class__ = cls._delora_base  # type: ignore[attr-defined]
  return new


def explain(model: nnx.Module, args: tuple, kwargs: dict) -> dict[str, list[str]]:
  """`delora_jax.explain` for an adapted NNX model: traces ``model(*args, **kwargs)`` abstractly."""
  paths = list(kernels(model))
  if not paths:
    raise ValueError("explain: this nnx.Module holds no DeLoRA adapter; call delora_jax.nnx.wrap(model, rules) first.")
  graphdef, trained, rest = nnx.split(copy(model), DeloraParam, ...)  # type: ignore[misc]
  names, leaves, treedef = _tree.flatten(trained)
  per_kernel: dict[str, list] = {}
  for name, leaf in zip(names, leaves):
    per_kernel.setdefault(name.rpartition(SUFFIX + "/")[0], []).append(leaf)

  def call(grouped):
    flat = iter([x for p in per_kernel for x in grouped[p]])
    trained = jax.tree_util.tree_unflatten(treedef, [next(flat) for _ in leaves])
    return nnx.merge(graphdef, trained, rest, copy=True)(*args, **kwargs)  # fresh Variables of this trace

  with _report.recording() as rec:
    live = _report.reached(call, per_kernel)
  return _report.summary(paths, rec, live)


def probe(model: nnx.Module, like: Any, paths: set[str]) -> _interpret.Uses:
  """How ``model(*like)`` (``model(**like)`` for a dict, or ``like(model)``) uses the kernels at ``paths``."""
  new = copy(model)
  mods = modules(new)
  found = {}
  for path in paths:
    prefix, _, name = path.rpartition("/")
    if prefix in mods and isinstance(vars(mods[prefix]).get(name), nnx.Variable):
      found[path] = vars(mods[prefix])[name]
  owners: dict[int, tuple[nnx.Module, dict[str, str]]] = {}
  for path, held in holders(new, found).items():
    for mod, name in held:
      if callable(mod):  # (wrap refuses the others)
        owners.setdefault(id(mod), (mod, {}))[1][name] = path
  for mod, names in owners.values():
    object.__setattr__(mod, "_delora_paths", names)
    mod.__class__ = adapted_class(type(mod), tuple(sorted(names)))  # with no adapter: probed
  if callable(like):
    call = like
  elif isinstance(like, tuple):
    call = lambda m: m(*like)  # noqa: E731
  elif isinstance(like, Mapping) and all(isinstance(k, str) for k in like):
    call = lambda m: m(**like)  # noqa: E731
  else:
    raise TypeError(
      "`like` must be a tuple of example arguments for model(*like), a dict of keyword "
      "arguments for model(**like) (e.g. tunix's model.get_model_input()), or a function "
      f"like(model) that calls it; got {type(like).__name__}."
    )
  return _layout.probe(lambda: nnx.eval_shape(call, new))


_report.EXPLAINERS.append(
  (
    nnx.Module,
    lambda model, variables=None, *args, **kw: explain(model, (() if variables is None else (variables,)) + args, kw),
  )
)
