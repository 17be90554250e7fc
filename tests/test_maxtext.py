"""MaxText 0.2.5 (PyPI ``maxtext``, Flax NNX, Python >= 3.12): a tiny random-weight llama2 decoder, float32.

Built the way MaxText builds its models (``pyconfig.initialize`` + ``model_creation_utils.from_config``
with ``rngs``: the NNX ``Transformer`` its trainers run), at MaxText's default ``scan_layers=True,
param_scan_axis=1`` (one stacked module ``decoder/layers``, the layer axis at position 1 of every
kernel; MaxText moves it to 0 inside its ``lax.scan``) and unrolled (``scan_layers=False``). All 7
projections per layer adapted, layouts from ``like=``: every kernel factorised, logits == merged
(rel 1e-5), adapter gradients == gradients through the merged weights, a train step in MaxText's
split/merge style lowers the loss.
"""

import os
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.real_code import require

maxtext = require("maxtext", "MaxText 0.2.5 (PyPI maxtext, Python >= 3.12) runs on CI's real-code stack only")
pyconfig = require("maxtext.configs.pyconfig", "MaxText 0.2.5 is needed")
model_creation_utils = require("maxtext.utils.model_creation_utils", "MaxText 0.2.5 is needed")
maxtext_utils = require("maxtext.utils.maxtext_utils", "MaxText 0.2.5 is needed")

import delora_jax  # noqa: E402
import delora_jax.nnx  # noqa: E402,F401

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5
LAYERS, EMBED, HEADS, HEAD_DIM, MLP, VOCAB, SEQ, BATCH = 2, 64, 4, 16, 128, 128, 16, 2
# MaxText's own LoRA targets (configs/post_train/lora_module_path.yml), as parameter paths.
RULES_RE = r"decoder/layers(_\d+)?/(self_attention/(query|key|value|out)|mlp/(wi_0|wi_1|wo))/kernel"
RULE = delora_jax.Rule(8, 2.0, init="random")
PROJ = (
  "mlp/wi_0",
  "mlp/wi_1",
  "mlp/wo",
  "self_attention/key",
  "self_attention/out",
  "self_attention/query",
  "self_attention/value",
)
# (in, out) sizes of each projection, flattened
SIZES = {
  "query": (64, 64),
  "key": (64, 64),
  "value": (64, 64),
  "out": (64, 64),
  "wi_0": (64, 128),
  "wi_1": (64, 128),
  "wo": (128, 64),
}


