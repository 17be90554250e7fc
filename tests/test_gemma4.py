"""gemma 4 (PyPI ``gemma`` 4.0.1, Linen, Python >= 3.12) with tiny random-weight models, float32.

Three configs, each with every projection adapted and layouts taken from the model (``like=``):

- ``e2b``: ``Gemma4_E2B``-like: per-layer inputs (``embedder/per_layer_model_projection``, whose
  kernel gemma scales by ``w_scale`` before the einsum; ``per_layer_input_gate``,
  ``per_layer_projection``), KV-cache sharing (layers 2 and 3 reuse the K/V of layers 0 and 1),
  ``global_key_size`` != ``head_dim``, a wider FFN on the shared layers.
- ``31b``: ``Gemma4_31B``-like: global layers with ``k_eq_v`` (``k_einsum``, no ``kv_einsum``).
- ``moe``: ``Gemma4_26B_A4B``-like: MoE experts ``mlp/{gating_einsum,linear}/w`` (``(E, 2, H, F)``,
  ``(E, H, F)``) contracted by ``lax.ragged_dot``, the router, and the dense shared branch ``mlp2``.

Checked: every kernel factorised (the KV-shared layers' ``kv_einsum``, whose output gemma replaces
by the shared cache, reported as unused: their use never reaches the outputs), output == merged
(rel 1e-5), adapter gradients ==
gradients through the merged weights, a train step lowers the loss. Gradients: in float64 the two
agree per leaf to 1e-10 (the factorised computation is exact); in float32 both carry gemma 4's
rounding error (up to ~1e-4 relative on small λ leaves, merged and factorised alike), so float32 is
compared on the whole adapter gradient, against float64 and between the two.
"""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.real_code import require

gm = require("gemma.gm", "gemma 4 (PyPI gemma>=4, Python >= 3.12) runs on CI's real-code stack only")
c4 = require("gemma.gm.nn.gemma4._config", "gemma 4 (PyPI gemma>=4) is needed; this gemma has no Gemma 4 models")
m4 = require("gemma.gm.nn.gemma4._modules", "gemma 4 (PyPI gemma>=4) is needed")

import delora_jax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5
VOCAB = 64
L, G = m4.AttentionType.LOCAL_SLIDING, m4.AttentionType.GLOBAL

# One rules dict for every gemma (1 to 4) variant (docs/real_models.md): every pattern matches
# something in each (a pattern that matches nothing is an error).
RULES_RE = (
  r"layer_\d+/(attn/\w+_einsum/w|mlp2?/(gating_einsum|linear)(/w)?|mlp/router_logits/w"
  r"|per_layer_(input_gate|projection)/w)|embedder/per_layer_model_projection/w"
)
RULE = delora_jax.Rule(8, 2.0, init="random")

_COMMON = dict(
  num_embed=VOCAB,
  embed_dim=32,
  head_dim=16,
  final_logit_softcap=30.0,
  use_post_attn_norm=True,
  use_post_ffw_norm=True,
  qk_norm_with_scale=True,
  global_key_size=32,
  global_rope_proportion=0.25,
  local_rope_proportion=1.0,
  sliding_window_size=4,
  local_base_frequency=10_000,
  global_base_frequency=1_000_000,
)


def configs():
  return {
    "e2b": (
      gm.nn.Gemma4_E2B,
      c4.TransformerConfig(
        **_COMMON,
        hidden_dim=64,
        num_heads=4,
        num_kv_heads=1,
        attention_types=(L, G, L, G),
        per_layer_input_dim=16,
        kv_cache_sharing_config=c4.KVCacheSharingConfig(frac_shared_layers=0.5, share_global=True, share_local=True),
        override_kv_shared_ffw_hidden=128,
      ),
    ),
    "31b": (
      gm.nn.Gemma4_31B,
      c4.TransformerConfig(
        **_COMMON,
        hidden_dim=64,
        num_heads=4,
        num_kv_heads=2,
        num_global_kv_heads=1,
        attention_types=(L, G),
        k_eq_v_global=True,
      ),
    ),
    "moe": (
      gm.nn.Gemma4_26B_A4B,
      c4.TransformerConfig(
        **_COMMON,
        hidden_dim=48,
        num_heads=4,
        num_kv_heads=2,
        num_global_kv_heads=1,
        attention_types=(L, G),
        k_eq_v_global=True,
        enable_moe=True,
        num_experts=4,
        expert_dim=24,
        top_k_experts=2,
        moe_dense_hidden_dim=48,
      ),
    ),
  }


