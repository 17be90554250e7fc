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