# MaxText builds its variables with flax metadata flax now deprecates (its code, not ours).
pytestmark = [
  pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:The 'split' argument of 'fork' is deprecated:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:'sharding_names' is deprecated:DeprecationWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _third_party_rank_promotion():
  """MaxText's layers broadcast implicitly ((b, t, 1, 1) against (heads,)): allow it in this file
  (conftest makes implicit rank promotion an error for our own code). Module scope: the models are
  built and wrapped in module-scoped fixtures."""
  with jax.numpy_rank_promotion("allow"):
    yield


def config(scan: bool, **overrides):
  """A tiny llama2 (the overrides research/2026-12/maxtext.md used), float32, on CPU."""
  base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
  kw = dict(
    hardware="cpu",
    skip_jax_distributed_system=True,
    decoder_block="llama2",
    base_emb_dim=EMBED,
    base_num_query_heads=HEADS,
    base_num_kv_heads=HEADS,
    head_dim=HEAD_DIM,
    base_mlp_dim=MLP,
    base_num_decoder_layers=LAYERS,
    vocab_size=VOCAB,
    max_target_length=SEQ,
    dtype="float32",
    weight_dtype="float32",
    attention="dot_product",
    scan_layers=scan,
    per_device_batch_size=1,
    enable_checkpointing=False,
    run_name="delora_test",
  )
  kw.update(overrides)
  return pyconfig.initialize(["test_maxtext", base], **kw)


def build(scan: bool, **overrides):
  """(model, cfg): MaxText's NNX Transformer with random weights (from_config with rngs)."""
  cfg = config(scan, **overrides)
  mesh = maxtext_utils.get_mesh_from_config(cfg)
  model = model_creation_utils.from_config(cfg, mesh=mesh, rngs=nnx.Rngs(params=0, dropout=1, aqt=2))
  return model, cfg


def inputs(b=BATCH, t=SEQ):
  tok = jax.random.randint(jax.random.key(0), (b, t), 1, VOCAB, jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  return tok, pos, seg


def call(m, args):
  return m(*args, enable_dropout=False)


def fresh(model):
  """MaxText's own workaround (trainers/post_train/sft/train_sft.py): a model nnx.merge'd inside
  jax.grad holds Variables whose trace state belongs to the outer trace; its decoder updates them
  after each checkpointed layer call (TraceContextError). Reset them to the current trace."""
  from flax.nnx import tracers  # noqa: PLC0415

  for _, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Variable) and hasattr(v, "_trace_state") and not v._trace_state.is_valid():
      object.__setattr__(v, "_trace_state", tracers.TraceState())
  return model


def kernel_paths(scan: bool):
  layers = ["decoder/layers"] if scan else [f"decoder/layers_{i}" for i in range(LAYERS)]
  return sorted(f"{layer}/{p}/kernel" for layer in layers for p in PROJ)


@pytest.fixture(scope="module", params=[True, False], ids=["scanned", "unrolled"])
def case(request):
  scan = request.param
  model, cfg = build(scan)
  args = inputs()
  adapted = delora_jax.nnx.wrap(model, {RULES_RE: RULE}, like=lambda m: call(m, args), key=jax.random.key(1))
  return scan, cfg, model, adapted, args


def test_default_config_is_scanned_at_param_scan_axis_1(case):
  scan, cfg, model, _, _ = case
  if scan:
    assert cfg.param_scan_axis == 1  # MaxText's default
    q = nnx.state(model, nnx.Param)["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    assert q.shape == (EMBED, LAYERS, HEADS, HEAD_DIM)


def test_layouts_from_like_every_projection(case):
  scan, _, _, adapted, _ = case
  ads = delora_jax.adapters(adapted)
  assert sorted(ads) == kernel_paths(scan)
  for p, ad in ads.items():
    n_in, n_out = SIZES[p.split("/")[-2]]
    if scan:  # the adapters keep the layer axis where the kernel keeps it (position 1), as qwix's LoRA does
      assert ad["a"].shape == (n_in, LAYERS, 8), p
      assert ad["b"].shape == (8, LAYERS, n_out), p
    else:
      assert ad["a"].shape == (n_in, 8), p
      assert ad["b"].shape == (8, n_out), p


def test_every_kernel_factorised_and_logits_equal_to_merged(case):
  scan, _, model, adapted, args = case
  report = delora_jax.explain(adapted, *args, enable_dropout=False)
  assert report == {"factorised": kernel_paths(scan), "merged": [], "unused": []}
  got = call(adapted, args)
  want = call(delora_jax.nnx.merge(adapted), args)
  base = call(model, args)
  assert got.shape == (BATCH, SEQ, VOCAB)
  assert rel(got, base) > 1e-3  # the adapters change the model
  assert rel(got, want) < RTOL


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_adapter_gradients_equal_gradients_through_merge(case):
  _, _, _, adapted, args = case
  graphdef, lora, rest = nnx.split(adapted, delora_jax.nnx.DeloraParam, ...)

  def loss(lora, merged):
    m = fresh(nnx.merge(graphdef, lora, rest, copy=True))
    if merged:
      m = fresh(delora_jax.nnx.merge(m))
    return jnp.mean(call(m, args) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g, g_ref = grad(lora, False), grad(lora, True)
  got = dict(jax.tree_util.tree_leaves_with_path(g))
  pairs = [(jax.tree_util.keystr(p), got[p], b) for p, b in jax.tree_util.tree_leaves_with_path(g_ref)]
  assert len(pairs) == 3 * len(delora_jax.adapters(adapted))  # a, b, λ of each
  # float32: a small λ gradient (a sum of cancelling terms) differs by up to ~1.2e-5 between the two
  # computations (gemma 4, tests/test_gemma4.py, shows with float64 that this is rounding, both sides
  # alike), so the 1e-5 bound is on the whole gradient; per leaf 1e-4 still catches a wrong adapter.
  for p, a, b in pairs:
    assert rel(a, b) < 10 * RTOL, p
  flat = lambda i: np.concatenate([np.ravel(np.asarray(x[i], np.float64)) for x in pairs])  # noqa: E731
  assert rel(flat(1), flat(2)) < RTOL


def train_step_fn(graphdef, rest, opt, args):
  """A train step in MaxText's own style (split, merge inside jax.value_and_grad, trace-state reset)."""
  tok = args[0]

  def step(lora, opt_state):
    def loss(lora):
      # copy=True: MaxText's scan writes its non-Param state (the frozen w_norm among it) back into
      # the model it runs; a merge sharing `rest`'s Variables would leak the grad trace's values.
      logits = call(fresh(nnx.merge(graphdef, lora, rest, copy=True)), args)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]).mean()

    value, g = jax.value_and_grad(loss)(lora)
    upd, opt_state = opt.update(g, opt_state, lora)
    return optax.apply_updates(lora, upd), opt_state, value

  return step


def test_train_step_lowers_the_loss(case):
  _, _, _, adapted, args = case
  graphdef, lora, rest = nnx.split(adapted, delora_jax.nnx.DeloraParam, ...)
  opt = delora_jax.optimizer(optax.adam, learning_rate=1e-2)
  step = jax.jit(train_step_fn(graphdef, rest, opt, args))
  state, losses = opt.init(lora), []
  for _ in range(4):
    lora, state, value = step(lora, state)
    losses.append(float(value))
  assert losses[-1] < losses[0] - 1e-3, losses


def test_docs_maxtext_block_runs_as_written():
  """docs/real_models.md's MaxText block (the one starting '# MaxText') as pasted: its own tiny llama2,
  at MaxText's default (scanned) layers."""
  text = (ROOT / "docs" / "real_models.md").read_text()
  (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if b.startswith("# MaxText")]
  ns: dict = {}
  exec(compile(block, "docs/real_models.md[MaxText]", "exec"), ns)  # noqa: S102 (our docs)
  assert len(delora_jax.adapters(ns["adapted"])) == 7  # one stacked kernel per projection
  assert np.isfinite(float(ns["loss"]))


# --- the drop-in for MaxText's LoRA hook (delora_jax.integrations.maxtext) -----------------------

from delora_jax.integrations import maxtext as dl_maxtext  # noqa: E402


@pytest.fixture(scope="module", params=[True, False], ids=["scanned", "unrolled"])
def dropin(request):
  """The drop-in applied as MaxText's SFT setup applies its hook, on the in-process mesh (FSDP over
  all 8 CPU devices: MaxText's default ici_fsdp_parallelism=-1), and MaxText's own LoRA beside it."""
  from flax.linen import partitioning  # noqa: PLC0415
  from maxtext.utils import lora_utils  # noqa: PLC0415

  scan = request.param
  model, _ = build(scan)
  cfg = config(scan, lora={"enable_lora": True, "lora_rank": 8})
  mesh = maxtext_utils.get_mesh_from_config(cfg)
  with jax.set_mesh(mesh), partitioning.axis_rules(cfg.logical_axis_rules):
    adapted = dl_maxtext.apply_delora_to_model(model, mesh, cfg, lam=2.0, init="random", key=jax.random.key(3))
    with warnings.catch_warnings():  # qwix (the baseline) uses flax APIs flax deprecates
      warnings.simplefilter("ignore", DeprecationWarning)
      lora = lora_utils.apply_lora_to_model(model, mesh, cfg)
  return scan, cfg, mesh, model, adapted, lora


def _lora_modules(model):
  return sorted({"/".join(map(str, p[:-1])) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.LoRAParam)})