def _attn(i, kv):
  return [f"layer_{i}/attn/{k}/w" for k in ("attn_vec_einsum", kv, "q_einsum")]


def _ffn(i, mlp="mlp"):
  return [f"layer_{i}/{mlp}/gating_einsum", f"layer_{i}/{mlp}/linear"]


# Every projection of each config (all adapted), and those whose use never reaches the output.
KERNELS = {
  "e2b": ["embedder/per_layer_model_projection/w"]
  + [
    k
    for i in range(4)
    for k in _attn(i, "kv_einsum")
    + _ffn(i)
    + [f"layer_{i}/per_layer_input_gate/w", f"layer_{i}/per_layer_projection/w"]
  ],
  "31b": _attn(0, "kv_einsum") + _ffn(0) + _attn(1, "k_einsum") + _ffn(1),
  "moe": [
    k
    for i, kv in ((0, "kv_einsum"), (1, "k_einsum"))
    for k in _attn(i, kv)
    + _ffn(i, "mlp2")
    + [f"layer_{i}/mlp/gating_einsum/w", f"layer_{i}/mlp/linear/w", f"layer_{i}/mlp/router_logits/w"]
  ],
}
# KV-cache sharing: layers 2 and 3 compute k/v with their own kv_einsum, then attend with the
# shared cache of layers 0 and 1 instead: their kv_einsum adapters get exactly zero gradient.
UNREACHABLE = {"e2b": ["layer_2/attn/kv_einsum/w", "layer_3/attn/kv_einsum/w"], "31b": [], "moe": []}


@pytest.fixture(autouse=True, scope="module")
def _third_party_rank_promotion():
  """gemma's layers broadcast (1,) against (batch, seq, embed) (skip_scale): allow it in this file
  (conftest makes implicit rank promotion an error for our own code). Module scope: the models are
  built and wrapped in module-scoped fixtures."""
  with jax.numpy_rank_promotion("allow"):
    yield


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def build(name: str, dtype=jnp.float32):
  """(model, params, tokens): random weights perturbed by 0.05 N(0, 1) (gemma initialises norms to
  ones/zeros), float32 whatever jax_enable_x64 says."""
  cls, cfg = configs()[name]
  model = cls(config=cfg, dtype=jnp.float32)
  tok = jax.random.randint(jax.random.key(0), (2, 8), 1, VOCAB, jnp.int32)
  return model, jax.jit(lambda tok: _init(model, tok))(tok), tok


