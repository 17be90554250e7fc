"""QDeLoRA: a base stored quantized (Rule(quantize=..., tile_size=...)), computed factorised."""

import dataclasses
import functools

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import delora_jax
from delora_jax import _quant
from tests import models, test_engine, test_stacked
from tests.helpers import REL, rel

SCHEMES = {  # id: (quantize, tile_size)
  "int8": ("int8", None),
  "int8_tile2": ("int8", 2),
  "int4": ("int4", None),
  "nf4_tile2": ("nf4", 2),
}
STORED = {"int8": jnp.int8, "int4": jnp.int4, "nf4": jnp.uint4}


def _kernel(shape=(16, 6), seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * 0.3


# ---------------------------------------------------------------- _quant


@pytest.mark.parametrize("tile", [None, 4], ids=["per_channel", "tile4"])
@pytest.mark.parametrize("scheme", list(STORED))
def test_quantize_dequantize_stores_values_and_scales_within_half_a_step(scheme, tile):
  w = _kernel((16, 6))
  q = _quant.quantize(w, scheme, (-2,), tile)
  assert q.values.dtype == STORED[scheme] and q.values.shape == (16, 6)
  assert q.scale.dtype == jnp.float32 and q.scale.shape == ((1, 6) if tile is None else (4, 6))
  back = _quant.dequantize(q)
  assert back.dtype == w.dtype and back.shape == w.shape
  # Each entry is within half a step of its bucket: scale/2 for ints; half the widest NF4 gap for nf4.
  step = 0.5 if scheme != "nf4" else float(np.max(np.diff(_quant.NF4))) / 2
  scale = np.repeat(np.asarray(q.scale), 16 // q.scale.shape[0], axis=0)
  # (plus float32 rounding of the product, up to 128 steps in magnitude: 128 eps).
  assert np.all(np.abs(np.asarray(back - w)) <= (step + 128 * np.finfo(np.float32).eps) * scale)
  # The largest entry of each block is represented (absmax scaling): the error is not a clip.
  assert rel(back, w) < {"int8": 0.01, "int4": 0.15, "nf4": 0.15}[scheme]


def test_quantize_n_d_kernel_tiles_its_innermost_input_axis():
  w = _kernel((2, 4, 8))  # (heads, head_dim, embed): in_axes (0, 1)
  q = _quant.quantize(w, "int8", (0, 1), tile=2)
  assert q.scale.shape == (1, 2, 8) and q.in_axes == (-3, -2)
  np.testing.assert_allclose(_quant.dequantize(q), w, atol=float(q.scale.max()) / 2 + 1e-7)


def test_zero_kernel_gets_unit_scales():
  q = _quant.quantize(jnp.zeros((4, 3)), "nf4", (-2,))
  assert np.all(np.asarray(q.scale) == 1.0) and not np.any(np.asarray(_quant.dequantize(q)))


def test_bf16_kernel_dequantizes_to_bf16():
  q = _quant.quantize(_kernel().astype(jnp.bfloat16), "int4", (-2,))
  assert q.dtype == jnp.bfloat16 and _quant.dequantize(q).dtype == jnp.bfloat16


# ---------------------------------------------------------------- Rule / wrap: bad input


@pytest.mark.parametrize(
  "kw, exc, words",
  [
    (dict(quantize="int3"), ValueError, ["`quantize`", "'int3'", "Rule(8, quantize='nf4')"]),
    (dict(quantize="fp8"), ValueError, ["`quantize`", "'fp8'", "('int8', 'int4', 'nf4')"]),
    (dict(tile_size=32), ValueError, ["`tile_size`=32", "without `quantize`", "quantize='int4', tile_size=32"]),
    (dict(quantize="nf4", tile_size=0), ValueError, ["`tile_size`", "positive int", "got 0"]),
    (dict(quantize="nf4", tile_size="32"), TypeError, ["`tile_size`", "'32'", "tile_size=32"]),
    (dict(quantize="nf4", tile_size=True), TypeError, ["`tile_size`", "True"]),
  ],
  ids=["unknown", "fp8", "tile_without_quantize", "tile_zero", "tile_str", "tile_bool"],
)
def test_rule_rejects_bad_quantize_arguments(kw, exc, words):
  with pytest.raises(exc) as e:
    delora_jax.Rule(8, **kw)
  for w in words:
    assert w in str(e.value)


def test_wrap_rejects_a_tile_that_does_not_divide_the_contracted_axis():
  params = {"dense": {"kernel": _kernel((12, 6))}}
  with pytest.raises(ValueError) as e:
    delora_jax.wrap(params, {"dense/kernel": delora_jax.Rule(2, quantize="int4", tile_size=8)})
  msg = str(e.value)
  assert "dense/kernel" in msg and "tile_size=8" in msg and "size 12" in msg and "tile_size=6" in msg


def test_wrap_rejects_quantizing_a_kernel_that_is_not_floating():
  params = {"dense": {"kernel": jnp.ones((12, 6), jnp.int8)}}  # e.g. already quantized by qwix
  with pytest.raises(TypeError) as e:
    delora_jax.wrap(params, {"dense/kernel": delora_jax.Rule(2, quantize="int8")})
  assert "dense/kernel" in str(e.value) and "int8" in str(e.value) and "float" in str(e.value)


# ---------------------------------------------------------------- wrap / split / merge / unwrap


def _params():
  return {"a": {"kernel": _kernel((16, 6), 1), "bias": jnp.zeros(6)}, "b": {"kernel": _kernel((6, 4), 2)}}


def _rule(scheme_id, **kw):
  quantize, tile = SCHEMES[scheme_id]
  return delora_jax.Rule(2, 3.0, init="random", quantize=quantize, tile_size=tile, **kw)


@pytest.mark.parametrize("sid", list(SCHEMES))
def test_wrap_keeps_no_float_copy_and_the_full_precision_update(sid):
  params = _params()
  tree = delora_jax.wrap(params, {".*kernel": _rule(sid)})
  full = delora_jax.wrap(params, {".*kernel": delora_jax.Rule(2, 3.0, init="random")})
  for p in ("a", "b"):
    q = tree[p]["kernel"].w
    assert isinstance(q, _quant.QArray) and q.values.dtype == STORED[q.scheme]
  # No leaf of the tree is a float array of a kernel's shape (no full-precision copy).
  kernel_shapes = {(16, 6), (6, 4)}
  for x in jax.tree.leaves(tree):
    assert not (tuple(x.shape) in kernel_shapes and jnp.issubdtype(x.dtype, jnp.floating))
  # w_norm from the full-precision kernel: ΔW is the full-precision base's, bit for bit.
  for p in ("a", "b"):
    np.testing.assert_array_equal(tree[p]["kernel"].w_norm, full[p]["kernel"].w_norm)
  for p, d in delora_jax.delta(full).items():
    np.testing.assert_array_equal(delora_jax.delta(tree)[p], d)
  # merge: plain float kernels, the dequantized base + ΔW in the original dtype; unwrap: the dequantized base.
  merged, base = delora_jax.merge(tree), delora_jax.unwrap(tree)
  for p in ("a", "b"):
    deq = _quant.dequantize(tree[p]["kernel"].w)
    assert merged[p]["kernel"].dtype == jnp.float32 and base[p]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(base[p]["kernel"], deq)
    np.testing.assert_array_equal(merged[p]["kernel"], deq + delora_jax.delta(tree)[f"{p}/kernel"])
  np.testing.assert_array_equal(delora_jax.merge(tree, safe=True)["a"]["kernel"], merged["a"]["kernel"])
  # split: the quantized base is frozen; combine restores the tree.
  trainable, frozen = delora_jax.split(tree)
  assert isinstance(frozen["a"]["kernel"].w, _quant.QArray) and trainable["a"]["kernel"].w is None
  assert not any(jnp.issubdtype(x.dtype, jnp.integer) for x in jax.tree.leaves(trainable))
  assert jax.tree.structure(delora_jax.combine(trainable, frozen)) == jax.tree.structure(tree)
  assert set(delora_jax.diagnostics(tree)["kernels"]) == {"a/kernel", "b/kernel"}


def test_bf16_base_merges_and_unwraps_to_bf16():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  tree = delora_jax.wrap(params, {".*kernel": _rule("nf4_tile2")})
  assert tree["a"]["kernel"].w.dtype == jnp.bfloat16
  assert delora_jax.merge(tree)["a"]["kernel"].dtype == jnp.bfloat16
  assert delora_jax.unwrap(tree)["a"]["kernel"].dtype == jnp.bfloat16


def test_abstract_wrap_gives_quantized_shapes_and_shardings():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
  params = {"kernel": jax.ShapeDtypeStruct((64, 32), jnp.bfloat16, sharding=sh)}
  tree = delora_jax.wrap(params, {"kernel": delora_jax.Rule(4, quantize="nf4", tile_size=16)})
  q = tree["kernel"].w
  assert (q.values.shape, q.values.dtype, q.values.sharding) == ((64, 32), jnp.uint4, sh)
  assert (q.scale.shape, q.scale.dtype) == ((4, 32), jnp.float32)
  assert q.scale.sharding.spec == jax.sharding.PartitionSpec("data", "model")  # 4 tiles over data=2
  assert jax.tree.leaves(delora_jax.shardings(tree)) == [x.sharding for x in jax.tree.leaves(tree)]


def test_adapter_checkpoint_reloads_and_refuses_a_differently_quantized_base(tmp_path):
  params = _params()
  tree = delora_jax.wrap(params, {".*kernel": _rule("int8")})
  delora_jax.save_adapters(tmp_path / "ck", tree)
  assert not any("values" in f.name or "scale" in f.name for f in (tmp_path / "ck").rglob("*"))
  fresh = delora_jax.wrap(params, {".*kernel": _rule("int8")}, key=jax.random.key(9))
  back = delora_jax.load_adapters(tmp_path / "ck", fresh)
  np.testing.assert_array_equal(back["a"]["kernel"].a, tree["a"]["kernel"].a)
  for other in (_rule("nf4_tile2"), delora_jax.Rule(2, 3.0, init="random")):
    with pytest.raises(ValueError, match=r"a/kernel: base stored (int8|unquantized) in the checkpoint"):
      delora_jax.load_adapters(tmp_path / "ck", delora_jax.wrap(params, {".*kernel": other}))


# ---------------------------------------------------------------- apply (Linen), factorised


class _Layers(nn.Module):
  """Every contraction form on small kernels: flax Dense and DenseGeneral (fused), an N-D DenseGeneral over
  two input axes, nn.Einsum and a custom jnp.einsum (the generic path, kernel as rhs), lax.dot_general with the
  kernel as lhs."""

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 4), name="query")(x)  # kernel (4, 2, 4)
    y = nn.DenseGeneral(4, axis=(-2, -1), name="out")(h)  # kernel (2, 4, 4): two input axes
    w = self.param("kernel", models.INIT, (4, 2, 3))
    e = jnp.einsum("bi,iho->bho", y, w).reshape(x.shape[0], 6)
    v = self.param("lhs", models.INIT, (4, 4))
    z = jax.lax.dot_general(v, y, (((0,), (1,)), ((), ())))  # (4, batch): the kernel as lhs
    e = nn.Einsum((10, 6), "bi,io->bo", name="einsum")(jnp.concatenate([e, z.T], axis=-1))
    return nn.Dense(3, name="dense")(jnp.tanh(e))


