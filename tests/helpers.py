"""Helpers the test files share: relative error, tree comparisons, Linen setup, HF configs."""

from typing import Any

import jax
import numpy as np

import delora_jax
from delora_jax.models import llama

# Factorised vs merged in float32 with matmul precision "highest" (tests/conftest.py).
REL = 1e-5

# transformers.LlamaConfig keyword arguments of the "tiny" preset (LlamaConfig.preset("tiny")).
HF_TINY = dict(llama.PRESETS["tiny"])


def R(**kw: Any) -> delora_jax.Rule:  # noqa: N802 (short: the tests' case tables use it on every row)
  """A rank-2, λ = 3 Rule with random factors (b != 0: the adapters change the model)."""
  return delora_jax.Rule(2, 3.0, init="random", **kw)


def rel(got: Any, want: Any) -> float:
  """Norm-based relative error ``||got - want|| / ||want||``, computed in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def assert_trees_equal(got: Any, want: Any) -> None:
  """``got`` has ``want``'s tree structure and every leaf equals its counterpart bit for bit."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))


def init_and_wrap(model: Any, x: Any, rules: Any, key: int | None = 1) -> tuple[Any, Any]:
  """A Linen ``model``'s params (initialised with key 0 on ``x``) and their adapted tree.

  ``key``: the seed of the adapters' key (None: ``wrap``'s default key).
  """
  params = model.init(jax.random.key(0), x)["params"]
  return params, delora_jax.wrap(params, rules, key=None if key is None else jax.random.key(key))
