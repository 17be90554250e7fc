"""Real third-party model code with random weights: gemma (Linen) and tunix llama3/gemma3 (NNX).

Every targeted kernel runs factorised, the output and the adapter gradients equal those of
the merged weights, a jitted train step lowers the loss, and eager calls do not re-trace.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from gemma import gm
from gemma.gm.nn import _config as gm_config
from gemma.gm.nn import _modules as gm_modules
from tunix.models import dummy_model_creator
from tunix.models.gemma3 import model as tunix_gemma3
from tunix.models.llama3 import model as tunix_llama3

import delora_jax
from delora_jax import _interpret
from tests import models
from tests.helpers import assert_trees_equal, rel

RTOL = 1e-5
# tunix builds its models with flax APIs flax now deprecates (its code, not ours: the
# `sharding` metadata name, nnx.State in create_dummy_model, `Variable.value`, pxla.thread_resources in `shard`).
pytestmark = [
  pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:jax.interpreters.pxla.thread_resources:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:`flax.nnx.State` will be deprecated:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def _third_party_rank_promotion():
  """tunix's norms broadcast (embed,) against (batch, seq, embed): allow it in this file
  (conftest makes implicit rank promotion an error for our own code)."""
  with jax.numpy_rank_promotion("allow"):
    yield


def tokens(b=2, t=8, vocab=64):
  return jax.random.randint(jax.random.key(0), (b, t), 1, vocab)


# ---------------------------------------------------------------- gemma (Linen)

GEMMA_RULES = {
  r"layer_\d+/attn/.*/w": delora_jax.Rule(4, 2.0, init="random"),
  r"layer_\d+/mlp/(gating_einsum|linear)": delora_jax.Rule(4, 2.0, init="random"),
}
GEMMA_KERNELS = [
  f"layer_{i}/{k}"
  for i in range(2)
  for k in ("attn/attn_vec_einsum/w", "attn/kv_einsum/w", "attn/q_einsum/w", "mlp/gating_einsum", "mlp/linear")
]


@pytest.fixture(scope="module")
def gemma():
  cfg = gm_config.TransformerConfig(
    num_embed=64,
    embed_dim=32,
    hidden_dim=48,
    num_heads=4,
    head_dim=8,
    num_kv_heads=2,
    final_logit_softcap=None,
    use_post_attn_norm=True,
    use_post_ffw_norm=True,
    attention_types=(gm_modules.AttentionType.GLOBAL,) * 2,
  )
  model = gm.nn.Transformer(config=cfg)
  tok = tokens()

  @jax.jit  # one compilation, not one per eager op
  def init(tok):
    params = model.init(jax.random.key(0), tok)["params"]
    # gemma initialises some weights to zeros/ones: perturb so that every norm is non-trivial.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

  params = init(tok)
  return model, params, tok


def test_gemma_layouts_inferred_every_kernel_factorised_equal_to_merged(gemma):
  model, params, tok = gemma
  tree = delora_jax.wrap(params, GEMMA_RULES, like=(model, tok))
  ks = delora_jax._tree.kernels(tree)
  assert sorted(ks) == sorted(GEMMA_KERNELS)
  # The layouts gemma's equations imply (research notes): q (heads, embed, head_dim) input
  # axis -2; kv (2, kv_heads, embed, head_dim) input -2; attn_vec output -1; gating input -2.
  assert ks["layer_0/attn/q_einsum/w"].in_axes == (-2,)
  assert ks["layer_0/attn/kv_einsum/w"].in_axes == (-2,)
  assert ks["layer_0/attn/attn_vec_einsum/w"].out_axes == (-1,)
  assert ks["layer_0/mlp/gating_einsum"].in_axes == (-2,)
  report = delora_jax.explain(model, {"params": tree}, tok)
  assert report == {"factorised": sorted(GEMMA_KERNELS), "merged": [], "unused": []}
  got = delora_jax.apply(model, {"params": tree}, tok, strict=True).logits
  want = model.apply({"params": delora_jax.merge(tree)}, tok).logits
  base = model.apply({"params": params}, tok).logits
  assert rel(got, base) > 1e-3
  assert rel(got, want) < RTOL
  trainable, frozen = delora_jax.split(tree)

  def loss(t, factorised):
    full = delora_jax.combine(t, frozen)
    out = (
      delora_jax.apply(model, {"params": full}, tok, strict=True)
      if factorised
      else model.apply({"params": delora_jax.merge(full)}, tok)
    )
    return jnp.mean(out.logits**2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g, g_ref = grad(trainable, True), grad(trainable, False)
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
    assert rel(a, b) < RTOL, jax.tree_util.keystr(p)


def test_gemma_wrong_declared_layout_is_an_error(gemma):
  model, params, tok = gemma
  rules = {r"layer_\d+/attn/q_einsum/w": delora_jax.Rule(4, in_axes=0)}  # heads, not embed
  with pytest.raises(ValueError, match=r"layer_0/attn/q_einsum/w.*input axes \(0,\).*contracts axes \(1,\)"):
    delora_jax.wrap(params, rules, like=(model, tok))
  tree = delora_jax.wrap(params, rules)
  want = r"layer_0/attn/q_einsum/w: the model contracts this kernel over its axes \(1,\)"
  with pytest.raises(ValueError, match=want):
    delora_jax.apply(model, {"params": tree}, tok)


def test_gemma_train_step_lowers_loss_and_eager_calls_do_not_retrace(gemma, monkeypatch):
  model, params, tok = gemma
  tree = delora_jax.wrap(params, {k: delora_jax.Rule(4, 4.0) for k in GEMMA_RULES}, like=(model, tok))
  trainable, frozen = delora_jax.split(tree)
  opt = delora_jax.optimizer(optax.adam, learning_rate=1e-2)
  target = jax.nn.one_hot(jnp.roll(tok, -1, axis=1), 64)

  def loss(t):
    logits = delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, tok).logits
    return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), axis=-1))

  trainable, losses = models.train_steps(loss, trainable, opt, 15)
  assert losses[-1] < losses[0] - 0.05
  # gemma's Transformer is nn.jit-wrapped: after the first eager call, later ones hit its cache
  # (the factorised evaluator runs only while tracing).
  traces = []
  real = _interpret.run
  monkeypatch.setattr(_interpret, "run", lambda *a, **k: traces.append(1) or real(*a, **k))
  full = delora_jax.combine(trainable, frozen)
  tok2 = tokens(1, 5)  # a shape no earlier call used: the first call traces
  first = delora_jax.apply(model, {"params": full}, tok2).logits
  n = len(traces)
  assert n == 2 * 4  # per layer: q, kv, attn_vec and one FeedForward (sharing its einsums' scope)
  for _ in range(2):
    np.testing.assert_array_equal(delora_jax.apply(model, {"params": full}, tok2).logits, first)
  assert len(traces) == n


# ---------------------------------------------------------------- tunix (NNX)

TUNIX_RULES = {
  r"layers/\d+/attn/.*/w": delora_jax.Rule(4, 2.0, init="random"),
  r"layers/\d+/mlp/.*/kernel": delora_jax.Rule(4, 2.0, init="random"),
}


def _llama3():
  cfg = tunix_llama3.ModelConfig(
    num_layers=2,
    vocab_size=64,
    embed_dim=32,
    hidden_dim=48,
    num_heads=4,
    head_dim=8,
    num_kv_heads=2,
    rope_theta=10000,
    norm_eps=1e-5,
  )
  return dummy_model_creator.create_dummy_model(
    tunix_llama3.Llama3, cfg, dtype=jnp.float32, random_seed=0, scale=0.05
  ), 14


def _gemma3():
  cfg = tunix_gemma3.ModelConfig(
    num_layers=2,
    num_embed=64,
    embed_dim=32,
    hidden_dim=48,
    num_heads=4,
    head_dim=8,
    num_kv_heads=2,
    sliding_window_size=4,
    param_dtype=jnp.float32,
  )
  return dummy_model_creator.create_dummy_model(
    tunix_gemma3.Gemma3, cfg, dtype=jnp.float32, random_seed=0, scale=0.05
  ), 12


def tunix_args(b=2, t=8):
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return tokens(b, t), pos, None, jnp.tril(jnp.ones((b, t, t), bool))


@pytest.mark.parametrize("make", [_llama3, _gemma3], ids=["llama3", "gemma3"])
def test_tunix_every_kernel_factorised_equal_to_merged_and_trains(make):
  model, n_kernels = make()
  args = tunix_args()
  before = jax.tree.map(np.asarray, nnx.state(model))
  adapted = delora_jax.nnx.wrap(model, TUNIX_RULES, like=args, key=jax.random.key(1))
  report = delora_jax.explain(adapted, *args)
  assert len(report["factorised"]) == n_kernels and report["merged"] == [] and report["unused"] == []
  got = adapted(*args)[0]
  want = delora_jax.nnx.merge(adapted)(*args)[0]
  assert rel(got, model(*args)[0]) > 1e-3
  assert rel(got, want) < RTOL

  # gradients of the adapters: factorised vs through w + ΔW built from the same arrays
  def loss_fact(m):
    return jnp.mean(m(*args)[0] ** 2)

  grads = nnx.grad(loss_fact, argnums=nnx.DiffState(0, delora_jax.nnx.DeloraParam))(adapted)
  graphdef, lora, rest = nnx.split(adapted, delora_jax.nnx.DeloraParam, ...)

  def loss_merged(lora):
    return jnp.mean(delora_jax.nnx.merge(nnx.merge(graphdef, lora, rest))(*args)[0] ** 2)

  g_ref = jax.jit(jax.grad(loss_merged))(lora)
  flat = dict(jax.tree_util.tree_leaves_with_path(grads))
  for p, b in jax.tree_util.tree_leaves_with_path(g_ref):
    assert rel(flat[p], b) < RTOL, jax.tree_util.keystr(p)

  # a jitted train step through nnx.Optimizer on DeloraParam lowers the loss
  opt = nnx.Optimizer(
    adapted,
    delora_jax.optimizer(optax.adamw, learning_rate=3e-2, lam_learning_rate=0.3),
    wrt=delora_jax.nnx.DeloraParam,
  )
  tok = args[0]
  target = jax.nn.one_hot(jnp.roll(tok, -1, axis=1), 64)

  @nnx.jit
  def step(m, opt):
    def loss(m):
      return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(m(*args)[0]), axis=-1))

    value, g = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, delora_jax.nnx.DeloraParam))(m)
    opt.update(m, g)
    return value

  losses = [float(step(adapted, opt)) for _ in range(20)]
  # tiny random weights (scale 0.05): the bounded update moves the loss slowly but surely
  assert losses[-1] < losses[0] - 0.02, losses
  # the original model was never touched
  after = jax.tree.map(np.asarray, nnx.state(model))
  assert_trees_equal(after, before)


def test_docs_real_models_blocks_run_as_written(gemma):
  """docs/real_models.md's gemma and tunix blocks, with the inputs the page says they take."""
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "real_models.md").read_text()
  blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
  # the gemma 4 and MaxText blocks need Python >= 3.12: tests/test_gemma4.py and test_maxtext.py run them
  gemma_block, tunix_block = [b for b in blocks if not b.startswith(("# gemma 4", "# MaxText"))]
  model, _, tok = gemma
  ns = {"config": model.config, "tokens": tok}
  exec(compile(gemma_block, "docs/real_models.md[gemma]", "exec"), ns)  # noqa: S102 (our docs)
  assert ns["logits"].shape == (*tok.shape, 64)
  assert set(delora_jax._tree.kernels(ns["tree"])) == set(GEMMA_KERNELS)
  tokens_, positions, _, attention_mask = tunix_args()
  ns.update(model=_llama3()[0], tokens=tokens_, positions=positions, attention_mask=attention_mask)
  exec(compile(tunix_block, "docs/real_models.md[tunix]", "exec"), ns)  # noqa: S102 (our docs)
  assert len(delora_jax.adapters(ns["adapted"])) == 14
  assert isinstance(ns["optimizer"], nnx.Optimizer)
