"""`delora_jax.peft.rules`: a PEFT DeloraConfig as delora_jax rules."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from delora_jax import _tree
from delora_jax._kernel import is_kernel
from delora_jax._rule import Rule
from delora_jax.peft._config import pattern_value, read, resolve_targets, targeted
from delora_jax.peft._names import lookup

#: Above min(in, out), a rank adds nothing but memory; ranks whose factors would hold more numbers
#: than this are refused (below min(in, out) the factors hold at most twice the kernel's numbers).
MAX_FACTORS = 2**24


def names_of(module_names: Any, path: str, shape: tuple[int, ...]) -> tuple[list[str], int] | None:
  """``(torch module names, stack_axes)`` of the kernel at ``path``; None if it has none."""
  got = lookup(module_names, path)
  if got is None:
    return None
  if isinstance(got, str):
    if "{}" not in got:
      return [got], 0
    return [got.format(i) for i in range(shape[0])], 1
  if isinstance(got, Sequence) and all(isinstance(s, str) for s in got):
    for k in range(1, len(shape) - 1):
      if math.prod(shape[:k]) == len(got):
        return list(got), k
    raise ValueError(
      f"{path}: `module_names` gave {len(got)} names, but no leading axes of the "
      f"kernel of shape {shape} hold that many slices; give one name per slice."
    )
  raise TypeError(f"{path}: `module_names` must give a str or a sequence of str; got {got!r}.")


def candidates(params: Any, module_names: Any) -> dict[str, tuple[list[str], int, tuple[int, ...]]]:
  """Every floating >= 2-D leaf that ``module_names`` names: ``{path: (names, stack_axes, shape)}``."""
  paths, leaves, _ = _tree.flatten(params)
  out = {}
  for p, x in zip(paths, leaves):
    x = x.w if is_kernel(x) else x
    if not _tree.is_array_like(x) or x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
      continue
    got = names_of(module_names, p, tuple(x.shape))
    if got is not None:
      out[p] = (*got, tuple(x.shape))
  return out


def rules(
  config: Any, params: Any, *, module_names: Any, model_type: str | None = None, norm: str = "float32"
) -> dict[str, Rule]:
  """The ``wrap`` rules that adapt ``params`` as PEFT adapts the torch model under ``config``.

  Reproduces ``target_modules`` (a regex string with ``re.fullmatch``, a list
  with PEFT's exact-name-or-``.suffix`` matching, ``"all-linear"``: every
  kernel ``module_names`` names except ``lm_head``, and ``score``/``classifier``
  when ``task_type`` is ``SEQ_CLS``), ``None`` (PEFT's defaults for
  ``model_type``), ``exclude_modules``, ``modules_to_save`` (never adapted),
  ``layers_to_transform`` with ``layers_pattern``, ``rank_pattern``,
  ``lambda_pattern``, ``module_dropout`` and ``init_weights`` (``True`` ->
  ``init="peft"``, ``False`` -> ``"random"``). A stacked (scanned) kernel
  whose module names PEFT adapts only in part gets ``Rule(slices=...)``.
  The config's regexes run on RE2, in time linear in the module name (a
  downloaded config cannot hang it); a construct RE2 lacks (backreferences,
  lookaround) is a ``ValueError`` naming the key and the fix.

  Args:
    config: a PEFT adapter folder, its ``adapter_config.json``, a dict or a
      ``peft.DeloraConfig``.
    params: the plain Flax parameters (an adapted tree's base kernels also do).
    module_names: Flax kernel path -> torch module name(s), as for
      :func:`delora_jax.peft.export`; leaves it maps to ``None`` (or a dict
      leaves out) are never adapted.
    model_type: the Hugging Face ``model_type`` (e.g. ``"llama"``), needed only
      when ``target_modules`` is ``None``.
    norm: ``Rule.norm`` of every rule (``"base"`` for PEFT's ``w_norm`` on
      low-precision bases).

  Returns:
    ``{re.escape(path): Rule}``, one exact-path rule per adapted kernel.

  Raises:
    ValueError: a malformed config (naming its file and key), no module
      targeted, one stacked kernel whose slices PEFT gives different ranks
      or λ, or a rank above ``min(in, out)`` whose factors would hold more
      than 2^24 numbers.

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> params = {"lin0": {"kernel": jnp.ones((10, 20))}, "lin1": {"kernel": jnp.ones((20, 2))}}
    >>> cfg = {"peft_type": "DELORA", "target_modules": ["lin1"], "rank_pattern": {"lin1": 2}}
    >>> got = delora_jax.peft.rules(cfg, params, module_names=lambda p: p.split("/")[0])
    >>> {p: (r.rank, r.lam, r.init) for p, r in got.items()}
    {'lin1/kernel': (2, 15.0, 'peft')}
  """
  cfg, source = read(config)
  return {re.escape(p): r for p, r in by_path(cfg, source, params, module_names, model_type, norm).items()}


def by_path(
  cfg: dict, source: str, params: Any, module_names: Any, model_type: str | None, norm: str
) -> dict[str, Rule]:
  """:func:`rules` of a checked config, keyed by the plain kernel path."""
  found = candidates(params, module_names)
  all_names = [n for ns, _, _ in found.values() for n in ns]
  targets = resolve_targets(cfg, source, all_names, model_type)
  out = {}
  for path, (names, stack_axes, shape) in found.items():
    live = [i for i, n in enumerate(names) if targeted(cfg, n, targets)]
    if not live:
      continue
    ranks = {pattern_value(cfg["rank_pattern"], names[i], cfg["r"]) for i in live}
    lams = {float(pattern_value(cfg["lambda_pattern"], names[i], cfg["delora_lambda"])) for i in live}
    if len(ranks) > 1 or len(lams) > 1:
      raise ValueError(
        f"{path}: {source} gives the slices of this stacked kernel different ranks "
        f"{sorted(ranks)} or λ {sorted(lams)}; one stacked kernel has one rank and "
        "one initial λ. Unstack the layers or make the patterns agree."
      )
    rank, n_in, n_out = ranks.pop(), math.prod(shape[stack_axes:-1]), shape[-1]
    if rank > min(n_in, n_out) and rank * (n_in + n_out) > MAX_FACTORS:
      raise ValueError(
        f"{path}: {source} gives module {names[live[0]]!r} rank {rank}, above min(in, out) = "
        f"{min(n_in, n_out)} of its kernel of shape {shape}: the update has rank at most that, and the "
        f"factors would hold {rank} x (in + out) = {rank * (n_in + n_out)} numbers. Lower `r` or the "
        "module's rank_pattern entry."
      )
    slices = tuple(live) if stack_axes and len(live) < len(names) else None
    out[path] = Rule(
      rank,
      lams.pop(),
      init="peft" if cfg["init_weights"] else "random",
      dropout=cfg["module_dropout"],
      stack_axes=stack_axes,
      slices=slices,
      norm=norm,
    )
  if not out:
    raise ValueError(
      f"{source}: target_modules={cfg['target_modules']!r} selects none of the "
      f"torch modules `module_names` gives for `params` "
      f"({_tree.sample_paths(sorted(all_names))}). Check the config's targets and "
      "`module_names`."
    )
  return out
