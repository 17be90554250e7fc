"""optax integration: optimizer state only for adapter leaves, λ on its own terms."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.nnx import Variable
from jax import lax

from delora_jax import _kernel, _tree
from delora_jax._kernel import FROZEN_FIELDS, is_kernel
from delora_jax._nnx import SUFFIX
from delora_jax._split import _extra_matcher

_DECAY_KEYS = ("weight_decay", "weight_decay_rate")
# The trainable leaves of an adapted NNX model's state (delora_jax.nnx.wrap): <kernel>_delora/{a,b,lam}.
_NNX_ADAPTER = re.compile(r"(?:.*/)?[^/]+" + SUFFIX + r"/(a|b|lam)")


def param_labels(tree: Any, extra_trainable: str | Sequence[str] | None = None) -> Any:
  """Labels ``"adapter"`` (a, b, extras), ``"lam"`` and ``"frozen"`` for ``optax.partition``."""
  extra = _extra_matcher(extra_trainable)
  # An NNX Variable holding an array gets its label whole (a prefix of the params): optax.partition
  # then masks the Variable itself (a bare MaskedNode, no Variable holding one), which is what tunix's
  # restore shardings (nnx.get_named_sharding of the optimizer state) reproduce; see docs/tunix.md.
  paths, leaves, treedef = _tree.flatten(tree, is_leaf=lambda x: x is None or is_kernel(x) or _array_variable(x))
  # The trainable half of `split` (its kernels have w = None) holds only leaves meant to train.
  trainable_half = any(is_kernel(x) and x.w is None for x in leaves)
  out: list[Any] = []
  for p, x in zip(paths, leaves):
    if x is None:
      out.append(None)
    elif is_kernel(x):
      labels = {f: ("frozen" if getattr(x, f) is not None else None) for f in FROZEN_FIELDS}
      labels.update(a=_opt(x.a, "adapter"), b=_opt(x.b, "adapter"), lam=_opt(x.lam, "lam"))
      out.append(x.replace(**labels))
    elif m := _NNX_ADAPTER.fullmatch(p):
      out.append("lam" if m.group(1) == "lam" else "adapter")
    elif extra(p):
      out.append("adapter")
    elif trainable_half:
      raise ValueError(
        f"optimizer: {p} is in the trainable half (split(..., extra_trainable=...) put it there) "
        "but the optimizer's `extra_trainable` does not match it, so it would get a zero update "
        "and never train. Pass the same extra_trainable to delora_jax.optimizer."
      )
    else:
      out.append("frozen")
  return treedef.unflatten(out)


def _array_variable(x: Any) -> bool:
  """An NNX Variable that holds an array (not a DeloraKernel of a wrapped NNX State, nor a split's None)."""
  return isinstance(x, Variable) and _tree.is_array_like(x.get_raw_value())


def _opt(value, label):
  return None if value is None else label


def optimizer(
  tx: optax.GradientTransformation | Callable[..., optax.GradientTransformation],
  /,
  *,
  lam_learning_rate: Any = None,
  lam_tx: optax.GradientTransformation | None = None,
  decay_lam: bool = False,
  extra_trainable: str | Sequence[str] | None = None,
  **hyperparams: Any,
) -> optax.GradientTransformation:
  """Wraps an optax optimizer so that only DeLoRA adapters (and extras) train.

  Frozen leaves get exactly zero updates and no optimizer state; ``a``/``b``
  (and ``extra_trainable`` leaves) get ``tx``; λ gets its own instance, with no
  weight decay and, if given, its own learning rate (the paper's recipe). It
  works on the full adapted tree and on the ``trainable`` half of
  :func:`delora_jax.split` alike.

  Every optimizer family optax ships works through it and stays finite, with the bound held,
  at learning rates up to 1e3 (``tests/test_reliability.py`` trains each at lr=1e3: adamw,
  adam, nadamw, adamax, adamaxw, amsgrad, adabelief, radam, yogi, adan, sgd, with momentum
  and nesterov, optimistic_gradient_descent, sign_sgd, noisy_sgd, polyak_sgd, rprop,
  adafactor, lamb, lars, novograd, fromage, lion, rmsprop, adagrad, adadelta, sm3; lbfgs's
  line search needs the whole loss: ``optax.lbfgs`` is refused with a ``TypeError``). Its last step keeps the norms of
  ``a``'s columns and ``b``'s rows below 1e12 (256 for float16), which the model cannot see,
  and ``|λ|`` below 1e4 (256 for float16 λ; a λ given above it is not grown further), which
  no useful training comes near. optax's ``sm3`` takes no 0-d parameter, and λ of an
  unstacked kernel is one: give λ another optimizer (``lam_tx=optax.adam(1e-3)``). float16
  and bfloat16 adapters get float32 optimizer state and arithmetic (in float16, Adam's
  ``eps`` underflows and the first step is 0/0); the update is then rounded to their dtype,
  so there is no float32 master copy (keep adapters in float32 for one). Leaves of
  ``extra_trainable`` keep the state dtype optax gives them.

  Args:
    tx: an optax factory such as ``optax.adamw`` (then ``hyperparams`` are its
      arguments and λ's copy is built with ``weight_decay=0`` and
      ``learning_rate=lam_learning_rate``), or a ready ``GradientTransformation``
      (then λ uses ``lam_tx`` if given, else the same transformation).
    lam_learning_rate: λ's learning rate (float or schedule); needs a factory.
    lam_tx: an explicit transformation for λ (overrides the above).
    decay_lam: keep the factory's weight decay for λ too (off by default: decay
      shrinks the bound).
    extra_trainable: regex(es) of plain leaves to train with ``tx`` (a head).
    **hyperparams: arguments of the factory ``tx``.

  Example:
    >>> import jax.numpy as jnp, optax, delora_jax
    >>> tree = delora_jax.wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2})
    >>> opt = delora_jax.optimizer(optax.adamw, learning_rate=3e-3, weight_decay=0.01,
    ...                            lam_learning_rate=1e-2)
    >>> state = opt.init(tree)
  """
  if tx is getattr(optax, "lbfgs", None):
    raise TypeError(
      "optimizer: optax.lbfgs is not supported: its line search calls the loss on the parameters it "
      "is given, and delora_jax.optimizer gives each partition (adapters, λ, frozen) only its own "
      "leaves. Use a first-order optimizer such as delora_jax.optimizer(optax.adamw, learning_rate=1e-3)."
    )
  if isinstance(tx, optax.GradientTransformation):
    if hyperparams:
      raise TypeError(
        f"optimizer: got hyperparameters {sorted(hyperparams)} with a ready "
        "GradientTransformation; pass a factory instead, e.g. "
        "delora_jax.optimizer(optax.adamw, learning_rate=1e-3)."
      )
    if lam_learning_rate is not None and lam_tx is None:
      raise TypeError(
        "optimizer: `lam_learning_rate` needs a factory to rebuild the optimizer for λ; "
        "pass e.g. delora_jax.optimizer(optax.adam, learning_rate=1e-3, "
        "lam_learning_rate=1e-2), or give `lam_tx` explicitly."
      )
    main = tx
    lam = lam_tx if lam_tx is not None else tx
  elif callable(tx):
    main = tx(**hyperparams)
    lam = lam_tx if lam_tx is not None else tx(**_lam_hyperparams(tx, hyperparams, lam_learning_rate, decay_lam))
  else:
    raise TypeError(f"optimizer: `tx` must be an optax factory or GradientTransformation; got {tx!r}.")
  return _in_float32_then_bounded(
    optax.partition(
      {"adapter": main, "lam": lam, "frozen": optax.set_to_zero()},
      lambda params: param_labels(params, extra_trainable),
    )
  )


def _adapter_map(fn: Callable[[jax.Array], jax.Array], tree: Any) -> Any:
  """``tree`` with ``fn`` applied to its adapter leaves (``a``, ``b``, λ), every other leaf kept."""
  paths, leaves, treedef = _tree.flatten(tree, is_leaf=lambda x: x is None or is_kernel(x))
  out = []
  for p, x in zip(paths, leaves):
    if is_kernel(x):
      x = x.replace(**{f: fn(getattr(x, f)) for f in ("a", "b", "lam") if getattr(x, f) is not None})
    elif x is not None and _NNX_ADAPTER.fullmatch(p):
      x = fn(x)
    out.append(x)
  return treedef.unflatten(out)


def _widen(x: jax.Array) -> jax.Array:
  """A float16/bfloat16 array as float32; anything else as it is."""
  dtype = jnp.result_type(x)
  return x.astype(jnp.float32) if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4 else x


def _in_float32_then_bounded(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``inner`` run on float32 copies of sub-32-bit adapters, then :func:`bounded_factors`' bound.

  float16 (and bfloat16) adapters get float32 optimizer state and arithmetic: in float16, Adam's
  ``eps=1e-8`` and a small gradient's square are 0, so PEFT's start (``b = 0``, so ``grad a = 0``)
  gives 0/0 at the first step. The bound is applied to the float32 update (a float16 update of a
  factor at its limit could overflow), which is then rounded to the gradients' dtype; other
  leaves (a head of ``extra_trainable``) keep their own dtype, as optax gives it.
  """

  # The state keeps the structure of optax.chain(inner, bounded_factors()) that earlier versions
  # built, so optimizer states saved by them load.
  def init(params):
    return inner.init(_adapter_map(_widen, params)), optax.EmptyState()

  def update(updates, state, params=None, **extra_args):
    updates = _materialised(updates)
    wide = None if params is None else _adapter_map(_widen, params)
    new, inner_state = inner.update(_adapter_map(_widen, updates), state[0], wide, **extra_args)
    if params is not None:
      new = _bound(_materialised(new), params)
    return jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), new, updates), (inner_state, state[1])

  return optax.GradientTransformationExtraArgs(init, update)


def _materialised(tree: Any) -> Any:
  """``tree`` with its floating arrays behind one ``optimization_barrier``: computed once.

  In one jitted train step XLA fuses an elementwise producer into each of its consumers, so a
  value read twice is computed twice. A factor's gradient ends in elementwise work (the
  normalisation's terms) and Adam reads it twice (its two moments); the inner optimizer's update
  is elementwise too and the bound reads it twice (the norm check, the result). Behind a barrier
  each is computed once: 3 to 9 flops per adapter entry fewer per step, which is most of what
  DeLoRA's step cost above LoRA's with replicated adapters and few tokens per chip
  (``benchmarks/maxtext_fsdp.py``).
  """
  leaves, treedef = jax.tree.flatten(tree)
  idx = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not idx:
    return tree
  kept = jax.lax.optimization_barrier([leaves[i] for i in idx])
  for i, x in zip(idx, kept):
    leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


def factor_limit(dtype: Any) -> float:
  """The largest column norm of ``a`` (row norm of ``b``) that :func:`bounded_factors` lets stand.

  ``1e12`` for float32/bfloat16/float64 factors, ``sqrt(max)`` (256) for float16: far above
  anything training at a sane learning rate reaches, and low enough that a step which
  multiplies the factors by the ``|1 - lr * weight_decay|`` of AdamW at lr=1e3 stays finite.
  """
  return float(min(1e12, float(jnp.finfo(dtype).max) ** 0.5))


def lam_limit(dtype: Any) -> float:
  """The largest ``|λ|`` that an update may take λ to (a λ given beyond it is not grown further).

  ``1e4`` (``256`` for float16 λ). λ is the update's size relative to the base kernel's rows
  (``||diag(1/w_norm) ΔW||_F <= |λ|``): PEFT's default is 15, and at 1e4 the update is
  thousands of times the pretrained kernel, so no useful training comes near it.
  """
  return float(min(1e4, float(jnp.finfo(dtype).max) ** 0.5))


def _over(x: jax.Array, u: jax.Array, axis: int | None) -> tuple[jax.Array, jax.Array, jax.Array] | None:
  """``(x + u, s, over)`` for the update ``u`` of factor ``x``: ``s`` scales each norm along ``axis``
  (None: of all of ``x``) that ``x + u`` would take past the limit onto it (1 elsewhere), ``over``
  says where; None for a leaf that is not bounded."""
  if x is None or u is None or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    return None
  limit = factor_limit(jnp.result_type(x))
  dtype = jnp.promote_types(jnp.promote_types(jnp.result_type(x), jnp.result_type(u)), jnp.float32)
  new = x.astype(dtype) + u.astype(dtype)  # float64 stays float64 (x64)
  norm = jnp.sqrt(jnp.sum(new * new, axis=axis, keepdims=True))
  over = norm > limit
  return new, jnp.where(over, limit / norm, 1.0).astype(dtype), over


def _clip_lam(lam: jax.Array, u: jax.Array) -> jax.Array:
  """The update ``u`` of λ, changed only where it would take ``|λ|`` past ``max(lam_limit, |λ|)``."""
  if lam is None or u is None or not jnp.issubdtype(jnp.result_type(lam), jnp.floating):
    return u
  old = lam.astype(jnp.float32)
  cap = jnp.maximum(lam_limit(jnp.result_type(lam)), jnp.abs(old))
  new = old + u.astype(jnp.float32)
  return jnp.where(jnp.abs(new) > cap, (jnp.clip(new, -cap, cap) - old).astype(u.dtype), u)


def _bound(updates: Any, params: Any) -> Any:
  """``updates`` with the factor and λ bounds of :func:`bounded_factors` applied."""
  is_leaf = lambda x: x is None or is_kernel(x)  # noqa: E731
  paths, ups, treedef = _tree.flatten(updates, is_leaf=is_leaf)
  ps = treedef.flatten_up_to(params)
  out: list[Any] = []
  jobs: list[tuple[int, str | None, jax.Array, jax.Array, tuple]] = []  # (leaf, field, x, u, _over)

  def factor(i, field, x, u, axis):
    if (o := _over(x, u, axis)) is not None:
      jobs.append((i, field, x, u, o))

  for i, (path, u, p) in enumerate(zip(paths, ups, ps)):
    if is_kernel(u):
      # a's input axis and b's output axis, wherever the layout puts them (-2 and -1 for
      # leading stacked axes).
      factor(i, "a", p.a, u.a, -2 if p.a is None else _kernel.body_axis(p.stack, "a", p.a.ndim, 0))
      factor(i, "b", p.b, u.b, -1 if p.b is None else _kernel.body_axis(p.stack, "b", p.b.ndim, 1))
      u = u.replace(lam=_clip_lam(p.lam, u.lam))
    elif u is not None and (m := _NNX_ADAPTER.fullmatch(path)):
      # An NNX state's arrays do not say where their stacked axes are: a stacked factor is
      # bounded as a whole (its norm bounds every column's, and scaling all of it by one
      # factor changes neither the model nor the bound).
      if m.group(1) == "lam":
        u = _clip_lam(p, u)
      else:
        factor(i, None, p, u, (-2 if m.group(1) == "a" else -1) if jnp.ndim(p) <= 2 else None)
    out.append(u)
  if not jobs:
    return treedef.unflatten(out)
  # One branch for the whole tree, taken in the rare step where some norm would pass the limit:
  # there x + (new * s - x) lands it on the limit to a few roundings (the terms are of the limit's
  # size, where the norm's squares are finite: an entry past ~1e19 in float32 zeroes its column, as
  # before) and leaves every other column at x + u to one rounding of float32, or of float64 for
  # float64 factors. In every other step the updates pass exactly as they came, and the rescale is
  # not computed at all.
  pred = jnp.any(jnp.stack([jnp.any(o[2]) for *_, o in jobs]))
  operands = [(x, u, o[0], o[1]) for _, _, x, u, o in jobs]
  got = lax.cond(
    pred,
    lambda ops: [lax.convert_element_type(new * s - x.astype(new.dtype), u.dtype) for x, u, new, s in ops],
    lambda ops: [lax.convert_element_type(u, u.dtype) for _, u, _, _ in ops],  # (a weak type dropped)
    operands,
  )
  for (i, field, *_), g in zip(jobs, got):
    out[i] = g if field is None else out[i].replace(**{field: g})
  return treedef.unflatten(out)


def bounded_factors() -> optax.GradientTransformation:
  """Keeps ``a``'s column norms and ``b``'s row norms below :func:`factor_limit`, unseen by the
  model, and ``|λ|`` below :func:`lam_limit`.

  DeLoRA's update depends on ``a`` and ``b`` only through their normalised columns and rows, so
  rescaling a column of ``a`` (or a row of ``b``) changes neither the forward pass nor the
  bound. Nothing else keeps their scale in check: AdamW's decoupled decay multiplies them by
  ``1 - lr * weight_decay`` each step, which is -9 at lr=1e3 and weight_decay=0.01, so they
  grow 9-fold a step until their squares overflow. This last step of
  :func:`delora_jax.optimizer` shrinks, onto the limit, any column or row whose norm the
  update would take past it. λ is the bound itself, so it is clipped rather than rescaled:
  optimizers whose step scales with the parameter (LAMB, Adafactor) or SGD past its stable
  rate would otherwise grow it geometrically until the loss overflows. In a step where no norm
  would pass the limit (the usual case) every update is returned exactly as it came, bit for
  bit, and the rescale is skipped (one ``lax.cond`` for the whole tree); in a step where one
  would, the other columns and rows get ``x + u`` to within one rounding. A stacked factor of an
  NNX model's state (whose arrays do not carry their layout) is shrunk as a whole, onto a total
  norm at the limit, which bounds each of its columns or rows too. It needs ``params``
  (``opt.update(grads, state, params)``, which AdamW needs anyway); without them the updates
  pass unchanged.
  """

  def update(updates, state, params=None):
    if params is None:  # e.g. plain Adam called without params: nothing to bound against
      return updates, state
    return _bound(updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _lam_hyperparams(factory, hyperparams, lam_learning_rate, decay_lam):
  hp = dict(hyperparams)
  params = _signature_params(factory)
  if lam_learning_rate is not None:
    if "learning_rate" not in hp and (params is not None and "learning_rate" not in params):
      raise TypeError(
        f"optimizer: {getattr(factory, '__name__', factory)} takes no "
        "`learning_rate`, so `lam_learning_rate` cannot be applied."
      )
    hp["learning_rate"] = lam_learning_rate
  if not decay_lam:
    for k in _DECAY_KEYS:
      if k in hp or (params is not None and k in params):
        hp[k] = 0.0
  return hp


def _signature_params(fn):
  try:
    return set(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return None