def _layer_rules():
  r = functools.partial(delora_jax.Rule, 2, 3.0, init="random")
  return {
    "query/kernel": r(in_axes=0),
    "out/kernel": r(out_axes=-1),
    "kernel": r(in_axes=0),
    "lhs": r(),
    "einsum/kernel": r(),
    "dense/kernel": r(),
  }


def _quantized_rules(rules, sid):
  quantize, tile = SCHEMES[sid]
  return {p: dataclasses.replace(r, quantize=quantize, tile_size=tile) for p, r in rules.items()}


@pytest.mark.parametrize("sid", list(SCHEMES))
def test_apply_and_gradients_equal_the_merged_model(sid):
  """Outputs to REL; gradients (int8 per channel: output-side scales; nf4 tiled: dequantized) with
  test_apply.py's tolerances: a and b relative 1e-4, λ (whose gradient <G, ΔW> / λ cancels) 1e-5 of
  ||G|| ||ΔW|| / |λ|, G the merged kernel's gradient."""
  model, x = _Layers(), jax.random.normal(jax.random.key(1), (3, 4))
  tree = delora_jax.wrap(model.init(jax.random.key(0), x)["params"], _quantized_rules(_layer_rules(), sid))
  trainable, frozen = delora_jax.split(tree)

  def loss(t):
    y = delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x, strict=True)
    return jnp.mean(y**2), y

  def plain_loss(p):
    y = model.apply({"params": p}, x)
    return jnp.mean(y**2), y

  def merged_loss(t):
    return plain_loss(delora_jax.merge(delora_jax.combine(t, frozen)))

  @jax.jit
  def merged_grads(t):  # the adapters' gradients and G, the merged kernels' (one program)
    p, pull = jax.vjp(lambda t: delora_jax.merge(delora_jax.combine(t, frozen)), t)
    g_p, y = jax.grad(plain_loss, has_aux=True)(p)
    return pull(g_p)[0], y, g_p

  if sid == "int8":  # every kernel's int values enter its dot as they are (fused Dense and the generic path)
    assert sum(jnp.int8 in d for d in _dots(jax.make_jaxpr(loss)(trainable).jaxpr, dtypes=True)) == 6
  if sid in ("int4", "int8_tile2"):  # the dequantized path nf4_tile2 differentiates: outputs only
    assert rel(jax.jit(loss)(trainable)[1], jax.jit(merged_loss)(trainable)[1]) < REL
    return
  gf, y = jax.jit(jax.grad(loss, has_aux=True))(trainable)
  gm, y_merged, g_w = merged_grads(trainable)
  assert rel(y, y_merged) < REL
  gfs, gms = delora_jax._tree.kernels(gf), delora_jax._tree.kernels(gm)
  g_w = flax.traverse_util.flatten_dict(g_w, sep="/")
  dws = delora_jax.delta(tree)
  for p, k in delora_jax._tree.kernels(tree).items():
    assert rel(gfs[p].a, gms[p].a) < 1e-4 and rel(gfs[p].b, gms[p].b) < 1e-4, p
    scale = np.linalg.norm(np.asarray(g_w[p], np.float64)) * np.linalg.norm(dws[p]) / abs(float(k.lam))
    assert abs(float(gfs[p].lam) - float(gms[p].lam)) < 1e-5 * scale, p


