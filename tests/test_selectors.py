"""Rules keys that select modules (``delora_jax.Modules``, qwix's and MaxText's ``module_path``) and
``like=`` with keyword inputs, on Linen parameter trees and NNX models."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import delora_jax
from delora_jax import Modules, Rule
from tests.helpers import assert_trees_equal


def params():
  k = jax.random.split(jax.random.key(0), 4)
  return {
    "attn": {"q_proj": {"kernel": jax.random.normal(k[0], (8, 8)), "bias": jnp.zeros(8)}},
    "mlp": {
      "up_proj": {"kernel": jax.random.normal(k[1], (8, 16))},
      "down_proj": {"kernel": jax.random.normal(k[2], (16, 8))},
    },
    "norm": {"scale": jnp.ones(8)},
  }


QWIX = ".*q_proj|.*down_proj"  # qwix's / MaxText's spelling: module paths


def test_modules_key_adapts_every_kernel_of_the_matched_modules_as_the_parameter_paths_do():
  p = params()
  by_module = delora_jax.wrap(p, {Modules(QWIX): Rule(2, init="random")})
  by_path = delora_jax.wrap(p, {r"attn/q_proj/kernel|mlp/down_proj/kernel": Rule(2, init="random")})
  assert sorted(delora_jax.adapters(by_module)) == ["attn/q_proj/kernel", "mlp/down_proj/kernel"]
  assert_trees_equal(delora_jax.adapters(by_module), delora_jax.adapters(by_path))  # keys come from the path
  assert by_module["attn"]["q_proj"]["bias"] is p["attn"]["q_proj"]["bias"]  # the module's bias is skipped


def test_modules_and_path_keys_mix_first_key_wins():
  tree = delora_jax.wrap(params(), {"attn/q_proj/kernel": Rule(2), Modules(".*_proj"): Rule(4)})
  ranks = {p: k.rank for p, k in delora_jax._tree.kernels(tree).items()}
  assert ranks == {"attn/q_proj/kernel": 2, "mlp/down_proj/kernel": 4, "mlp/up_proj/kernel": 4}


@pytest.mark.parametrize(
  "rules, error, match",
  [
    pytest.param(
      {Modules(".*o_proj"): 2},
      ValueError,
      r"delora_jax.Modules\('\.\*o_proj'\) matches no module that holds a kernel.*\['attn/q_proj', 'mlp/down_proj', "
      r"'mlp/up_proj'\]",
      id="matches-nothing",
    ),
    pytest.param(
      {Modules("norm"): 2},
      ValueError,
      r"Modules\('norm'\) matches no module that holds a kernel",
      id="module-without-kernel",
    ),
    pytest.param(
      {Modules(".*proj"): 2, Modules(".*q_proj"): 4},
      ValueError,
      r"Modules\('\.\*q_proj'\) only matches leaves that earlier patterns already adapt",
      id="shadowed",
    ),
    pytest.param({Modules("(q"): 2}, ValueError, r"is not a valid regular expression", id="bad-regex"),
    pytest.param({3: 2}, TypeError, r"rules keys must be regex strings or delora_jax.Modules\(regex\)", id="bad-key"),
  ],
)
def test_modules_errors(rules, error, match):
  with pytest.raises(error, match=match):
    delora_jax.wrap(params(), rules)


def test_modules_pattern_must_be_a_string():
  with pytest.raises(TypeError, match=r"`pattern` must be a regex string over module paths"):
    Modules(3)


def test_peft_export_reads_the_initial_lambda_through_a_modules_key(tmp_path):
  rules = {Modules(".*q_proj"): Rule(2, lam=7.0), Modules(".*down_proj"): Rule(2, lam=3.0)}
  tree = delora_jax.wrap(params(), rules)
  names = {"attn/q_proj/kernel": "q_proj", "mlp/down_proj/kernel": "down_proj"}
  out = delora_jax.peft.export(tree, tmp_path / "a", module_names=names, rules=rules)
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert out and sorted([config["delora_lambda"], *config["lambda_pattern"].values()]) == [3.0, 7.0]


# ------------------------------------------------------------------ NNX: Modules keys, like= with keywords


class Block(nnx.Module):
  def __init__(self, rngs):
    self.q_proj = nnx.LinearGeneral(8, (2, 4), rngs=rngs)  # a 3-D kernel: its layout comes from like=
    self.down_proj = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, input_tokens, *, scale=1.0):
    return self.down_proj(self.q_proj(input_tokens).reshape(*input_tokens.shape[:-1], 8)) * scale


def test_nnx_modules_key_and_keyword_like_match_the_positional_call():
  model, x = Block(nnx.Rngs(0)), jnp.ones((2, 8))
  by_keywords = delora_jax.nnx.wrap(model, {Modules(QWIX): Rule(2, init="random")}, like={"input_tokens": x})
  by_position = delora_jax.nnx.wrap(model, {r"q_proj/kernel|down_proj/kernel": Rule(2, init="random")}, like=(x,))
  ks = delora_jax._nnx.kernels(by_keywords)
  assert sorted(ks) == ["down_proj/kernel", "q_proj/kernel"]  # not LinearGeneral's 2-D bias (2, 4)
  assert (ks["q_proj/kernel"].in_axes, ks["q_proj/kernel"].out_axes) == (
    delora_jax._nnx.kernels(by_position)["q_proj/kernel"].in_axes,
    delora_jax._nnx.kernels(by_position)["q_proj/kernel"].out_axes,
  )
  assert_trees_equal(delora_jax.adapters(by_keywords), delora_jax.adapters(by_position))
  np.testing.assert_array_equal(by_keywords(input_tokens=x, scale=2.0), by_position(x, scale=2.0))


def test_nnx_modules_key_that_matches_nothing_lists_module_paths():
  with pytest.raises(ValueError, match=r"Modules\('\.\*k_proj'\) matches no module.*\['down_proj', 'q_proj'\]"):
    delora_jax.nnx.wrap(Block(nnx.Rngs(0)), {Modules(".*k_proj"): 2})


@pytest.mark.parametrize("like", [[jnp.ones((2, 8))], {0: jnp.ones((2, 8))}], ids=["list", "dict-int-keys"])
def test_nnx_like_of_another_kind_is_a_type_error(like):
  with pytest.raises(TypeError, match=r"a dict of keyword arguments for model\(\*\*like\)"):
    delora_jax.nnx.wrap(Block(nnx.Rngs(0)), {Modules(QWIX): 2}, like=like)


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, input_tokens, *, deterministic):
    return nn.DenseGeneral((2, 4), name="q_proj")(input_tokens)


def test_linen_keyword_inputs_go_through_a_like_function():
  model, x = LinenBlock(), jnp.ones((2, 8))
  p = model.init(jax.random.key(0), input_tokens=x, deterministic=True)["params"]
  like = lambda q: model.apply({"params": q}, input_tokens=x, deterministic=True)  # noqa: E731
  tree = delora_jax.wrap(p, {Modules(".*q_proj"): 2}, like=like)
  assert delora_jax._tree.kernels(tree)["q_proj/kernel"].in_axes == (-3,)
  with pytest.raises(TypeError, match=r"like=lambda p: model.apply\(\{'params': p\}, \*\*inputs\)"):
    delora_jax.wrap(p, {Modules(".*q_proj"): 2}, like={"input_tokens": x})
