"""`to_lora`: a DeLoRA update as plain LoRA factors; base-kernel checks shared by the loaders."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from delora_jax import _kernel, _quant, _tree
from delora_jax._kernel import DeloraKernel


def to_lora(tree: Any) -> dict[str, dict[str, jax.Array]]:
  """The same weight updates as plain LoRA factors, ``ΔW = lora_a @ lora_b``.

  For every adapted kernel, ``lora_a = diag(w_norm) @ a @ diag(s)`` and
  ``lora_b = b`` with ``s[k] = λ / r / (max(|a_k|, 1e-4) max(|b_k|, 1e-4))``:
  rank ``r``, no SVD, and ``lora_a @ lora_b`` is exactly the ``ΔW``
  :func:`delora_jax.merge` adds (same factors, same product). Shapes are in
  the kernel's matrix view (inputs flattened, then outputs): ``lora_a (*S, in, r)``,
  ``lora_b (*S, r, out)``, adapter dtype, stacked axes ``S`` first (also for a
  kernel that stores them elsewhere). Kernels made with ``init="paper"``
  give rank ``2r`` factors (the frozen initial update is subtracted exactly).
  Use the result with any LoRA implementation whose update is
  ``x @ lora_a @ lora_b`` (scaling 1); :func:`delora_jax.peft.export_lora`
  writes it as a PEFT LoRA adapter.

  Args:
    tree: an adapted tree from :func:`delora_jax.wrap`, or an NNX model from
      :func:`delora_jax.nnx.wrap` (paths are its state paths).

  Returns:
    ``{path: {"lora_a": array, "lora_b": array}}`` for every adapted kernel.

  Example:
    >>> import jax, jax.numpy as jnp, delora_jax
    >>> w = jax.random.normal(jax.random.key(0), (16, 8))
    >>> tree = delora_jax.wrap({"kernel": w}, {"kernel": delora_jax.Rule(2, init="random")})
    >>> f = delora_jax.to_lora(tree)["kernel"]
    >>> f["lora_a"].shape, f["lora_b"].shape
    ((16, 2), (2, 8))
    >>> d = jnp.matmul(f["lora_a"], f["lora_b"], precision="highest")
    >>> bool(jnp.all(d == delora_jax.delta(tree)["kernel"]))
    True
  """
  ks = _tree.require_adapted(tree, "to_lora", nnx_ok=True)
  out = {}
  for path, k in ks.items():
    u, v = _kernel.factors(k)
    out[path] = {"lora_a": u, "lora_b": v}
  return out


def norm_tolerance(dtype: Any) -> float:
  """Relative tolerance for comparing stored and recomputed ``w_norm``."""
  return max(1e-3, 4.0 * float(jnp.finfo(dtype).eps))


def _mismatch(w, stored, *, in_axes, out_axes, stack, rtol):
  """(entries out of tolerance, max relative difference) of stored vs recomputed w_norm."""
  return _differ(_kernel.in_norms(w, in_axes, out_axes, stack), stored, stack=stack, rtol=rtol)


def _differ(want, stored, *, stack, rtol):
  """:func:`_mismatch` against the norms ``want`` (``(*S, in)``)."""
  got = _kernel.lead(stored, stack, "w_norm").astype(jnp.float32)
  atol = 1e-6 * jnp.max(jnp.abs(want), initial=0.0)
  err = jnp.abs(got - want)
  n_bad = jnp.sum(~(err <= atol + rtol * jnp.abs(want)))  # NaN anywhere is a mismatch
  rel = jnp.max(err / jnp.maximum(jnp.abs(want), jnp.maximum(atol, 1e-30)), initial=0.0)
  return n_bad, rel


@functools.lru_cache(maxsize=256)
def _mismatch_fn(in_axes, out_axes, stack, rtol: float, out_shardings):
  """The compiled comparison, one per layout (not one per kernel and call)."""
  return jax.jit(
    functools.partial(_mismatch, in_axes=in_axes, out_axes=out_axes, stack=stack, rtol=rtol),
    out_shardings=out_shardings,
  )


def check_base_norms(path: str, k: DeloraKernel, stored: Any, source: str, kept_in: Any = None) -> None:
  """Raises ``ValueError`` if ``stored`` w_norm does not belong to ``k``'s base kernel.

  ``stored`` is compared with the norms recomputed from ``k.w`` (rtol 1e-3, or
  a few ulps of the stored dtype if coarser, or one ulp of a low-precision base
  kernel's dtype, in which PEFT computes the norm, or of ``kept_in``, the dtype
  the stored values were rounded to; atol 1e-6 of the largest norm). NaN is a mismatch.
  The comparison runs in one jit whose two scalar results are replicated, so
  kernels sharded over devices of several processes are checked in place and
  every process reads the same verdict.
  """
  stacks, ins, _ = _kernel.positions(k)
  want_shape = (*(k.w.shape[p] for p in stacks), math.prod(k.w.shape[i] for i in ins))
  if k.stack:  # stored as the adapters are: stacked axes where the kernel has them
    flat = jax.ShapeDtypeStruct(want_shape, jnp.float32)
    want_shape = tuple(jax.eval_shape(lambda x: _kernel.place(x, k.stack, "w_norm"), flat).shape)
  if tuple(stored.shape) != want_shape:
    raise ValueError(
      f"{path}: {source} has w_norm of shape {tuple(stored.shape)}, expected "
      f"{want_shape} for the base kernel of shape {tuple(k.w.shape)}."
    )
  # A norm rounded to bf16/fp16 (PEFT's on such a base, or low-precision adapters' `kept_in`) is off by <= eps/2.
  rtol = max(norm_tolerance(stored.dtype), *(float(jnp.finfo(d).eps) for d in (k.w.dtype, kept_in) if d is not None))
  sh = getattr(k.w, "sharding", None)
  out = None
  if isinstance(sh, NamedSharding):
    replicated = NamedSharding(sh.mesh, PartitionSpec())
    out = (replicated, replicated)
  if _quant.is_quantized(k.w):  # the tree's w_norm is the full-precision kernel's (wrap took it before quantizing)
    want = _kernel.lead(k.w_norm, k.stack, "w_norm").astype(jnp.float32)
    n_bad, rel = jax.jit(functools.partial(_differ, stack=k.stack, rtol=rtol))(want, stored)
  else:
    n_bad, rel = _mismatch_fn(k.in_axes, k.out_axes, k.stack, rtol, out)(k.w, stored)
  n_bad, rel = int(n_bad), float(rel)
  if n_bad:
    raise ValueError(
      f"{path}: the base kernel differs from the one {source} was made for: its stored "
      f"w_norm (input-row norms of the base kernel) differs from the norms of this tree's "
      f"kernel in {n_bad} of {math.prod(want_shape)} entries (max relative difference {rel:.3g}, "
      f"tolerance {rtol:g}). Load the adapters into the same pretrained weights they were "
      "trained on (pass check_base=False only if you know the bases match)."
    )


@functools.lru_cache(maxsize=16)
def _nonfinite_fn(out_shardings):
  return jax.jit(lambda xs: {f: jnp.sum(~jnp.isfinite(x)) for f, x in xs.items()}, out_shardings=out_shardings)


def check_finite(path: str, fields: dict[str, Any], source: str) -> None:
  """Raises ``ValueError`` naming the field if an adapter array read from ``source`` holds NaN or inf.

  Counted in one jit with replicated results, like :func:`check_base_norms`.
  """
  sh = getattr(next(iter(fields.values())), "sharding", None)
  out = NamedSharding(sh.mesh, PartitionSpec()) if isinstance(sh, NamedSharding) else None
  for f, n in _nonfinite_fn(out)(fields).items():
    if int(n):
      raise ValueError(
        f"{path}: `{f}` in {source} has {int(n)} NaN or inf entries of {math.prod(fields[f].shape)}: the "
        "adapters had diverged when they were saved, or the file was altered. Load an earlier checkpoint."
      )
