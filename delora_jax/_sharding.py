"""`shardings`: the adapters' shardings, derived from the base parameters' shardings.

An adapter follows its kernel: ``a (*S, in, r)`` is split along the input axes
as ``w`` is, ``b (*S, r, out)`` along the output axes, ``w_norm (*S, in)`` like
the input axes, ``lam (*S,)`` only along stacked axes (each stacked axis of an
adapter as the kernel's, wherever it sits); the rank axis is never split. So the
factorised branch ``((x * w_norm) @ a * s) @ b`` runs where the base matmul runs
and no full frozen kernel is ever gathered for it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from delora_jax import _kernel, _tree
from delora_jax._kernel import DeloraKernel, is_kernel
from delora_jax._quant import QArray

_SPEC_TYPES = (NamedSharding, PartitionSpec, SingleDeviceSharding)


def _mesh_axes(entry: Any) -> tuple[str, ...]:
  """The mesh axes one PartitionSpec entry splits an array axis over."""
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _as_entry(axes: tuple[str, ...]) -> Any:
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _contiguous(shape: Sequence[int], counts: Sequence[int]) -> bool:
  """Whether every device's block of these axes is one contiguous run once flattened.

  True when all axes before the first one with more than one element per
  device are split down to single elements, and all axes after it are whole.
  Then the flattened axis split over the mesh axes of all of them (in order)
  gives each device exactly the entries it held before.
  """
  split = [n // c for n, c in zip(shape, counts)]
  first = next((i for i, s in enumerate(split) if s > 1), len(split))
  return all(c == 1 for c in counts[first + 1 :])


def _flat_entry(shape, axes, entries, sizes) -> Any:
  """The spec entry of the flattening of kernel axes ``axes`` (in this order)."""
  split = [(ax, _mesh_axes(entries[ax])) for ax in axes if _mesh_axes(entries[ax])]
  if len(split) <= 1:
    return _as_entry(split[0][1]) if split else None
  if sizes is None:
    return _as_entry(split[0][1])
  counts = {ax: math.prod(sizes[m] for m in ms) for ax, ms in split}
  if _contiguous([shape[ax] for ax in axes], [counts.get(ax, 1) for ax in axes]):
    return _as_entry(tuple(m for _, ms in split for m in ms))
  # The first input axis that is really split (mesh axes of size 1 split nothing).
  return _as_entry(next((ms for ax, ms in split if counts[ax] > 1), split[0][1]))


def _padded(path: str, spec: PartitionSpec, shape: tuple[int, ...], sizes) -> list[Any]:
  """``spec`` as one entry per axis; checks its length, mesh axes and divisibility."""
  entries = list(spec)
  if len(entries) > len(shape):
    raise ValueError(
      f"{path}: PartitionSpec {spec} has {len(entries)} entries but the parameter has shape "
      f"{tuple(shape)} ({len(shape)} axes). Give at most one entry per axis."
    )
  entries += [None] * (len(shape) - len(entries))
  seen: list[str] = []
  for ax, entry in enumerate(entries):
    for m in _mesh_axes(entry):
      if m in seen:
        raise ValueError(
          f"{path}: PartitionSpec {spec} uses mesh axis {m!r} twice; each mesh axis may split at most one array axis."
        )
      seen.append(m)
      if sizes is not None and m not in sizes:
        raise ValueError(
          f"{path}: PartitionSpec {spec} names mesh axis {m!r}, but the mesh has "
          f"axes {tuple(sizes)}. Use one of those names."
        )
    if sizes is not None:
      count = math.prod(sizes[m] for m in _mesh_axes(entry))
      if shape[ax] % count:
        raise ValueError(
          f"{path}: mesh axes {_mesh_axes(entry)} (size {count}) do not divide axis {ax} "
          f"(size {shape[ax]}) of shape {tuple(shape)} (PartitionSpec {spec}). Leave that "
          "axis unsplit (None) or use mesh axes whose size divides it."
        )
  return entries


def _or_other(own: Any, other: Any, n: int, sizes: dict[str, int] | None) -> Any:
  """``own``, or, where it splits nothing (unsplit, or only over mesh axes of size 1), ``other``
  if that splits ``n`` evenly (mesh sizes known)."""
  if sizes is None or other is None or (own is not None and math.prod(sizes[m] for m in _mesh_axes(own)) > 1):
    return own
  count = math.prod(sizes[m] for m in _mesh_axes(other))
  return other if count > 1 and n % count == 0 else own


def _placed(stack: tuple[int, ...], stack_entries: list, own: list) -> PartitionSpec:
  """The spec of an adapter array whose stacked axes sit at positions ``stack`` (see
  ``_kernel.place``): stacked entries there, its own axes' entries in the other positions
  in order, padding axes unsplit."""
  if not stack:
    return PartitionSpec(*stack_entries, *own)
  n = max(len(stack) + len(own), stack[-1] + 1)
  out: list[Any] = [None] * n
  for p, e in zip(stack, stack_entries):
    out[p] = e
  for i, e in zip([i for i in range(n) if i not in stack], own):
    out[i] = e
  return PartitionSpec(*out)


def kernel_specs(
  path: str,
  shape: tuple[int, ...],
  spec: PartitionSpec,
  in_axes,
  out_axes,
  sizes: dict[str, int] | None,
  stack: tuple[int, ...] = (),
) -> dict[str, PartitionSpec]:
  """PartitionSpecs of a DeLoRA node's fields, from the kernel's ``spec``.

  ``sizes`` maps mesh axis names to sizes (``None`` if unknown: then no
  divisibility check, several split input axes use the first one's, and a
  factor whose side of ``w`` is unsplit stays replicated). ``stack``: the
  positions of stacked axes that are not leading (``DeloraKernel.stack``).
  """
  entries = _padded(path, spec, tuple(shape), sizes)
  stacks, ins, outs = _kernel.layout_positions(stack, in_axes, out_axes, len(shape))
  st = [entries[p] for p in stacks]
  e_in = _flat_entry(shape, list(ins), entries, sizes)
  e_out = _flat_entry(shape, list(outs), entries, sizes)
  n_in = math.prod(shape[a] for a in ins)
  n_out = math.prod(shape[a] for a in outs)
  # A factor whose own axis is not split would be replicated on every device that holds a
  # shard of w (with its gradient and optimizer moments): e.g. b under FSDP, where w is
  # split along its input axis only. Where w is split over every mesh axis (FSDP), the batch
  # is split over them too and w is gathered for the matmul: the factor takes the other
  # side's mesh axes, and is gathered with it (factor-sized moves). Where w is replicated over
  # a mesh axis (data parallel beside tensor parallel), its own axes hold the activations'
  # features: a factor split there adds activation-sized collectives, so it stays replicated.
  split = {m for e in entries for m in _mesh_axes(e)}
  if sizes is not None and all(m in split for m, n in sizes.items() if n > 1):
    e_in, e_out = _or_other(e_in, e_out, n_in, sizes), _or_other(e_out, e_in, n_out, sizes)
  st_pos = tuple(stack) if stack else ()
  a, b = _placed(st_pos, st, [e_in, None]), _placed(st_pos, st, [None, e_out])
  return {"a": a, "b": b, "lam": _placed(st_pos, st, []), "w_norm": _placed(st_pos, st, [e_in]), "res_a": a, "res_b": b}


def scale_spec(spec: PartitionSpec, shape: tuple[int, ...], scale_shape: tuple[int, ...], sizes) -> PartitionSpec:
  """The PartitionSpec of a quantized kernel's scale (``_quant.QArray``: ``shape`` is the kernel's,
  ``scale_shape`` its scale's, of the same rank), from the kernel's ``spec``: an axis the scale
  holds whole is split as the kernel's, an axis of size 1 (per output channel) is unsplit, and a
  tiled axis (``n // tile`` entries) is split as the kernel's where the mesh sizes are known and
  divide it (each device then holds the scales of its own tiles), else unsplit."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for e, n, m in zip(entries, shape, scale_shape):
    count = math.prod(sizes[a] for a in _mesh_axes(e)) if sizes is not None else None
    out.append(e if m == n or (m > 1 and count is not None and m % count == 0) else None)
  return PartitionSpec(*out)


def _mesh_sizes(mesh: Any) -> dict[str, int] | None:
  if mesh is None or mesh.empty:
    return None
  return dict(mesh.shape)


def _resolve(path: str, given: Any, mesh: Any):
  """``(spec, sizes, make)`` of one given sharding; ``make(spec)`` builds the output."""
  if isinstance(given, NamedSharding):
    return given.spec, _mesh_sizes(given.mesh), (lambda s: NamedSharding(given.mesh, s, memory_kind=given.memory_kind))
  if isinstance(given, PartitionSpec):
    if mesh is not None:
      return given, _mesh_sizes(mesh), lambda s: NamedSharding(mesh, s)
    return given, _mesh_sizes(jax.sharding.get_abstract_mesh()), lambda s: s
  if isinstance(given, SingleDeviceSharding):
    return PartitionSpec(), None, lambda s: given
  raise TypeError(
    f"{path}: `base_shardings` leaf is a {type(given).__name__}; expected a "
    "jax.sharding.NamedSharding, PartitionSpec or SingleDeviceSharding (PartitionSpec() "
    "for a replicated parameter)."
  )


def _node(path: str, k: DeloraKernel, given: Any, mesh: Any) -> DeloraKernel:
  spec, sizes, make = _resolve(path, given, mesh)
  specs = kernel_specs(path, tuple(k.w.shape), spec, k.in_axes, k.out_axes, sizes, k.stack)
  fields = {f: (None if getattr(k, f) is None else make(s)) for f, s in specs.items()}
  w = given if not isinstance(given, PartitionSpec) else make(given)
  if isinstance(k.w, QArray):  # values as the kernel, the scale by `scale_spec`
    scale = make(scale_spec(spec, tuple(k.w.shape), tuple(k.w.scale.shape), sizes))
    w = dataclasses.replace(k.w, values=w, scale=scale)
  return k.replace(w=w, **fields)


def _plain(path: str, x: Any, given: Any, mesh: Any) -> Any:
  spec, sizes, make = _resolve(path, given, mesh)
  if _tree.is_array_like(x):
    _padded(path, spec, tuple(x.shape), sizes)
  return given if not isinstance(given, PartitionSpec) else make(given)


def _check_structure(paths: list[str], base_paths: list[str]) -> None:
  if paths == base_paths:
    return
  missing = [p for p in paths if p not in base_paths]
  extra = [p for p in base_paths if p not in paths]
  first = next(
    (f"{a!r} vs {b!r}" for a, b in zip(paths, base_paths) if a != b), f"{len(paths)} vs {len(base_paths)} leaves"
  )
  raise ValueError(
    "`base_shardings` must have the structure of the original (unwrapped) params: "
    f"missing paths {_tree.sample_paths(missing)}, unexpected paths "
    f"{_tree.sample_paths(extra)} (first difference: {first}). Build it from the params "
    "before `wrap`, e.g. jax.tree.map(lambda x: x.sharding, params), or from "
    "`delora_jax.unwrap(tree)`."
  )


def _carried(tree: Any) -> Any:
  """The shardings the unwrapped leaves of ``tree`` carry (arrays, abstract ``ShapeDtypeStruct``s)."""

  def one(path: str, x: Any) -> Any:
    sh = getattr(x, "sharding", None)
    if isinstance(sh, _SPEC_TYPES):
      return sh
    what = type(x).__name__ if sh is None else f"{type(x).__name__} with a {type(sh).__name__}"
    raise ValueError(
      f"{path}: `base_shardings` was not given, so every parameter must carry its own "
      f"sharding, but this one is a {what} and has none. Build abstract params as "
      "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)) (before `wrap`), "
      "or pass `base_shardings`."
    )

  return _tree.map_leaves(one, _tree.map_kernels(lambda _, k: k.w.values if isinstance(k.w, QArray) else k.w, tree))


def shardings(tree: Any, base_shardings: Any = None, *, mesh: Mesh | AbstractMesh | None = None) -> Any:
  """Shardings for an adapted tree, derived from those of the original params.

  ``base_shardings`` has the structure of the params before :func:`wrap`
  (leaves ``NamedSharding``, ``PartitionSpec`` or ``SingleDeviceSharding``).
  Left out, it is read from the tree itself: each kernel's ``w`` and each
  plain leaf must then carry a sharding (``jax.Array``s, or abstract
  ``jax.ShapeDtypeStruct(..., sharding=...)`` params wrapped by :func:`wrap`).
  The result has the structure of ``tree``: plain leaves and each kernel's
  ``w`` keep their sharding; ``a (*S, in, r)`` and ``w_norm (*S, in)`` are
  split along the input axes as ``w`` is, ``b (*S, r, out)`` along the output
  axes, ``lam (*S,)`` only along stacked axes as ``w``; the rank axis is
  never split. Where ``w`` is split along one side only and over every mesh
  axis of size > 1 (FSDP), the factor of the other side is split over the
  same mesh axes (if their size divides it), so no factor and no optimizer
  moment is replicated over devices that share out ``w``; this needs the mesh
  sizes. Where ``w`` is replicated over a mesh axis (tensor parallelism beside
  data parallelism), each factor follows its own side only: its input is
  replicated over ``w``'s mesh axes there, and a factor split over them would
  cost activation-sized collectives.
  A base stored quantized (``Rule(quantize=...)``) gets its values split as
  the kernel and its scale by the same rule on the axes it shares with the
  kernel; the scale's per-channel input axes (size 1) are unsplit, and its
  tiled axis (``n // tile_size`` entries) is split as the kernel's input axis
  where the mesh size divides it (mesh sizes known), else unsplit. An abstract
  :func:`wrap` gives its ``ShapeDtypeStruct`` values and scales the same.
  Use it for ``jax.device_put``, ``jax.jit(in_shardings=..., out_shardings=...)``
  and, through :func:`split`, for the trainable half.

  N-D kernels: the input axes are flattened into one (``in_axes`` order). If
  one of them is split, its mesh axes are used. If several are, their mesh
  axes are combined (``PartitionSpec(("x", "y"))``) when each device's block
  stays one contiguous run after flattening (every axis before the first one
  with more than one entry per device is split to single entries, every axis
  after it is whole); otherwise the mesh axes of the first input axis that is
  really split (total mesh size > 1) are used and the others replicate. The
  same holds for the output axes.

  Args:
    tree: an adapted tree from :func:`wrap` (arrays, or ``jax.ShapeDtypeStruct``
      from ``jax.eval_shape``).
    base_shardings: shardings or PartitionSpecs of the original params;
      ``None``: those the leaves of ``tree`` carry.
    mesh: with PartitionSpec leaves, return ``NamedSharding(mesh, spec)``.
      Without it PartitionSpecs are returned; mesh sizes (for checks and the
      rule above) then come from ``jax.set_mesh`` if one is active.

  Raises:
    ValueError: ``base_shardings`` is left out and a leaf carries no
      sharding, ``base_shardings`` does not match the params, a PartitionSpec
      is longer than its array, names an unknown mesh axis or one twice, or
      splits an axis over mesh axes whose size does not divide it (the path is
      named).
    TypeError: a leaf of ``base_shardings`` is not a sharding or spec.

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}
    >>> tree = delora_jax.wrap(params, {"kernel": 2})
    >>> sh = delora_jax.shardings(tree, {"kernel": P("data", "model"), "bias": P("model")})
    >>> k = sh["kernel"]  # a: (in, r), b: (r, out), w_norm: (in,), lam: ()
    >>> (k.a, k.b, k.w_norm, k.lam) == (P("data", None), P(None, "model"), P("data"), P())
    True

    Abstract params that carry their shardings need no ``base_shardings``:

    >>> import jax
    >>> from jax.sharding import Mesh, NamedSharding
    >>> mesh = Mesh(jax.devices()[:1], ("data",))
    >>> abstract = {"kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32,
    ...                                            sharding=NamedSharding(mesh, P("data")))}
    >>> delora_jax.shardings(delora_jax.wrap(abstract, {"kernel": 2}))["kernel"].a.spec == P("data", None)
    True
  """
  _tree.require_adapted(tree, "shardings")
  if base_shardings is None:
    base_shardings = _carried(tree)
  if mesh is not None and not isinstance(mesh, (Mesh, AbstractMesh)):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
  paths, leaves, treedef = _tree.flatten(tree)
  base_leaves, _ = jax.tree_util.tree_flatten_with_path(
    base_shardings, is_leaf=lambda x: x is None or isinstance(x, _SPEC_TYPES)
  )
  base_paths = [_tree.path_str(p) for p, _ in base_leaves]
  _check_structure(paths, base_paths)
  out = []
  for path, x, (_, given) in zip(paths, leaves, base_leaves):
    out.append(_node(path, x, given, mesh) if is_kernel(x) else _plain(path, x, given, mesh))
  return jax.tree_util.tree_unflatten(treedef, out)