def _dots(jaxpr, dtypes: bool = False) -> list:
  """Output shapes (or operand dtypes) of every dot_general in ``jaxpr`` and its sub-jaxprs."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(v.aval.dtype for v in eqn.invars) if dtypes else tuple(eqn.outvars[0].aval.shape))
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          out += _dots(getattr(sub, "jaxpr", sub))
  return out


@pytest.mark.parametrize("sid", list(SCHEMES))
def test_factorised_step_forms_no_dense_update_or_kernel_gradient(sid):
  """No dot_general of the step yields a kernel-shaped (in, out) array: neither ΔW = u @ v nor the kernel's
  gradient x^T dy (the dequantized 4-bit base is an elementwise product, not a dot). int8 per channel: the int
  values enter the base's dot as they are."""
  n_in, n_out = 24, 40
  model = nn.Sequential([nn.Dense(n_out), jnp.tanh, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (64, n_in))
  tree = delora_jax.wrap(model.init(jax.random.key(1), x)["params"], {"layers_0/kernel": _rule(sid)})
  trainable, frozen = delora_jax.split(tree)

  def step(t, frozen, x):
    return jax.grad(lambda t: jnp.mean(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x) ** 2))(t)

  jaxpr = jax.make_jaxpr(step)(trainable, frozen, x).jaxpr
  shapes = _dots(jaxpr)
  assert shapes and (n_in, n_out) not in shapes and (n_out, n_in) not in shapes
  merged = jax.make_jaxpr(
    jax.grad(lambda t: jnp.mean(model.apply({"params": delora_jax.merge(delora_jax.combine(t, frozen))}, x) ** 2))
  )(trainable).jaxpr
  assert (n_in, n_out) in _dots(merged)  # the control does form ΔW
  # int8 per channel: the int values are an operand of the base's dot as they are (XLA:CPU then converts them
  # to f32 in a transient buffer, having no int8 x f32 dot; GPU/TPU fuse the convert into the dot).
  assert any(jnp.int8 in d for d in _dots(jaxpr, dtypes=True)) == (sid == "int8")