def _init(model, tok):
  params = model.init(jax.random.key(0), tok)["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  noise = [0.05 * jax.random.normal(k, p.shape, jnp.float32) for p, k in zip(leaves, keys)]
  return treedef.unflatten([(p + n).astype(jnp.float32) for p, n in zip(leaves, noise)])


def wrapped(model, params, tok):
  return delora_jax.wrap(params, {RULES_RE: RULE}, like=(model, tok), key=jax.random.key(1))


def grads(model, tree, tok):
  """Adapter gradients of mean(logits²): factorised, and through the merged weights w + ΔW."""
  trainable, frozen = delora_jax.split(tree)

  def loss(t, factorised):
    full = delora_jax.combine(t, frozen)
    if factorised:
      out = delora_jax.apply(model, {"params": full}, tok, strict=True)
    else:
      out = model.apply({"params": delora_jax.merge(full)}, tok)
    return jnp.mean(out.logits**2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compilation each, not thousands of eager ops
  return grad(trainable, True), grad(trainable, False)


_BUILT: dict = {}


def built(name: str):
  """(model, params, tokens, tree or the wrap's ValueError), once per process (wrapping traces the model)."""
  if name not in _BUILT:
    model, params, tok = build(name)
    try:
      tree = wrapped(model, params, tok)
    except ValueError as e:
      tree = e
    _BUILT[name] = model, params, tok, tree
  return _BUILT[name]


@pytest.fixture(scope="module", params=["e2b", "31b", "moe"])
def case(request):
  name = request.param
  model, params, tok, tree = built(name)
  if isinstance(tree, Exception):
    raise tree
  return name, model, params, tok, tree


@pytest.fixture(scope="module")
def case_grads(case):
  name, model, _, tok, tree = case
  return grads(model, tree, tok)


def test_every_projection_adapted_with_the_layouts_of_gemmas_equations(case):
  name, _, _, _, tree = case
  ks = delora_jax._tree.kernels(tree)
  assert sorted(ks) == sorted(KERNELS[name])
  first = "layer_0"
  # attention: q (heads, embed, key) input embed; attn_vec (heads, key, embed) output embed
  assert ks[f"{first}/attn/q_einsum/w"].in_axes == (-2,)
  assert ks[f"{first}/attn/attn_vec_einsum/w"].out_axes == (-1,)
  assert ks[f"{first}/attn/kv_einsum/w"].in_axes == (-2,)  # (2, kv_heads, embed, key)
  if name != "e2b":
    assert ks["layer_1/attn/k_einsum/w"].in_axes == (-2,)  # (kv_heads, embed, key)
  mlp = "mlp2" if name == "moe" else "mlp"
  # gemma 4's gating layout is (2, hidden, embed) with '...F,NHF->...NH': input axis -1
  assert ks[f"{first}/{mlp}/gating_einsum"].in_axes == (-1,)
  assert ks[f"{first}/{mlp}/gating_einsum"].out_axes == (-3, -2)
  assert ks[f"{first}/{mlp}/linear"].in_axes == (-2,)
  if name == "e2b":
    k = ks["embedder/per_layer_model_projection/w"]  # (embed, layers, per_layer_dim), scaled by w_scale
    assert (k.in_axes, k.out_axes) == ((-3,), (-2, -1))
    assert ks[f"{first}/per_layer_input_gate/w"].in_axes == (-2,)
  if name == "moe":
    # experts: one adapter per expert (the expert axis stacked), input the feature axis F that
    # ragged_dot contracts: gating (E, 2, H, F) -> a (E, F, r), b (E, r, 2H); linear (E, H, F).
    ads = delora_jax.adapters(tree)
    assert ads[f"{first}/mlp/gating_einsum/w"]["a"].shape == (4, 32, 8)
    assert ads[f"{first}/mlp/gating_einsum/w"]["b"].shape == (4, 8, 48)
    assert ads[f"{first}/mlp/linear/w"]["a"].shape == (4, 24, 8)
    assert ads[f"{first}/mlp/linear/w"]["b"].shape == (4, 8, 32)
    assert ks[f"{first}/mlp/router_logits/w"].in_axes == (-2,)


def test_every_kernel_factorised_and_output_equal_to_merged(case):
  name, model, params, tok, tree = case
  report = delora_jax.explain(model, {"params": tree}, tok)
  unreachable = UNREACHABLE[name]
  want = {
    "factorised": sorted(set(KERNELS[name]) - set(unreachable)),
    "merged": [],
    "unused": sorted(unreachable),  # their use never reaches the outputs
  }
  assert report == want, report
  got = delora_jax.apply(model, {"params": tree}, tok, strict=True).logits
  merged = model.apply({"params": delora_jax.merge(tree)}, tok).logits
  base = model.apply({"params": params}, tok).logits
  assert rel(got, base) > 1e-3  # the adapters change the model
  assert rel(got, merged) < RTOL


def test_kv_shared_layers_adapters_get_exactly_zero_gradient(case, case_grads):
  name = case[0]
  g, g_ref = case_grads
  flat = delora_jax.adapters(g)
  flat_ref = delora_jax.adapters(g_ref)
  for p in UNREACHABLE[name]:
    for f in ("a", "b", "lam"):
      assert not np.any(np.asarray(flat[p][f])), (p, f)
      assert not np.any(np.asarray(flat_ref[p][f])), (p, f)
  reached = set(KERNELS[name]) - set(UNREACHABLE[name])
  assert all(np.any(np.asarray(flat[p]["a"])) for p in reached)


# ---------------------------------------------------------------- gradients: float64 and float32


@pytest.fixture(scope="module")
def float64_grads():
  """Adapter gradients (factorised, through merge) of the same float32 trees, cast to float64 and
  differentiated with float64 enabled. {name: (grads, grads_ref)} as lists of leaves, or
  {name: the wrap's error} for a config that cannot be wrapped."""
  out = {}
  for name in configs():
    model, _, tok, tree = built(name)
    if isinstance(tree, Exception):  # reported by the tests that use it
      out[name] = tree
      continue
    with jax.enable_x64(True):
      cast = lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
      g, g_ref = grads(model, jax.tree.map(cast, tree), tok)
      out[name] = [np.asarray(x) for x in jax.tree.leaves(g)], [np.asarray(x) for x in jax.tree.leaves(g_ref)]
  return out


def _float64(float64_grads, name):
  got = float64_grads[name]
  if isinstance(got, Exception):
    pytest.fail(f"{name}: wrap failed: {got}")
  return got


def test_float64_adapter_gradients_equal_gradients_through_merge(case, float64_grads):
  """The factorised computation is exact: in float64 it agrees with the merged model to rounding."""
  name, _, _, _, tree = case
  g, g_ref = _float64(float64_grads, name)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(delora_jax.split(tree)[0])]
  assert len(paths) == len(g)
  assert all(x.dtype == np.float64 for x in g)
  for p, a, b in zip(paths, g, g_ref):
    assert rel(a, b) < 1e-10, p


def test_float32_adapter_gradients_equal_the_float64_ones_to_rounding(case, case_grads, float64_grads):
  """In float32 gemma 4's adapter gradients carry rounding error, the merged model's as much as the
  factorised one's: per leaf up to 1.3e-4 (31b) and 8e-3 (e2b, merged) relative to float64 on the
  small λ leaves (a sum of many cancelling terms), hence the issue's 1.5e-3 between the two. So
  float32 is compared on the whole adapter gradient (every a, b, λ as one vector): within 1e-5 of
  float64 for both, and of each other. The per-leaf comparison is the float64 test above."""
  name = case[0]
  g, g_ref = case_grads
  g64, _ = _float64(float64_grads, name)
  flat = lambda xs: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in xs])  # noqa: E731
  fact, merged, exact = flat(jax.tree.leaves(g)), flat(jax.tree.leaves(g_ref)), flat(g64)
  assert rel(merged, exact) < RTOL
  assert rel(fact, exact) < RTOL
  assert rel(fact, merged) < RTOL


