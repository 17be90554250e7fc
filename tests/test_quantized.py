"""QDeLoRA: a base stored quantized (Rule(quantize=..., tile_size=...)), computed factorised."""

import dataclasses
import functools

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import delora_jax
from delora_jax import _quant
from tests import models
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


def test_wrap_refuses_what_quantize_does_not_support_yet():
  stacked = {"k": _kernel((6, 2, 4))}  # (in, layers, out): stacked axis not leading
  with pytest.raises(ValueError, match=r"k: .*not supported yet with quantize="):
    delora_jax.wrap(stacked, {"k": delora_jax.Rule(2, stack_axes=(1,), quantize="int8")})
  from flax import nnx  # noqa: PLC0415

  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"kernel.*NNX.*not supported yet with quantize="):
    delora_jax.nnx.wrap(model, {"kernel": delora_jax.Rule(2, quantize="nf4")})


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