def _bf16_mlp():
  return nn.Sequential([nn.Dense(8, dtype=jnp.bfloat16), jnp.tanh, nn.Dense(3, dtype=jnp.bfloat16)])


WHERE = {  # id: (model, input shape, full-precision rules, quantize, tile_size, relative tolerance)
  "conv-nf4": (
    functools.partial(nn.Conv, 3, (2, 2)),
    (1, 4, 4, 2),
    lambda: {"kernel": _R(out_axes=-1)},
    "nf4",
    None,
    REL,
  ),
  "scan-nf4": (models.Scanned, (2, 3, 4), lambda: {"layers/kernel": _R(stack_axes=1)}, "nf4", 2, REL),
  "scan-int8": (models.Scanned, (2, 3, 4), lambda: {"layers/kernel": _R(stack_axes=1)}, "int8", None, REL),
  # bf16 compute on both sides; they round differently: 4 bf16 eps (2^-8).
  "bf16-int8": (_bf16_mlp, (4, 6), lambda: {".*kernel": _R()}, "int8", None, 4 * 2**-8),
}


def _R(**kw):  # noqa: N802
  return delora_jax.Rule(2, 4.0, init="random", **kw)


@pytest.mark.parametrize("case", list(WHERE))
def test_conv_scanned_and_bf16_compute_equal_the_merged_model(case):
  """Conv (the dequantized base, the factorised conv branch), nn.scan (leading stacked axes: each layer's slice of
  values and scales) and bf16 compute."""
  make, shape, rules, quantize, tile, tol = WHERE[case]
  model, x = make(), jax.random.normal(jax.random.key(1), shape)
  rules = {p: dataclasses.replace(r, quantize=quantize, tile_size=tile) for p, r in rules().items()}
  tree = delora_jax.wrap(model.init(jax.random.key(0), x)["params"], rules)
  y = jax.jit(lambda t: delora_jax.apply(model, {"params": t}, x, strict=True))(tree)
  assert rel(y, jax.jit(lambda t: model.apply({"params": delora_jax.merge(t)}, x))(tree)) < tol


