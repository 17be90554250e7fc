"""DeLoRA for Flax NNX models: adapt a module in place of its kernels, train the adapters.

``delora_jax.nnx.wrap(model, rules)`` returns a new model of the same structure
whose adapted layers compute their call factorised (no ``w + ΔW``, no dense
kernel gradient), for ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``,
``nnx.Conv`` and any custom module whose ``__call__`` contracts its kernel
(``jnp.einsum``, ``jnp.dot``, ``@``, ``lax.dot_general``,
``lax.conv_general_dilated``), as tunix's ``Einsum`` does. The trainable
factors are :class:`DeloraParam` (an ``nnx.LoRAParam``), so
``nnx.Optimizer(adapted, delora_jax.optimizer(optax.adamw, ...), wrt=DeloraParam)``
or tunix's ``PeftTrainer`` trains only them.

Example:
  >>> import jax.numpy as jnp, optax, delora_jax
  >>> from flax import nnx
  >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  >>> adapted = delora_jax.nnx.wrap(model, {"kernel": 2})
  >>> sorted(delora_jax.adapters(adapted)["kernel"])
  ['a', 'b', 'lam', 'w_norm']
  >>> bool(jnp.allclose(adapted(jnp.ones((1, 8))), model(jnp.ones((1, 8)))))  # b = 0 at init
  True
  >>> opt = nnx.Optimizer(adapted, delora_jax.optimizer(optax.adamw, learning_rate=1e-3),
  ...                     wrt=delora_jax.nnx.DeloraParam)
  >>> plain = delora_jax.nnx.merge(adapted)  # an nnx.Linear again, kernel w + ΔW
  >>> type(plain).__name__
  'Linear'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from delora_jax import _nnx, _prequant, _quant, _tree
from delora_jax._nnx import DeloraConst as DeloraConst
from delora_jax._nnx import DeloraParam as DeloraParam
from delora_jax._rule import Rule

__all__ = ["DeloraConst", "DeloraParam", "merge", "unwrap", "wrap"]


def _require_module(model: Any, fn: str) -> None:
  if not isinstance(model, nnx.Module):
    hint = ""
    if _tree.kernels(model) if _is_tree(model) else False:
      hint = " This looks like a Linen parameter tree adapted by delora_jax.wrap; use delora_jax.apply."
    raise TypeError(f"delora_jax.nnx.{fn}: `model` must be a flax.nnx.Module; got {type(model).__name__}.{hint}")


def _is_tree(x: Any) -> bool:
  try:
    _tree.flatten(x)
    return True
  except Exception:  # noqa: BLE001 (anything that is not a pytree)
    return False


def _require_adapted(model: Any, fn: str) -> None:
  _require_module(model, fn)
  if not _nnx.kernels(model):
    raise ValueError(
      f"delora_jax.nnx.{fn}: `model` holds no DeLoRA adapter; call delora_jax.nnx.wrap(model, rules) first."
    )


def wrap(
  model: nnx.Module,
  rules: Mapping[Any, Rule | int],
  *,
  key: jax.Array | None = None,
  like: Any = None,
  rngs: nnx.Rngs | None = None,
  strict: bool = False,
) -> nnx.Module:
  """A copy of ``model`` with DeLoRA adapters on the kernels ``rules`` select.

  Paths, rules and keys are those of ``delora_jax.wrap(nnx.state(model), rules,
  key=key)`` (``re.fullmatch`` on ``/``-joined state paths such as
  ``layers/0/attn/q_proj/w``), so both give identical adapters. ``model`` is
  not modified, not even through shared Variables. Each adapted module keeps
  its class behaviour and attributes (it is an instance of a subclass of its
  class); its adapter lives beside the kernel as ``<kernel name>_delora``
  (``a``, ``b``, ``lam``: :class:`DeloraParam`; ``w_norm``: :class:`DeloraConst`).
  A kernel Variable held by several modules (tied weights) is selected by its
  state path and gives each of them the same adapter; a holder that contracts
  it over other axes than the layout's (a transposed decoder) gets ``w + ΔW``
  there, reported as a fallback. A call may write state (caches, batch
  statistics, ``sow``, ``nnx.Rngs`` draws): the Variables it writes are set as
  in a plain call.

  Args:
    model: an ``nnx.Module``.
    rules: ``{regex: Rule | int}`` as for :func:`delora_jax.wrap`; keys may be
      :class:`delora_jax.Modules` ``(regex)`` to select modules by path as qwix does
      (``{delora_jax.Modules(".*q_proj|.*down_proj"): 16}``).
    key: PRNG key of the adapters' initialisation (default ``jax.random.key(0)``).
    like: example inputs of one call: a tuple for ``model(*like)``, a dict for
      ``model(**like)`` (as tunix's ``model.get_model_input()`` returns), or a function
      ``like(model)`` that calls it; used to infer the layout of every selected kernel whose
      Rule leaves ``in_axes``/``out_axes`` out, and to check the declared ones against the
      model's contractions.
    rngs: ``nnx.Rngs`` with a ``dropout`` stream; needed when a Rule has ``dropout > 0``
      (PEFT's ``module_dropout``). ``adapted.eval()`` turns adapter dropout off.
    strict: raise ``TypeError`` when an adapted kernel is used where it cannot be
      computed factorised, instead of merging it (and warning ``FallbackWarning``).

  Returns:
    The adapted model.
  """
  _require_module(model, "wrap")
  _prequant.check_model(model, "delora_jax.nnx.wrap")
  if _nnx.kernels(model):
    raise ValueError(
      "delora_jax.nnx.wrap: `model` is already adapted (it holds DeLoRA "
      "adapters); wrapping twice would stack them. Call "
      "delora_jax.nnx.unwrap(model) or delora_jax.nnx.merge(model) first."
    )
  from delora_jax import _wrap  # noqa: PLC0415 (import cycle)

  state = nnx.state(model)
  probe = None if like is None else (lambda paths: _nnx.probe(model, like, paths))
  tree = _wrap.wrap_with(state, rules, key=key, probe=probe)
  ks = _tree.kernels(tree)
  new = _nnx.copy(model)
  mods = _nnx.modules(new)
  found = {}
  for path, k in ks.items():
    prefix, _, name = path.rpartition("/")
    owner = mods.get(prefix)
    if owner is None or not isinstance(vars(owner).get(name), nnx.Variable):
      raise TypeError(
        f"{path}: this kernel is not a Variable attribute of an nnx.Module (it is held by "
        f"{type(owner).__name__ if owner is not None else 'a container'}), so the NNX path "
        "cannot adapt the layer that uses it. Select kernels that are attributes of modules "
        "(e.g. 'layers/0/attn/q_proj/w'), or narrow the rules."
      )
    if k.dropout > 0.0 and rngs is None:
      raise ValueError(
        f"{path}: its Rule has dropout={k.dropout}, which needs random keys; "
        "pass rngs=nnx.Rngs(dropout=0) to delora_jax.nnx.wrap."
      )
    found[path] = vars(owner)[name]
    if _quant.is_quantized(k.w):  # Rule(quantize=...): the Variable holds the quantized base from now on
      found[path].set_value(k.w)
  # Every module holding the kernel's Variable gets the same adapter (tied weights: one adapter,
  # used by each of them).
  owners: dict[int, tuple[nnx.Module, dict[str, _nnx.Adapter]]] = {}
  where = {id(m): p for p, m in mods.items()}
  for path, held in _nnx.holders(new, found).items():
    adapter = _nnx.Adapter(ks[path], path, rngs, strict)
    adapter.tied = len(held) > 1  # a holder may contract it otherwise (transposed): merged there
    for owner, name in held:
      if not callable(owner):
        at = "/".join(p for p in (where[id(owner)], name) if p)
        raise TypeError(
          f"{path}: this kernel is held by a {type(owner).__name__} (at {at!r}), which has no "
          "__call__ to adapt. Adapt kernels held by layers, or leave it out of the rules."
        )
      owners.setdefault(id(owner), (owner, {}))[1][name] = adapter
  for owner, adapters in owners.values():
    for name, adapter in adapters.items():
      setattr(owner, name + _nnx.SUFFIX, adapter)
    owner.__class__ = _nnx.adapted_class(type(owner), tuple(sorted(adapters)))
  return new


def merge(model: nnx.Module) -> nnx.Module:
  """A plain model of the original structure and classes, each adapted kernel ``w + ΔW``.

  ``ΔW`` is cast to the kernel's dtype (as PEFT's merge does). ``model`` is not modified.
  """
  _require_adapted(model, "merge")
  return _nnx.restore(model, merge=True)


def unwrap(model: nnx.Module) -> nnx.Module:
  """The original model: adapters removed, the kernels bit for bit as they were wrapped."""
  _require_adapted(model, "unwrap")
  return _nnx.restore(model, merge=False)