def test_dropin_adapts_the_modules_maxtext_lora_adapts_all_factorised(dropin):
  scan, _, _, model, adapted, lora = dropin
  ads = delora_jax.adapters(adapted)
  assert sorted(ads) == kernel_paths(scan)
  # The same modules as MaxText's own LoRA (its default lora_module_path for llama2), trained the same
  # way: every trainable is an nnx.LoRAParam (DeloraParam), a, b and λ of each kernel.
  assert sorted(p.rpartition("/")[0] for p in ads) == _lora_modules(lora)
  trainable = nnx.state(adapted, nnx.LoRAParam)
  assert len(jax.tree.leaves(trainable)) == 3 * len(ads)
  assert all(
    isinstance(v, delora_jax.nnx.DeloraParam)
    for v in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
  )
  args = inputs()
  assert delora_jax.explain(adapted, *args, enable_dropout=False)["factorised"] == kernel_paths(scan)
  got, want = call(adapted, args), call(delora_jax.nnx.merge(adapted), args)
  assert rel(got, call(model, args)) > 1e-3 and rel(got, want) < RTOL


def test_dropin_shards_each_adapter_like_its_kernel_not_replicated(dropin):
  from flax.linen import logical_to_mesh_axes  # noqa: PLC0415

  scan, cfg, mesh, _, adapted, lora = dropin
  n = mesh.size
  assert n == 8 and mesh.shape["fsdp"] == 8
  for path, owner, name in delora_jax._nnx.adapted(adapted):
    kernel_names = vars(owner)[name].get_metadata()["out_sharding"]
    ad = vars(owner)[name + "_delora"]
    a, b = vars(ad)["a"], vars(ad)["b"]
    # Kernels split along their input axis (embed -> fsdp): a takes that axis. wo's and out's inputs
    # (mlp, heads) are unsplit on this mesh, so a and b both take the split output axis (FSDP rule).
    in_name = kernel_names[0] if not path.endswith(("/out/kernel", "/wo/kernel")) else kernel_names[-1]
    for var, field in ((a, "a"), (b, "b"), (vars(ad)["w_norm"], "w_norm")):
      x, names = var.get_value(), var.get_metadata()["out_sharding"]
      assert len(names) == x.ndim, (path, field, names)
      # The array sits where its logical names put it under MaxText's rules...
      want = jax.sharding.NamedSharding(mesh, logical_to_mesh_axes(names, cfg.logical_axis_rules))
      assert x.sharding.is_equivalent_to(want, x.ndim), (path, field, x.sharding, want)
      # ... and it is split over the FSDP axis, one eighth per device (MaxText's LoRA: all of it on each).
      shard = x.addressable_shards[0].data
      assert shard.size * n == x.size, (path, field, x.sharding.spec)
      if scan:  # MaxText's scan finds the layer axis by name and position
        assert "layers" in names, (path, field, names)
    if in_name is not None:
      assert a.get_metadata()["out_sharding"][0] == in_name, path  # a follows the kernel's input axis
  for v in jax.tree.leaves(nnx.state(lora, nnx.LoRAParam)):  # the baseline replicates its adapters
    assert v.sharding.is_fully_replicated