# ---------------------------------------------------------------- stacked axes not leading, ragged_dot


@pytest.mark.parametrize("sid", ["int8", "nf4_tile2"])
def test_linen_scan_over_a_stacked_axis_that_is_not_leading(sid):
  """nn.scan with the layer axis at 1 (MaxText's param_scan_axis): values and scales keep the layer axis where
  the kernel has it, each layer gets its slice of both; outputs equal the merged model's."""
  model, x = test_stacked.Scanned(1), jax.random.normal(jax.random.key(1), (3, 6))
  params = model.init(jax.random.key(0), x)["params"]
  tree = delora_jax.wrap(params, _quantized_rules(test_stacked.linen_rules(1, True), sid))
  q = tree["layers"]["proj"].w  # (in 8, layers 4, heads 2, head_dim 3)
  assert q.values.shape == (8, 4, 2, 3) and q.scale.shape == ((1, 4, 2, 3) if q.tile is None else (4, 4, 2, 3))
  y = jax.jit(lambda t: delora_jax.apply(model, {"params": t}, x, strict=True))(tree)
  assert rel(y, model.apply({"params": delora_jax.merge(tree)}, x)) < REL
  assert rel(y, model.apply({"params": params}, x)) > 1e-3


@pytest.mark.parametrize("sid", ["int8", "nf4_tile2"])
def test_ragged_dot_experts_on_a_quantized_base(sid):
  """MoE experts (stacked at 0) contracted by lax.ragged_dot: the dequantized experts plus the per-expert
  factorised branch; outputs and adapter gradients equal the merged model's."""
  model, (x, gs) = test_engine.RaggedMoE(), test_engine._moe_inputs()
  params = model.init(jax.random.key(0), x, gs)["params"]
  tree = delora_jax.wrap(params, {"experts": _rule(sid, stack_axes=1)})
  assert isinstance(tree["experts"].w, _quant.QArray)
  y = delora_jax.apply(model, {"params": tree}, x, gs, strict=True)
  assert rel(y, model.apply({"params": delora_jax.merge(tree)}, x, gs)) < REL
  assert delora_jax.explain(model, {"params": tree}, x, gs)["factorised"] == ["experts"]
  test_engine.moe_grads_equal(model, tree, x, gs)


