"""The Flax Llama matches Hugging Face's LlamaForCausalLM, scanned or not, and trains with DeLoRA."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

import delora_jax
from delora_jax.models import Llama, LlamaConfig, llama, params_from_hf, params_to_hf
from tests.helpers import HF_TINY


@pytest.fixture(scope="module")
def hf():
  torch.manual_seed(0)
  model = LlamaForCausalLM(HFLlamaConfig(**HF_TINY)).eval()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  ids = np.random.RandomState(0).randint(0, 128, (2, 16))
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids)).logits.numpy()
  return model.config, sd, ids, logits


@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scan"])
def test_logits_match_hf(hf, scan):
  hf_config, sd, ids, ref = hf
  cfg = LlamaConfig.from_hf(hf_config, scan_layers=scan)
  assert cfg == LlamaConfig.preset("tiny", scan_layers=scan)
  params = params_from_hf(sd, cfg)
  init = Llama(cfg).init(jax.random.key(0), jnp.asarray(ids))["params"]
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init)
  out = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(ids)))
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert rel < 1e-4, rel
  back = params_to_hf(params, cfg)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_param_paths_follow_hf_names():
  cfg = LlamaConfig.preset("tiny")
  params = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  paths = {"/".join(p) for p in flax.traverse_util.flatten_dict(params)}
  assert {
    "embed_tokens/embedding",
    "norm/scale",
    "lm_head/kernel",
    "layers_1/input_layernorm/scale",
    "layers_1/post_attention_layernorm/scale",
    "layers_0/self_attn/o_proj/kernel",
    "layers_0/mlp/down_proj/kernel",
  } <= paths
  assert len(paths) == 3 + 2 * 9


def test_scanned_remat_delora_trains_one_jitted_step(hf):
  hf_config, sd, ids, _ = hf
  cfg = LlamaConfig.from_hf(hf_config, scan_layers=True, remat=True)
  model, x = Llama(cfg), jnp.asarray(ids)
  base = params_from_hf(sd, cfg)
  rules = {
    r"layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel": delora_jax.Rule(4, stack_axes=1, init="random")
  }
  tree = delora_jax.wrap(base, rules)
  assert delora_jax.adapters(tree)["layers/mlp/up_proj/kernel"]["a"].shape == (2, 64, 4)
  trainable, frozen = delora_jax.split(tree)
  tx = delora_jax.optimizer(optax.adamw, learning_rate=1e-2)

  def loss_fn(t):
    logits = delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()

  @jax.jit
  def step(t, s):
    loss, g = jax.value_and_grad(loss_fn)(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s, loss, g

  new, state, loss, grads = step(trainable, tx.init(trainable))
  ref = optax.softmax_cross_entropy_with_integer_labels(
    jax.jit(model.apply)({"params": delora_jax.merge(tree)}, x)[:, :-1], x[:, 1:]
  ).mean()
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  g_b = np.asarray(grads["layers"]["self_attn"]["q_proj"]["kernel"].b)
  assert g_b.shape == (2, 4, 64) and np.all(np.abs(g_b).max(axis=(1, 2)) > 0)
  for old, upd in zip(jax.tree.leaves(trainable), jax.tree.leaves(new)):
    assert not np.array_equal(np.asarray(old), np.asarray(upd))
  assert float(step(new, state)[2]) < float(loss)


def test_attention_kinds_agree():
  cfg = LlamaConfig.preset("tiny")
  x = jnp.zeros((2, 8), jnp.int32).at[:, 3:].set(7)
  params = Llama(cfg).init(jax.random.key(0), x)["params"]
  ref = Llama(cfg).apply({"params": params}, x)
  for kind in ("xla", "blocked"):
    got = Llama(dataclasses.replace(cfg, attention=kind)).apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 7, 64, 100, 200], ids=str)
def test_blocked_attention_equals_softmax_forward_and_backward(t):
  """Query blocks (one, several, a ragged last one) with the recomputing backward."""
  ks = jax.random.split(jax.random.key(t), 4)
  q = jax.random.normal(ks[0], (2, t, 6, 8))
  k, v = jax.random.normal(ks[1], (2, t, 2, 8)), jax.random.normal(ks[2], (2, t, 2, 8))
  d_out = jax.random.normal(ks[3], (2, t, 6, 8))
  y_ref, vjp_ref = jax.vjp(llama.softmax_attention, q, k, v)
  y, vjp = jax.jit(lambda *a: jax.vjp(llama.blocked_attention, *a))(q, k, v)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=2e-6)
  for g, r in zip(vjp(d_out), vjp_ref(d_out)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=2e-5)
  # Causal: the first position sees only itself.
  np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(jnp.repeat(v[:, 0], 3, axis=1)), rtol=1e-6, atol=1e-6)


def test_inputs_embeds_equals_input_ids():
  cfg = LlamaConfig.preset("tiny")
  model, x = Llama(cfg), jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  params = model.init(jax.random.key(0), x)["params"]
  emb = model.apply({"params": params}, x, method=Llama.embed)
  np.testing.assert_array_equal(
    np.asarray(model.apply({"params": params}, inputs_embeds=emb)), np.asarray(model.apply({"params": params}, x))
  )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of `num_key_value_heads`"),
    (dict(hidden_size=66), "set `head_dim`"),
    (dict(attention="flash"), "`attention` must be one of"),
    (dict(remat_policy="all"), "`remat_policy` must be one of"),
  ],
  ids=["kv-heads", "head-dim", "attention", "remat-policy"],
)
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LlamaConfig.preset("tiny", **kwargs)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    LlamaConfig.preset("huge")


def test_call_needs_exactly_one_input():
  model = Llama(LlamaConfig.preset("tiny"))
  with pytest.raises(ValueError, match="exactly one of `input_ids`"):
    model.init(jax.random.key(0))


def _edit(sd, drop=None, add=None, reshape=None):
  out = {k: v for k, v in sd.items() if k != drop}
  if add:
    out[add] = np.zeros(3, np.float32)
  if reshape:
    out[reshape] = out[reshape].T
  return out


@pytest.mark.parametrize(
  "edit, match",
  [
    (dict(drop="model.layers.1.mlp.up_proj.weight"), "has no 'model.layers.1.mlp.up_proj.weight'"),
    (dict(reshape="model.layers.0.self_attn.k_proj.weight"), r"has shape \(64, 32\), expected \(32, 64\)"),
    (dict(add="model.layers.2.mlp.up_proj.weight"), "no place for: \\['model.layers.2"),
  ],
  ids=["missing", "shape", "unexpected"],
)
def test_params_from_hf_errors(hf, edit, match):
  _, sd, _, _ = hf
  with pytest.raises(ValueError, match=match):
    params_from_hf(_edit(sd, **edit), LlamaConfig.preset("tiny"))
