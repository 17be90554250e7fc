"""`wrap` a parameter tree with DeLoRA; `merge`, `unwrap`, `adapters`, `with_adapters`."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from delora_jax import _kernel, _layout, _linen, _prequant, _quant, _tree
from delora_jax._kernel import DeloraKernel, is_kernel
from delora_jax._rule import Modules, Rule, as_rule, is_module_kernel, stack_positions
from delora_jax._sharding import kernel_specs, scale_spec

ADAPTER_FIELDS = ("a", "b", "lam", "w_norm")
RESIDUAL_FIELDS = ("res_a", "res_b")


def _compile(rules: Mapping[Any, Any]) -> list[tuple[Any, re.Pattern, Rule]]:
  if not isinstance(rules, Mapping):
    raise TypeError(
      f"`rules` must map regex patterns to a Rule or an int rank, e.g. {{'.*kernel': 8}}; got {type(rules).__name__}."
    )
  if not rules:
    raise ValueError("`rules` is empty: nothing would be adapted. Pass e.g. {'.*kernel': 8}.")
  out = []
  for pattern, value in rules.items():
    if not isinstance(pattern, (str, Modules)):
      raise TypeError(f"rules keys must be regex strings or delora_jax.Modules(regex); got {pattern!r}.")
    try:
      compiled = re.compile(pattern.pattern if isinstance(pattern, Modules) else pattern)
    except re.error as e:
      raise ValueError(
        f"rules pattern {pattern!r} is not a valid regular expression ({e}). "
        "Patterns are matched with re.fullmatch against '/'-joined paths such as "
        "'Dense_0/kernel'."
      ) from None
    out.append((pattern, compiled, as_rule(value, pattern)))
  return out


def selects(key: Any, regex: re.Pattern, path: str) -> bool:
  """Whether the rules key ``key`` (compiled to ``regex``) selects the parameter at ``path``."""
  return key.selects(regex, path) if isinstance(key, Modules) else regex.fullmatch(path) is not None


def _path_key(key: jax.Array, path: str) -> jax.Array:
  """A key that depends on ``key`` and ``path`` alone (not on tree order)."""
  digest = hashlib.blake2b(path.encode(), digest_size=8).digest()
  hi, lo = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
  return jax.random.fold_in(jax.random.fold_in(key, hi), lo)


def _check_kernel_leaf(path: str, pattern: str, leaf: Any) -> None:
  hint = f"Narrow the pattern {pattern!r} so it only selects kernels (e.g. end it with 'kernel')."
  if not _tree.is_array_like(leaf):
    raise TypeError(
      f"{path}: rules pattern {pattern!r} matched a {type(leaf).__name__}, "
      f"expected a floating-point kernel array. {hint}"
    )
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    quantized = _prequant.integer_kernel(path, pattern, leaf)  # gemma's IntWrapper, gemma.peft.quantize
    raise TypeError(
      quantized
      or f"{path}: rules pattern {pattern!r} matched an array of dtype {leaf.dtype}, expected a floating-point kernel. "
      f"{hint}"
    )
  if leaf.ndim < 2:
    raise ValueError(
      f"{path}: rules pattern {pattern!r} matched a {leaf.ndim}-D array of "
      f"shape {tuple(leaf.shape)} (a bias or scale?), expected a kernel "
      f"with at least 2 axes. {hint}"
    )
  if 0 in tuple(leaf.shape):
    raise ValueError(
      f"{path}: rules pattern {pattern!r} matched a kernel of shape "
      f"{tuple(leaf.shape)}, which has no entries: there is nothing to adapt (and no "
      f"norm to normalise by). {hint}"
    )


def _uniform(key, shape, bound, dtype):
  return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


def _adapter_arrays(w: jax.Array, key: jax.Array, rule: Rule, in_axes, out_axes, stack=(), lam: Any = None) -> dict:
  """The adapter arrays of kernel ``w`` under ``rule`` (``lam``: λ's initial value, default
  ``rule.lam``; an argument, so that one compiled program serves every λ)."""
  stacks, ins, outs = _kernel.layout_positions(stack, in_axes, out_axes, w.ndim)
  n_in = math.prod(w.shape[i] for i in ins)
  n_out = math.prod(w.shape[o] for o in outs)
  stack_shape = tuple(w.shape[p] for p in stacks)
  dtype, r = jnp.dtype(rule.dtype), rule.rank
  ka, kb = jax.random.split(key)
  # torch.nn.init.kaiming_uniform_(a=sqrt(5)) on torch-shaped A (r, in) / B (out, r).
  a = _uniform(ka, (*stack_shape, n_in, r), 1.0 / math.sqrt(n_in), dtype)
  if rule.init == "peft":
    b = jnp.zeros((*stack_shape, r, n_out), dtype)
  else:
    b = _uniform(kb, (*stack_shape, r, n_out), 1.0 / math.sqrt(r), dtype)
  w_norm = _kernel.in_norms(w, in_axes, out_axes, stack)
  if rule.norm == "base":  # PEFT's value: the norm rounded to the base kernel's dtype
    w_norm = w_norm.astype(w.dtype).astype(jnp.float32)
  lam = rule.lam if lam is None else lam
  out = {"a": a, "b": b, "lam": jnp.full(stack_shape, lam, dtype), "w_norm": w_norm.astype(dtype)}
  if rule.init == "paper":
    res_a, res_b = _kernel.normalised(a, b, out["lam"])  # exactly what `factors` computes at init
    out.update(res_a=res_a, res_b=res_b)
  if rule.slices is not None:
    out = _keep_slices(out, rule.slices, stack_shape)
  return {f: _kernel.place(x, stack, f) for f, x in out.items()}


def _keep_slices(arrays: dict, slices: tuple[int, ...], stack: tuple[int, ...]) -> dict:
  """Zeroes every adapter array outside the stacked ``slices`` (``Rule.slices``), arrays
  ``(*S, ...)`` with the stacked axes first.

  With ``a = b = λ = w_norm = 0`` a slice's update is exactly zero, its gradients are
  exactly zero (``w_norm`` scales every path into it), and any optax step leaves it zero.
  """
  live = np.zeros(math.prod(stack), bool)
  live[list(slices)] = True
  mask = jnp.asarray(live.reshape(stack))
  return {
    f: jnp.where(mask.reshape(stack + (1,) * (x.ndim - len(stack))), x, jnp.zeros((), x.dtype))
    for f, x in arrays.items()
  }


def live_slices(k: DeloraKernel) -> np.ndarray:
  """Bool ``(prod(S),)``: which stacked slices of ``k`` are adapted (``Rule.slices``).

  A slice left out by ``Rule.slices`` has ``w_norm = 0`` and ``λ = 0`` (and keeps them:
  its gradients are zero); an adapted slice has a non-zero λ or a non-zero base kernel.
  """
  c = _kernel.canonical(k)
  w_norm = np.asarray(jnp.asarray(c["w_norm"]).astype(jnp.float32))
  lam = np.asarray(jnp.asarray(c["lam"]).astype(jnp.float32)).reshape(-1)
  return np.any(w_norm.reshape(-1, w_norm.shape[-1]) != 0, axis=-1) | (lam != 0)


def _compiled_init(rule: Rule, in_axes, out_axes, out_shardings: tuple | None, stack=()) -> Any:
  """``(w, key) -> adapters``: `_adapter_arrays` as one compiled program, built in
  ``out_shardings`` when given. A model's kernels take one compile per distinct shape and layout
  (λ is an argument) instead of a dozen eager ops each."""
  fn = _compiled(
    dataclasses.replace(rule, lam=1.0, quantize=None, tile_size=None), in_axes, out_axes, out_shardings, stack
  )
  return lambda w, key: fn(w, key, lam=jnp.asarray(rule.lam, rule.dtype))


@functools.lru_cache(maxsize=256)
def _compiled(rule: Rule, in_axes, out_axes, out_shardings: tuple | None, stack=()) -> Any:
  fn = functools.partial(_adapter_arrays, rule=rule, in_axes=in_axes, out_axes=out_axes, stack=stack)
  return jax.jit(fn, out_shardings=None if out_shardings is None else dict(out_shardings))


def _derived_shardings(path: str, w: Any, rule: Rule, in_axes, out_axes, stack=()) -> tuple | None:
  """Adapter shardings for a kernel laid out over several devices, else None."""
  if isinstance(w, jax.core.Tracer) or not isinstance(w, jax.Array):
    return None
  sh = w.sharding
  if not isinstance(sh, NamedSharding) or len(sh.device_set) < 2:
    return None
  specs = kernel_specs(path, tuple(w.shape), sh.spec, in_axes, out_axes, dict(sh.mesh.shape), stack)
  fields = ADAPTER_FIELDS + (RESIDUAL_FIELDS if rule.init == "paper" else ())
  return tuple((f, NamedSharding(sh.mesh, specs[f], memory_kind=sh.memory_kind)) for f in fields)


def _abstract_arrays(
  path: str, w: jax.ShapeDtypeStruct, key: jax.Array, rule: Rule, in_axes, out_axes, stack=()
) -> dict:
  """Adapters of an abstract kernel as ``ShapeDtypeStruct``s: nothing is computed or allocated.

  A kernel carrying a ``NamedSharding`` gives its adapters the derived ones
  (:func:`delora_jax.shardings`'s rule, checked against the mesh sizes); a
  ``SingleDeviceSharding`` is copied; no sharding gives none.
  """
  fn = functools.partial(_adapter_arrays, rule=rule, in_axes=in_axes, out_axes=out_axes, stack=stack)
  shapes = jax.eval_shape(fn, jax.ShapeDtypeStruct(w.shape, w.dtype), key)
  sh = w.sharding
  if isinstance(sh, NamedSharding):
    specs = kernel_specs(path, tuple(w.shape), sh.spec, in_axes, out_axes, dict(sh.mesh.shape), stack)
    made = {f: NamedSharding(sh.mesh, specs[f], memory_kind=sh.memory_kind) for f in shapes}
  else:
    made = dict.fromkeys(shapes, sh)
  return {f: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=made[f]) for f, s in shapes.items()}


def _adapt(path: str, w: Any, rule: Rule, key: jax.Array) -> DeloraKernel:
  in_axes, out_axes, stack = rule.kernel_layout(path, tuple(w.shape))
  # Any rank > 0 is accepted, as PEFT does: above min(in, out) the update simply has rank
  # min(in, out) and the bound still holds (each normalised rank-one term has norm 1).
  if rule.slices is not None:
    n = math.prod(w.shape[p] for p in stack_positions(rule.stack_axes))
    if rule.slices[-1] >= n:
      raise ValueError(
        f"{path}: Rule slices {rule.slices} name slice {rule.slices[-1]}, but the "
        f"kernel of shape {tuple(w.shape)} has {n} stacked slices (stack_axes="
        f"{rule.stack_axes}). Use indices below {n}."
      )
  key = _path_key(key, path)
  layout: dict[str, Any] = dict(in_axes=in_axes, out_axes=out_axes, stack=stack, dropout=rule.dropout)
  if rule.quantize is not None:
    _check_quantizable(path, w, rule, in_axes)
  if isinstance(w, jax.ShapeDtypeStruct):  # abstract params (AOT planning): shapes only
    arrays = _abstract_arrays(path, w, key, rule, in_axes, out_axes, stack)
    return DeloraKernel(w=_quantized(w, rule, in_axes, stack), **arrays, **layout)
  # A sharded kernel's adapters are built in place on its devices: no host round trip, no
  # gathered kernel.
  shardings = _derived_shardings(path, w, rule, in_axes, out_axes, stack)
  arrays = _compiled_init(rule, in_axes, out_axes, shardings, stack)(w, key)
  # w_norm above is the full-precision kernel's (PEFT's definition); only then is w quantized.
  return DeloraKernel(w=_quantized(w, rule, in_axes, stack), **arrays, **layout)


def _check_quantizable(path: str, w: Any, rule: Rule, in_axes) -> None:
  """``Rule(quantize=...)`` on this kernel: the tile divides its innermost input axis."""
  if rule.tile_size is not None:
    ax = max(a % w.ndim for a in in_axes)
    n = w.shape[ax]
    if n % rule.tile_size:
      raise ValueError(
        f"{path}: tile_size={rule.tile_size} does not divide the kernel's innermost input axis {ax} of size {n} "
        f"(kernel shape {tuple(w.shape)}); expected a divisor of {n}. Use e.g. tile_size="
        f"{max(d for d in range(1, min(n, rule.tile_size) + 1) if n % d == 0)}, or tile_size=None (per channel)."
      )


def _quantized(w: Any, rule: Rule, in_axes, stack=()) -> Any:
  """``w`` stored as ``rule.quantize`` says (an abstract kernel: its abstract quantized form)."""
  if rule.quantize is None:
    return w
  fn = functools.partial(
    _quant.quantize, scheme=rule.quantize, in_axes=tuple(in_axes), tile=rule.tile_size, stack=tuple(stack)
  )
  if not isinstance(w, jax.ShapeDtypeStruct):
    return fn(w)
  q = jax.eval_shape(fn, jax.ShapeDtypeStruct(w.shape, w.dtype))
  sh = w.sharding
  scale_sh = sh
  if isinstance(sh, NamedSharding):  # as delora_jax.shardings derives it
    spec = scale_spec(sh.spec, tuple(w.shape), tuple(q.scale.shape), dict(sh.mesh.shape))
    scale_sh = NamedSharding(sh.mesh, spec, memory_kind=sh.memory_kind)
  return dataclasses.replace(
    q,
    values=jax.ShapeDtypeStruct(q.values.shape, q.values.dtype, sharding=sh),
    scale=jax.ShapeDtypeStruct(q.scale.shape, q.scale.dtype, sharding=scale_sh),
  )


def wrap(params: Any, rules: Mapping[Any, Rule | int], *, key: jax.Array | None = None, like: Any = None) -> Any:
  """Adds DeLoRA adapters to the kernels that ``rules`` select.

  Each leaf's ``/``-joined path (e.g. ``Dense_0/kernel``; an NNX Variable's
  ``.value`` is not part of it) is matched with ``re.fullmatch`` against the
  patterns in order; the first match wins. Matched kernels become
  :class:`DeloraKernel` nodes holding the untouched kernel and ``a``, ``b``,
  ``lam``, ``w_norm``; every other leaf is returned as it was (same object).

  Args:
    params: a Flax parameter tree: Linen ``params`` dict (or FrozenDict), or an
      NNX ``State`` from ``nnx.split``.
    rules: ``{regex: Rule | int}``; an int is ``Rule(rank)``. A key may also be
      :class:`delora_jax.Modules` ``(regex)``, which selects modules by path as qwix and
      MaxText configs do (``.*q_proj|.*down_proj``: every kernel of the modules whose path, the
      parameter's path without its last name, the regex fully matches).
    key: PRNG key for the adapters' initialisation; ``None`` means
      ``jax.random.key(0)``. Each kernel draws from a key derived from this key
      and its path alone, so the result does not depend on dict order.
    like: ``(model, *example_args)`` (or a function ``like(params)`` that runs
      ``model.apply({"params": params, ...}, ...)``, which also takes keyword inputs:
      ``lambda p: model.apply({"params": p}, **inputs)``): one abstract call of the
      model (nothing is computed) from which each selected kernel's layout is
      taken, the axes it contracts being its inputs and the axes ``nn.scan``
      slices off its stacked axes. Rules may then leave ``in_axes``,
      ``out_axes`` and ``stack_axes`` out; declared layouts are checked against
      the model's use (a mismatch is a ``ValueError`` naming both).

  Abstract params work too: where a kernel is a ``jax.ShapeDtypeStruct``
  (e.g. from ``jax.eval_shape(model.init, ...)``), its adapters are
  ``ShapeDtypeStruct``s of the right shapes and dtypes, nothing is computed
  or allocated, and a kernel that carries a ``NamedSharding`` gives them the
  shardings :func:`delora_jax.shardings` derives. That is how a step for a
  model too large for this machine is planned with
  ``jax.jit(step).lower(...).compile()`` (``benchmarks/scale.py``).

  Returns:
    The adapted tree, same container types as ``params``.

  Raises:
    ValueError / TypeError: invalid patterns, patterns that select nothing (or
      only leaves an earlier pattern took), non-kernel leaves, empty kernels,
      ambiguous N-D kernels, a tree that is already adapted, or an abstract
      kernel whose ``NamedSharding`` splits an axis over mesh axes whose size
      does not divide it (the path, axis and mesh axes are named).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, delora_jax
    >>> model = nn.Dense(16)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    >>> tree = delora_jax.wrap(params, {"kernel": delora_jax.Rule(4, lam=8.0)})
    >>> {p: x["a"].shape for p, x in delora_jax.adapters(tree).items()}
    {'kernel': (32, 4)}
    >>> attn = nn.DenseGeneral((2, 8))  # an N-D kernel (32, 2, 8): layout taken from the call
    >>> x = jnp.ones((1, 32))
    >>> tree = delora_jax.wrap(attn.init(jax.random.key(0), x)["params"], {"kernel": 4},
    ...                        like=(attn, x))
    >>> delora_jax.adapters(tree)["kernel"]["b"].shape
    (4, 16)
    >>> mlp = {"up_proj": {"kernel": jnp.ones((8, 16))}, "down_proj": {"kernel": jnp.ones((16, 8))}}
    >>> sorted(delora_jax.adapters(delora_jax.wrap(mlp, {delora_jax.Modules(".*down_proj"): 4})))
    ['down_proj/kernel']
    >>> abstract = {"kernel": jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16)}  # no memory
    >>> delora_jax.adapters(delora_jax.wrap(abstract, {"kernel": 16}))["kernel"]["a"]
    ShapeDtypeStruct(shape=(4096, 16), dtype=float32)
  """
  probe = None
  if like is not None:
    probe = lambda paths: _linen.probe(like, params, paths)  # noqa: E731
  return wrap_with(params, rules, key=key, probe=probe)


def wrap_with(
  params: Any, rules: Mapping[Any, Rule | int], *, key: jax.Array | None, probe: Callable[[set[str]], Any] | None
) -> Any:
  """`wrap`, with layouts inferred by ``probe(selected paths) -> _interpret.Uses`` if given."""
  compiled = _compile(rules)
  _prequant.check_tree(params, compiled, selects)
  paths, leaves, treedef = _tree.flatten(params)
  adapted = [p for p, x in zip(paths, leaves) if is_kernel(x)]
  if adapted:
    raise ValueError(
      f"`params` is already adapted (DeLoRA kernels at {_tree.sample_paths(adapted)}). "
      "Wrapping twice would stack adapters; call `delora_jax.unwrap(tree)` or "
      "`delora_jax.merge(tree)` first."
    )
  key = jax.random.key(0) if key is None else key
  if isinstance(key, np.ndarray):
    key = jnp.asarray(key)
  if not isinstance(key, jax.Array):
    raise TypeError(f"`key` must be a PRNG key such as jax.random.key(0); got {key!r}.")
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  hits: dict[str, list[str]] = {pattern: [] for pattern, _, _ in compiled}
  claimed: dict[str, list[str]] = {pattern: [] for pattern, _, _ in compiled}
  owners = {}
  for i, path in enumerate(paths):
    owner = None
    for pattern, regex, rule in compiled:
      if selects(pattern, regex, path) and (not isinstance(pattern, Modules) or is_module_kernel(path, leaves[i])):
        hits[pattern].append(path)
        if owner is None:
          owner = (pattern, rule)
    if owner is not None:
      claimed[owner[0]].append(path)
      if owner[1].quantize is not None and _tree.is_array_like(leaves[i]):
        _quant.check_floating(path, leaves[i], owner[1].quantize)
      _check_kernel_leaf(path, owner[0], leaves[i])
      owners[i] = owner
  for pattern, _, _ in compiled:
    if not hits[pattern] and isinstance(pattern, Modules):
      modules = list(dict.fromkeys(p.rpartition("/")[0] for p, x in zip(paths, leaves) if is_module_kernel(p, x)))
      raise ValueError(
        f"rules key {pattern!r} matches no module that holds a kernel (re.fullmatch on module paths: "
        f"a parameter's path without its last name). Some module paths with kernels in `params`: "
        f"{_tree.sample_paths(modules)}. Fix the pattern or remove it."
      )
    if not hits[pattern]:
      raise ValueError(
        f"rules pattern {pattern!r} matches no leaf (re.fullmatch on '/'-joined paths). "
        f"Some paths in `params`: {_tree.sample_paths(paths)}. Fix the pattern or remove it."
      )
    if not claimed[pattern]:
      raise ValueError(
        f"rules pattern {pattern!r} only matches leaves that earlier patterns already "
        f"adapt ({_tree.sample_paths(hits[pattern])}); the first matching pattern wins. "
        "Reorder the rules or remove this one."
      )
  if probe is not None:
    uses = probe({paths[i] for i in owners})
    owners = {
      i: (pat, _layout.resolve(paths[i], tuple(leaves[i].shape), rule, uses)) for i, (pat, rule) in owners.items()
    }
  new = list(leaves)
  for i, (_, rule) in owners.items():
    new[i] = _adapt(paths[i], leaves[i], rule, key)
  return jax.tree_util.tree_unflatten(treedef, new)


def unwrap(tree: Any) -> Any:
  """The original parameters: each adapted kernel replaced by its untouched ``w``.

  A base stored quantized (``Rule(quantize=...)``) is returned dequantized, in its original dtype.

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> params = {"kernel": jnp.ones((8, 8))}
    >>> delora_jax.unwrap(delora_jax.wrap(params, {"kernel": 2}))["kernel"] is params["kernel"]
    True
  """
  _tree.require_adapted(tree, "unwrap")
  return _tree.map_kernels(lambda _, k: _quant.array(k.w), tree)


def merge(tree: Any, *, safe: bool = False) -> Any:
  """Plain parameters with every adapted kernel replaced by ``w + ΔW``.

  Same structure, shapes and dtypes as the original ``params``; ``ΔW`` is cast
  to the base dtype before the addition (as PEFT's merge does). A base stored quantized
  (``Rule(quantize=...)``) is dequantized first: the result is a plain float kernel. Works under
  ``jit`` and ``grad`` (gradients reach ``a``, ``b``, ``lam`` only).

  Args:
    tree: an adapted tree from :func:`wrap`.
    safe: check that every merged kernel is finite and raise ``ValueError``
      naming the path if not (PEFT's ``safe_merge``). Needs concrete arrays,
      so it cannot be used inside ``jit``.

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2})
    >>> bool((delora_jax.merge(tree)["kernel"] == 1.0).all())  # b = 0 at init
    True
  """
  ks = _tree.require_adapted(tree, "merge")
  if safe:
    out = {p: _kernel.merged(k) for p, k in ks.items()}
    for p, m in out.items():
      try:
        finite = bool(jnp.isfinite(m).all())
        base_finite = finite or bool(jnp.isfinite(_quant.array(ks[p].w)).all())
      except jax.errors.ConcretizationTypeError:
        raise TypeError(
          "merge(..., safe=True) checks values and cannot run under jit; call it outside jit or use safe=False."
        ) from None
      if not base_finite:
        raise ValueError(
          f"{p}: the base kernel itself has NaN or inf entries (before any "
          "adapter is added); check the pretrained weights. Nothing was merged."
        )
      if not finite:
        raise ValueError(
          f"{p}: merged kernel has NaN or inf entries; the adapter is broken (check its a, b, lam). Nothing was merged."
        )
    return _tree.map_kernels(lambda p, _: out[p], tree)
  return _tree.map_kernels(lambda _, k: _kernel.merged(k), tree)


def delta(tree: Any) -> dict[str, jax.Array]:
  """``{path: ΔW}`` for every adapted kernel, in the kernel's shape (adapter dtype).

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2})
    >>> float(abs(delora_jax.delta(tree)["kernel"]).max())
    0.0
  """
  ks = _tree.require_adapted(tree, "delta", nnx_ok=True)
  return {p: _kernel.delta(k) for p, k in ks.items()}


def adapters(tree: Any) -> dict[str, dict[str, jax.Array]]:
  """``{path: {"a", "b", "lam", "w_norm"}}`` of every adapted kernel.

  Shapes (Flax orientation): ``a (*S, in, r)``, ``b (*S, r, out)``, ``lam (*S,)``,
  ``w_norm (*S, in)``, for a kernel with stacked axes ``S`` leading. A kernel whose
  stacked axes are elsewhere (``Rule(stack_axes=(1,))``) has them at the same
  positions in its adapters: ``a (in, L, r)``, ``b (r, L, out)``, ``lam (1, L)``,
  ``w_norm (in, L)`` for a kernel ``(in, L, out)``. Kernels made with ``init="paper"``
  also carry their frozen initial update as ``res_a``/``res_b`` (laid out as ``a``, ``b``).

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 6))}, {"kernel": 2})
    >>> sorted(delora_jax.adapters(tree)["kernel"])
    ['a', 'b', 'lam', 'w_norm']
  """
  ks = _tree.require_adapted(tree, "adapters", nnx_ok=True)
  out = {}
  for p, k in ks.items():
    fields = ADAPTER_FIELDS + (RESIDUAL_FIELDS if k.res_a is not None else ())
    out[p] = {f: getattr(k, f) for f in fields}
  return out


def with_adapters(tree: Any, adapters: Mapping[str, Mapping[str, Any]]) -> Any:
  """Returns ``tree`` with the adapter arrays replaced by ``adapters``.

  ``adapters`` has the form :func:`adapters` returns and must cover exactly
  the adapted paths, each with the same fields, shapes and dtypes. Nothing is
  changed if any of it does not fit (the caller's tree is never modified).

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 6))}, {"kernel": 2})
    >>> ad = delora_jax.adapters(tree)
    >>> ad["kernel"]["lam"] = ad["kernel"]["lam"] * 2
    >>> float(delora_jax.adapters(delora_jax.with_adapters(tree, ad))["kernel"]["lam"])
    30.0
  """
  ks = _tree.require_adapted(tree, "with_adapters")
  if not isinstance(adapters, Mapping):
    raise TypeError(f"`adapters` must be a dict {{path: {{field: array}}}}; got {type(adapters).__name__}.")
  unknown = [p for p in adapters if p not in ks]
  missing = [p for p in ks if p not in adapters]
  if unknown or missing:
    raise ValueError(
      f"`adapters` does not match the adapted kernels of `tree`: unknown paths "
      f"{_tree.sample_paths(unknown)}, missing paths {_tree.sample_paths(missing)}; "
      f"adapted paths are {_tree.sample_paths(list(ks))}. Use the paths "
      "`delora_jax.adapters(tree)` returns."
    )
  for p, k in ks.items():
    _check_fields(p, k, adapters[p])
  return _tree.map_kernels(lambda p, k: k.replace(**dict(adapters[p])), tree)


def _check_fields(path: str, k: DeloraKernel, given: Any) -> None:
  fields = ADAPTER_FIELDS + (RESIDUAL_FIELDS if k.res_a is not None else ())
  if not isinstance(given, Mapping) or set(given) != set(fields):
    got = sorted(given) if isinstance(given, Mapping) else type(given).__name__
    raise ValueError(f"adapters[{path!r}] must have exactly the fields {sorted(fields)}; got {got}.")
  for f in fields:
    want, got = getattr(k, f), given[f]
    if not _tree.is_array_like(got):
      raise TypeError(f"adapters[{path!r}][{f!r}] must be an array; got {type(got).__name__}.")
    if tuple(got.shape) != tuple(want.shape):
      raise ValueError(
        f"adapters[{path!r}][{f!r}] has shape {tuple(got.shape)}, expected "
        f"{tuple(want.shape)} (rank {k.rank}). Adapters saved for another rank or "
        "kernel shape cannot be put into this tree."
      )
    if np.dtype(got.dtype) != np.dtype(want.dtype):
      raise ValueError(
        f"adapters[{path!r}][{f!r}] has dtype {got.dtype}, expected {want.dtype}. "
        f"Cast it first, e.g. x.astype('{want.dtype}')."
      )