# ---------------------------------------------------------------- NNX


class _NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(16, 8, rngs=rngs)  # the fused nnx.Linear path
    self.proj = models.LaxDot((8, 4), rngs=rngs)  # the generic path (lax.dot_general on the kernel)

  def __call__(self, x):
    return self.proj(jnp.tanh(self.up(x)))


@pytest.mark.parametrize("sid", ["int8", "int4", "nf4_tile2"])
def test_nnx_model_stores_its_base_quantized_and_trains_factorised(sid, tmp_path):
  model, x = _NnxMLP(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (3, 16))
  adapted = delora_jax.nnx.wrap(model, {".*kernel": _rule(sid)})
  full = delora_jax.nnx.wrap(model, {".*kernel": delora_jax.Rule(2, 3.0, init="random")})
  # The Variables hold values and scales; no float copy of a kernel anywhere in the model; the given model unchanged.
  for path in ("up/kernel", "proj/kernel"):
    assert isinstance(delora_jax._nnx.kernels(adapted)[path].w, _quant.QArray)
  kernel_shapes = {(16, 8), (8, 4)}
  for leaf in jax.tree.leaves(nnx.state(adapted)):
    assert not (tuple(leaf.shape) in kernel_shapes and jnp.issubdtype(leaf.dtype, jnp.floating))
  assert not any(jnp.issubdtype(x.dtype, jnp.integer) for x in jax.tree.leaves(nnx.state(model)))
  for p, d in delora_jax.delta(full).items():  # w_norm from the full-precision kernels: the same ΔW
    np.testing.assert_array_equal(delora_jax.delta(adapted)[p], d)
  assert delora_jax.explain(adapted, x) == {"factorised": ["proj/kernel", "up/kernel"], "merged": [], "unused": []}
  merged = delora_jax.nnx.merge(adapted)
  assert merged.up.kernel.get_value().dtype == jnp.float32
  assert rel(nnx.jit(lambda m: m(x))(adapted), merged(x)) < REL
  # unwrap: the dequantized base.
  np.testing.assert_array_equal(
    delora_jax.nnx.unwrap(adapted).up.kernel.get_value(), _quant.dequantize(vars(adapted.up)["kernel"].get_value())
  )
  # Gradients reach a, b, λ only; they equal the merged model's (same tolerances as the Linen test).
  grad = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))), argnums=nnx.DiffState(0, delora_jax.nnx.DeloraParam))
  g = nnx.state(nnx.jit(grad)(adapted))
  assert {p[-1] for p, _ in nnx.to_flat_state(g)} == {"a", "b", "lam"}
  _, params = nnx.split(merged, nnx.Param)
  for path in ("up", "proj"):
    ad = getattr(adapted, path).kernel_delora
    k = delora_jax._nnx.kernels(adapted)[f"{path}/kernel"]

    def via_merge(a, b, lam, path=path, k=k):
      w = delora_jax._kernel.merged(dataclasses.replace(k, a=a, b=b, lam=lam))
      m = nnx.merge(*nnx.split(merged), copy=True)
      getattr(m, path).kernel.set_value(w)
      return jnp.sum(jnp.sin(m(x)))

    want = jax.jit(jax.grad(via_merge, argnums=(0, 1, 2)))(ad.a.get_value(), ad.b.get_value(), ad.lam.get_value())
    got = g[path]["kernel_delora"]
    assert rel(got["a"].get_value(), want[0]) < 1e-4 and rel(got["b"].get_value(), want[1]) < 1e-4, path
    assert rel(got["lam"].get_value(), want[2]) < 1e-4, path
  # A train step, then an adapter checkpoint round trip onto a fresh quantized wrap.
  opt = nnx.Optimizer(adapted, delora_jax.optimizer(optax.adam, learning_rate=1e-2), wrt=delora_jax.nnx.DeloraParam)

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(
      lambda m: jnp.mean((m(x) - 1.0) ** 2), argnums=nnx.DiffState(0, delora_jax.nnx.DeloraParam)
    )(m)
    opt.update(m, grads)
    return loss

  losses = [float(step(adapted, opt)) for _ in range(3)]
  assert losses[-1] < losses[0]
  delora_jax.save_adapters(tmp_path / "ck", adapted)
  back = delora_jax.load_adapters(tmp_path / "ck", delora_jax.nnx.wrap(model, {".*kernel": _rule(sid)}))
  np.testing.assert_array_equal(back(x), adapted(x))
  with pytest.raises(ValueError, match=r"base stored .* in the checkpoint"):
    delora_jax.load_adapters(tmp_path / "ck", full)