def test_dropin_can_replicate_the_adapters_as_maxtext_lora_does(dropin):
  """shard_adapters=False: every adapter array whole on each chip (MaxText's LoRA placement), the same
  adapters and outputs as the sharded drop-in's."""
  from flax.linen import partitioning  # noqa: PLC0415

  scan, cfg, mesh, model, adapted, _ = dropin
  with jax.set_mesh(mesh), partitioning.axis_rules(cfg.logical_axis_rules):
    replicated = dl_maxtext.apply_delora_to_model(
      model, mesh, cfg, lam=2.0, init="random", key=jax.random.key(3), shard_adapters=False
    )
  for v in jax.tree.leaves(nnx.state(replicated, (delora_jax.nnx.DeloraParam, delora_jax.nnx.DeloraConst))):
    assert v.sharding.is_fully_replicated, v.sharding
  for p, ad in delora_jax.adapters(adapted).items():
    for f in ("a", "b", "lam"):
      np.testing.assert_array_equal(delora_jax.adapters(replicated)[p][f], ad[f])
  args = inputs()
  assert rel(call(replicated, args), call(adapted, args)) < RTOL


def test_dropin_declares_the_layer_axis_where_heads_equal_layers():
  """As many layers as heads (Llama-3 8B: 32 and 32): the scanned out kernel (heads, layers, head_dim, embed)
  cannot show which axis its scan slices; the drop-in declares it from MaxText's param_scan_axis metadata."""
  model, _ = build(True, base_num_query_heads=LAYERS, base_num_kv_heads=LAYERS, head_dim=32)
  cfg = config(
    True, base_num_query_heads=LAYERS, base_num_kv_heads=LAYERS, head_dim=32, lora={"enable_lora": True, "lora_rank": 4}
  )
  adapted = dl_maxtext.apply_delora_to_model(model, None, cfg, lam=2.0, init="random")
  out = delora_jax._nnx.kernels(adapted)["decoder/layers/self_attention/out/kernel"]
  assert out.w.shape == (LAYERS, LAYERS, 32, EMBED) and out.stack == (1,)
  args = inputs()
  assert delora_jax.explain(adapted, *args, enable_dropout=False)["merged"] == []
  assert rel(call(adapted, args), call(delora_jax.nnx.merge(adapted), args)) < RTOL


