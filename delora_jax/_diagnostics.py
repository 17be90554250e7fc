"""`diagnostics`: how much of its bound each adapted kernel uses, from the factors alone.

For ``ΔW = U V`` with ``U (in, k)``, ``V (k, out)``:
``||ΔW||_F^2 = trace((UᵀU)(V Vᵀ)) = sum((UᵀU) * (V Vᵀ))``, two ``k x k`` Gram matrices,
so each figure costs ``O((in + out) k^2)`` and no ``(in, out)`` array is ever formed.
``||W||_F^2 = sum(w_norm^2)`` (the stored row norms), so the base kernel is not read either.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from delora_jax import _kernel, _tree

METRICS = ("lam", "update_norm", "relative_update", "bound_use")


def _frob(u: jax.Array, v: jax.Array) -> jax.Array:
  """``||u @ v||_F`` for ``u (*S, in, k)``, ``v (*S, k, out)`` via ``k x k`` Gram matrices."""
  hi = lax.Precision.HIGHEST
  gu = jnp.einsum("...ik,...il->...kl", u, u, precision=hi)
  gv = jnp.einsum("...ko,...lo->...kl", v, v, precision=hi)
  return jnp.sqrt(jnp.maximum(jnp.sum(gu * gv, axis=(-2, -1)), 0.0))


def kernel_figures(k: _kernel.DeloraKernel) -> dict[str, jax.Array]:
  """The four figures of one adapted kernel, each of its stacked shape (``()`` if not stacked;
  the stacked axes in position order wherever the kernel stores them)."""
  c = _kernel.canonical(k)  # stacked axes first
  a, b, lam = c["a"].astype(jnp.float32), c["b"].astype(jnp.float32), c["lam"].astype(jnp.float32)
  w_norm = lax.stop_gradient(c["w_norm"]).astype(jnp.float32)
  na, nb = _kernel.normalised(a, b, lam)  # diag(1/w_norm) ΔW = na @ nb (trained part)
  u, v = w_norm[..., :, None] * na, nb
  if c["res_a"] is not None:  # the paper init's frozen residual is part of the update
    u = jnp.concatenate([u, -w_norm[..., :, None] * c["res_a"].astype(jnp.float32)], axis=-1)
    v = jnp.concatenate([v, c["res_b"].astype(jnp.float32)], axis=-2)
  update = _frob(u, v)
  base = jnp.sqrt(jnp.sum(w_norm * w_norm, axis=-1))
  return {
    "lam": lam,
    "update_norm": update,
    "relative_update": update / jnp.maximum(base, jnp.finfo(jnp.float32).tiny),
    "bound_use": _frob(na, nb) / jnp.maximum(jnp.abs(lam), jnp.finfo(jnp.float32).tiny),
  }


def diagnostics(tree: Any) -> dict[str, dict]:
  """Per-kernel figures of DeLoRA's bound, cheap enough to log inside a train step.

  For every adapted kernel, arrays of its stacked shape (``()`` when not stacked):

  - ``lam``: the current bound λ.
  - ``update_norm``: ``||ΔW||_F``, how far the kernel has moved from the pretrained one.
  - ``relative_update``: ``||ΔW||_F / ||W||_F``.
  - ``bound_use``: ``||diag(1/w_norm) ΔW||_F / |λ|``, in ``[0, 1]`` by construction (1: the
    update's rank-one directions are aligned and the bound is saturated). With
    ``init="paper"`` it measures the trained part ``a, b, λ``; the frozen initial update
    it starts from is left out (it is in ``update_norm``).

  ``summary`` holds ``{"min", "mean", "max"}`` of each figure over all adapted layers
  (stacked slices counted one by one; the slices a ``Rule(slices=...)`` leaves out are not).
  Everything is computed from the factors, never forming ``ΔW`` (``O((in + out) r²)`` per
  kernel); ``jit``-able, also on sharded trees.

  Args:
    tree: an adapted tree (:func:`delora_jax.wrap`, or a ``combine``-d one), or an adapted
      NNX model (:func:`delora_jax.nnx.wrap`).

  Returns:
    ``{"kernels": {path: {figure: array}}, "summary": {figure: {"min", "mean", "max"}}}``.

  Example:
    >>> import jax, jax.numpy as jnp, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jax.random.normal(jax.random.key(0), (16, 8))},
    ...                        {"kernel": delora_jax.Rule(4, lam=2.0, init="random")})
    >>> d = delora_jax.diagnostics(tree)
    >>> sorted(d["kernels"]["kernel"])
    ['bound_use', 'lam', 'relative_update', 'update_norm']
    >>> 0.0 < float(d["summary"]["bound_use"]["max"]) <= 1.0
    True
  """
  ks = _tree.require_adapted(tree, "diagnostics", nnx_ok=True)
  kernels = {p: kernel_figures(k) for p, k in ks.items()}
  live = jnp.concatenate([jnp.ravel(_adapted(k)) for k in ks.values()])
  live = live | ~jnp.any(live)  # only stacked slices with λ = 0 and zero base rows: count them all
  summary = {}
  for m in METRICS:
    flat = jnp.concatenate([jnp.ravel(f[m]) for f in kernels.values()])
    summary[m] = {
      "min": jnp.min(jnp.where(live, flat, jnp.inf)),
      "mean": jnp.sum(jnp.where(live, flat, 0.0)) / jnp.sum(live),
      "max": jnp.max(jnp.where(live, flat, -jnp.inf)),
    }
  return {"kernels": kernels, "summary": summary}


def _adapted(k: _kernel.DeloraKernel) -> jax.Array:
  """Bool of the kernel's stacked shape: the slices ``Rule(slices=...)`` adapts. A slice left out
  holds ``λ = 0`` and ``w_norm = 0``; an adapted one has a non-zero λ or base row."""
  c = _kernel.canonical(k)
  if c["lam"].ndim == 0:  # not stacked: adapted, whatever its values
    return jnp.ones((), bool)
  return (c["lam"] != 0) | jnp.any(c["w_norm"] != 0, axis=-1)