@pytest.mark.parametrize("sid", ["int8", "nf4_tile2"])
def test_nnx_scan_as_maxtext_does_on_a_quantized_base(sid):
  """MaxText's scanned decoder in small (Params stacked at param_scan_axis=1, the scan moves that axis first):
  the scan slices values and scales; every kernel factorised, outputs equal the merged model's."""
  model = test_stacked.Decoder(1, nnx.Rngs(0), head_dim=4)  # every input axis even (tile 2)
  x = jax.random.normal(jax.random.key(1), (2, 3, test_stacked.E))
  adapted = delora_jax.nnx.wrap(model, _quantized_rules(test_stacked.nnx_rules(1, True), sid))
  q = delora_jax._nnx.kernels(adapted)["layers/out/kernel"].w  # (heads, layers, head_dim, embed)
  assert q.values.shape == (test_stacked.H, test_stacked.L, 4, test_stacked.E) and q.stack == (1,)
  assert q.scale.shape == ((1, test_stacked.L, 1, test_stacked.E) if q.tile is None else (1, test_stacked.L, 2, 8))
  assert delora_jax.explain(adapted, x)["merged"] == []
  y = nnx.jit(lambda m: m(x))(adapted)
  assert rel(y, delora_jax.nnx.merge(adapted)(x)) < REL
  assert rel(y, model(x)) > 1e-3


@pytest.mark.parametrize("sid", ["int8", "nf4_tile2"])
def test_nnx_layouts_from_like(sid):
  """tunix's attention output projection (an einsum over two input axes, kernel (heads, head_dim, embed)), its
  layout inferred from an example input (like=): the scales are per output channel or per tile of the innermost
  input axis the model contracts; the kernel is factorised and the outputs equal the merged model's."""
  model = models.TunixEinsum("BTNH,NHD->BTD", (2, 4, 6), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 2, 4))
  adapted = delora_jax.nnx.wrap(model, {"w": _rule(sid)}, like=(x,))
  q = delora_jax._nnx.kernels(adapted)["w"].w
  assert q.input_axes == (0, 1) and q.scale.shape == ((1, 1, 6) if q.tile is None else (1, 2, 6))
  assert delora_jax.explain(adapted, x)["factorised"] == ["w"]
  assert rel(adapted(x), delora_jax.nnx.merge(adapted)(x)) < REL


@pytest.mark.parametrize("sid", ["int8", "nf4_tile2"])
def test_nnx_bf16_compute(sid):
  """nnx.Linear computing in bf16 (dtype=bfloat16, float32 params) on a quantized base: bf16 outputs, equal to
  the merged model's to bf16 rounding (4 bf16 eps, as the Linen bf16 case)."""
  model = nnx.Linear(16, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 16))
  adapted = delora_jax.nnx.wrap(model, {"kernel": _rule(sid)})
  y = adapted(x)
  assert y.dtype == jnp.bfloat16 and delora_jax.explain(adapted, x)["factorised"] == ["kernel"]
  assert rel(y, delora_jax.nnx.merge(adapted)(x)) < 4 * 2**-8