def test_dropin_on_maxtext_abstract_model_for_pod_plans():
  """MaxText's abstract model (create_nnx_abstract_model: ShapeDtypeStructs with its shardings): the adapters
  come back abstract, sharded as on the concrete model (benchmarks/maxtext_scale.py plans 8B/70B this way)."""
  from flax.linen import partitioning  # noqa: PLC0415

  cfg = config(True, lora={"enable_lora": True, "lora_rank": 8})
  mesh = maxtext_utils.get_mesh_from_config(cfg)
  with jax.set_mesh(mesh), partitioning.axis_rules(cfg.logical_axis_rules):
    _, abstract = model_creation_utils.create_nnx_abstract_model(cfg, mesh)
    adapted = dl_maxtext.apply_delora_to_model(abstract, mesh, cfg)
  leaves = jax.tree.leaves(nnx.state(adapted, delora_jax.nnx.DeloraParam))
  assert len(leaves) == 3 * len(PROJ) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  a = adapted.decoder.layers.mlp.wi_0.kernel_delora.a.get_value()
  assert a.shape == (EMBED, LAYERS, 8) and a.sharding.shard_shape(a.shape)[0] == EMBED // mesh.shape["fsdp"]


def test_dropin_trains_with_delora_optimizer_on_the_mesh(dropin):
  _, cfg, mesh, _, adapted, _ = dropin
  from flax.linen import partitioning  # noqa: PLC0415

  args = inputs(b=8)  # the batch split over the 8 devices as MaxText splits it
  graphdef, lora, rest = nnx.split(adapted, delora_jax.nnx.DeloraParam, ...)
  opt = delora_jax.optimizer(optax.adamw, learning_rate=1e-2, weight_decay=0.1)
  with jax.set_mesh(mesh), partitioning.axis_rules(cfg.logical_axis_rules):
    step = jax.jit(train_step_fn(graphdef, rest, opt, args))
    state, losses = opt.init(lora), []
    lam0 = [
      float(jnp.ravel(x)[0]) for p, x in jax.tree_util.tree_leaves_with_path(lora) if "lam" in jax.tree_util.keystr(p)
    ]
    for _ in range(3):
      lora, state, value = step(lora, state)
      losses.append(float(value))
  assert losses[-1] < losses[0] - 1e-3, losses
  before = jax.tree.leaves(nnx.state(adapted, delora_jax.nnx.DeloraParam))
  after = jax.tree.leaves(lora)
  assert len(after) == len(before)
  for x, y in zip(after, before):  # the step keeps the adapters where they were
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)
  assert lam0 and all(v == 2.0 for v in lam0)


def test_dropin_off_returns_the_model_itself():
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  cfg = config(True)  # lora.enable_lora is False by default
  assert dl_maxtext.apply_delora_to_model(model, None, cfg) is model