def test_train_step_lowers_the_loss(case):
  _, model, _, tok, tree = case
  trainable, frozen = delora_jax.split(tree)
  opt = delora_jax.optimizer(optax.adam, learning_rate=1e-2)
  state = opt.init(trainable)

  @jax.jit
  def step(t, s):
    def loss(t):
      logits = delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, tok).logits
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]).mean()

    value, g = jax.value_and_grad(loss)(t)
    upd, s = opt.update(g, s, t)
    return optax.apply_updates(t, upd), s, value

  losses = []
  for _ in range(4):
    trainable, state, value = step(trainable, state)
    losses.append(float(value))
  assert losses[-1] < losses[0] - 1e-3, losses


# ---------------------------------------------------------------- the docs' gemma 4 block


def test_docs_gemma4_block_runs_as_written():
  """docs/real_models.md's gemma 4 block (the one starting '# gemma 4') as pasted: its own tiny E2B."""
  text = (ROOT / "docs" / "real_models.md").read_text()
  (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if b.startswith("# gemma 4")]
  ns: dict = {}
  exec(compile(block, "docs/real_models.md[gemma 4]", "exec"), ns)  # noqa: S102 (our docs)
  assert sorted(delora_jax._tree.kernels(ns["tree"])) == sorted(KERNELS["e2b"])
  assert ns["logits"].shape == (*ns["tokens"].shape, VOCAB)
  assert json.dumps(ns["report"]["merged"]) == "[]"