class _NoAxes(nnx.Module):
  """A decoder-like module whose kernel declares no logical axes."""

  def __init__(self):
    self.proj = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    self.embed = nnx.Embed(VOCAB, 4, rngs=nnx.Rngs(1))

  def __call__(self, decoder_input_tokens, decoder_positions, enable_dropout=False):
    return self.proj(self.embed(decoder_input_tokens))


def _cfg(**lora):
  import types  # noqa: PLC0415

  base = dict(enable_lora=True, lora_rank=2, lora_module_path="proj", lora_weight_qtype=None)
  return types.SimpleNamespace(lora=types.SimpleNamespace(**{**base, **lora}), logical_axis_rules=())


def test_dropin_bad_input_is_a_clear_error():
  import types  # noqa: PLC0415

  model = _NoAxes()
  with pytest.raises(
    ValueError, match=r"`config` has no `lora.enable_lora` .* got a SimpleNamespace.*lora.enable_lora=True"
  ):
    dl_maxtext.apply_delora_to_model(model, None, types.SimpleNamespace())
  with pytest.raises(ValueError, match=r"`config.lora.lora_rank` must be a positive int .* got 0"):
    dl_maxtext.apply_delora_to_model(model, None, _cfg(lora_rank=0))
  with pytest.raises(ValueError, match=r"`config.lora.lora_weight_qtype` is 'nf4'"):
    dl_maxtext.apply_delora_to_model(model, None, _cfg(lora_weight_qtype="nf4"))
  with pytest.raises(
    ValueError, match=r"rules pattern delora_jax.Modules\('decoder/\('\) is not a valid regular expression"
  ):
    dl_maxtext.apply_delora_to_model(model, None, _cfg(lora_module_path="decoder/("))
  with pytest.raises(ValueError, match=r"Modules\('decoder/nothing'\).*proj"):
    dl_maxtext.apply_delora_to_model(model, None, _cfg(lora_module_path="decoder/nothing"))
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
  with pytest.raises(ValueError, match=r"proj/kernel: this kernel carries no logical axes .* mesh=None"):
    dl_maxtext.apply_delora_to_model(model, mesh, _cfg())
  adapted = dl_maxtext.apply_delora_to_model(model, None, _cfg())  # one device: nothing to shard
  assert sorted(delora_jax.adapters(adapted)) == ["proj/kernel"]
  # to_maxtext_lora: the LoRA model's alpha and rank must be given and match.
  with pytest.raises(ValueError, match=r"`config.lora.lora_alpha` must be a positive number .* got None"):
    dl_maxtext.to_maxtext_lora(adapted, _cfg())
  with pytest.raises(ValueError, match=r"proj/kernel: its update is a rank-2 LoRA, .* is 4. .*lora_rank=2"):
    dl_maxtext.to_maxtext_lora(adapted, _cfg(lora_rank=4, lora_alpha=8.0))
  got = dl_maxtext.to_maxtext_lora(adapted, _cfg(lora_alpha=4.0))
  f = delora_jax.to_lora(adapted)["proj/kernel"]
  assert sorted(got) == ["proj/kernel_lora_a", "proj/kernel_lora_b"]
  np.testing.assert_allclose(got["proj/kernel_lora_b"] * 2.0, f["lora_b"], rtol=1e-7)  # alpha / r = 2


def _kernels_from_lora_folder(folder, model):
  """The base kernels plus the updates a LoRA server reads from ``folder`` (``x @ A.T @ B.T`` scaled by
  ``lora_alpha / r``), each put where its module sits: {kernel path: array}."""
  import json  # noqa: PLC0415

  from safetensors.numpy import load_file  # noqa: PLC0415

  cfg = json.loads((pathlib.Path(folder) / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] and not cfg["rank_pattern"]
  tensors = load_file(str(pathlib.Path(folder) / "adapter_model.safetensors"))
  out = {}
  for path, k in delora_jax._nnx.kernels(model).items():
    w = np.asarray(k.w, np.float64)
    stacks, ins, outs = delora_jax._kernel.layout_positions(k.stack, k.in_axes, k.out_axes, w.ndim)
    layers = [None] if not stacks else range(w.shape[stacks[0]])
    name = path.replace("decoder/layers/", "model.layers.{}.").replace("/kernel", "").replace("/", ".")
    for i in layers:
      pre = "base_model.model." + name.format(i)
      a, b = tensors[pre + ".lora_A.weight"].astype(np.float64), tensors[pre + ".lora_B.weight"].astype(np.float64)
      d = (b @ a).T  # (in, out), scaling alpha / r = 1
      rest = [p for p in range(w.ndim) if p not in stacks]
      d = d.reshape([w.shape[p] for p in ins] + [w.shape[p] for p in outs])
      d = np.transpose(d, np.argsort(np.argsort([*ins, *outs])))  # to the kernel's own axis order
      idx = tuple(i if p in stacks else slice(None) for p in range(w.ndim))
      assert sorted([*ins, *outs]) == rest
      w[idx] += d
    out[path] = w
  return out


# MaxText's data pipeline and loss use APIs jax and flax deprecate (`with mesh:`, `nnx.State`): its code, run
# end to end here; our code's warnings are errors in the other tests of this file.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_docs_maxtext_recipe_trains_checkpoints_merges_and_exports_exact_lora(tmp_path, monkeypatch):
  """docs/maxtext.md's recipe as pasted (MaxText's model, synthetic data and loss through the drop-in),
  then: the resumed adapters are the trained ones, the merged MaxText model and the exported PEFT LoRA
  folder (what a LoRA server reads) give the DeLoRA model's logits (float32, rel 1e-5)."""
  monkeypatch.chdir(tmp_path)
  text = (ROOT / "docs" / "maxtext.md").read_text()
  (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if b.startswith("# MaxText recipe")]
  ns: dict = {}
  exec(compile(block, "docs/maxtext.md[recipe]", "exec"), ns)  # noqa: S102 (our docs)
  model, merged, folder, lora = ns["model"], ns["merged"], ns["folder"], ns["lora"]
  assert np.isfinite(float(ns["loss"]))
  assert len(delora_jax.adapters(model)) == 7  # one stacked kernel per projection (scan_layers=True)
  for x, y in zip(jax.tree.leaves(nnx.state(model, delora_jax.nnx.DeloraParam)), jax.tree.leaves(lora)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # resumed == trained
  args = inputs()
  got = call(model, args)
  assert rel(got, call(merged, args)) < RTOL
  served = delora_jax.nnx.unwrap(model)
  for path, w in _kernels_from_lora_folder(folder, model).items():
    owner = served
    for part in path.split("/")[:-1]:
      owner = getattr(owner, part)
    vars(owner)["kernel"].set_value(jnp.asarray(w, jnp.float32))
  assert rel(call(served, args), got) < RTOL
  assert rel(call(delora_jax.nnx.unwrap(model), args), got) > 1e-4  # the adapters changed the model
  # MaxText's own LoRA (qwix), of the recipe's rank and its config's lora_alpha, holding to_maxtext_lora's
  # parameters: the DeLoRA model's logits.
  from flax.linen import partitioning  # noqa: PLC0415
  from maxtext.utils import lora_utils  # noqa: PLC0415

  cfg, mesh = ns["config"], ns["mesh"]
  with jax.set_mesh(mesh), partitioning.axis_rules(cfg.logical_axis_rules):
    base = model_creation_utils.from_config(cfg, mesh=mesh, rngs=nnx.Rngs(params=0, dropout=1))
    maxtext_lora = lora_utils.apply_lora_to_model(base, mesh, cfg)
  held = dict(nnx.to_flat_state(nnx.state(maxtext_lora, nnx.LoRAParam)))
  params = ns["maxtext_lora"]
  assert sorted("/".join(map(str, p)) for p in held) == sorted(params)
  for p, var in held.items():
    x = params["/".join(map(str, p))]
    assert x.shape == var.get_value().shape, p
    var.set_value(jax.device_put(x, var.get_value().sharding))
  assert rel(call(maxtext_lora, args), got) < RTOL
