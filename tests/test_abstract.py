"""Abstract parameters (``jax.ShapeDtypeStruct``): `wrap` and `shardings` allocate nothing,
derive the same shardings as for real arrays, and an AOT-compiled step accepts them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import delora_jax as dj

MESH = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(24)(nn.gelu(nn.Dense(64)(x)))


MODEL = MLP()
X = jnp.ones((32, 16))
SPECS = {
  "Dense_0": {"kernel": P("data", "model"), "bias": P("model")},
  "Dense_1": {"kernel": P("model", "data"), "bias": P()},
}
RULES = {".*kernel": dj.Rule(4, init="random")}


def abstract(specs=SPECS, mesh=MESH):
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), X)["params"]
  return {
    m: {n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, specs[m][n])) for n, s in leaves.items()}
    for m, leaves in shapes.items()
  }


def test_abstract_wrap_has_the_shapes_dtypes_and_shardings_of_the_real_one():
  params = MODEL.init(jax.random.key(0), X)["params"]
  base_sh = jax.tree.map(lambda s: NamedSharding(MESH, s), SPECS)
  real = dj.wrap(jax.device_put(params, base_sh), RULES)
  fake = dj.wrap(abstract(), RULES)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(fake))
  real_leaves, real_def = jax.tree.flatten(real)
  fake_leaves, fake_def = jax.tree.flatten(fake)
  assert real_def == fake_def
  for r, f in zip(real_leaves, fake_leaves):
    assert (r.shape, r.dtype) == (f.shape, f.dtype)
    assert r.sharding.is_equivalent_to(f.sharding, r.ndim), (r.sharding, f.sharding)
  # shardings() reads them from the tree when no base shardings are given.
  assert jax.tree.map(lambda s: s.spec, dj.shardings(fake)) == jax.tree.map(
    lambda s: s.spec, dj.shardings(real, base_sh)
  )


@pytest.mark.parametrize(
  "sharding", [None, SingleDeviceSharding(jax.devices()[0])], ids=["no-sharding", "single-device"]
)
def test_abstract_wrap_without_a_mesh(sharding):
  w = jax.ShapeDtypeStruct((3, 16, 8), jnp.bfloat16, sharding=sharding)  # stacked layers
  k = dj.wrap({"kernel": w}, {"kernel": dj.Rule(2, init="paper", stack_axes=1)})["kernel"]
  got = {
    f: (getattr(k, f).shape, getattr(k, f).dtype, getattr(k, f).sharding)
    for f in ("a", "b", "lam", "w_norm", "res_a", "res_b")
  }
  f32 = jnp.dtype("float32")
  assert got == {
    "a": ((3, 16, 2), f32, sharding),
    "b": ((3, 2, 8), f32, sharding),
    "lam": ((3,), f32, sharding),
    "w_norm": ((3, 16), f32, sharding),
    "res_a": ((3, 16, 2), f32, sharding),
    "res_b": ((3, 2, 8), f32, sharding),
  }


def test_abstract_step_compiles_with_the_derived_shardings():
  tree = dj.wrap(abstract(), RULES)
  trainable, frozen = dj.split(tree)
  train_sh, frozen_sh = dj.split(dj.shardings(tree))
  opt = dj.optimizer(optax.adamw, learning_rate=1e-3)
  batch = NamedSharding(MESH, P("data"))

  def step(trainable, opt_state, frozen, x):
    def loss(t):
      return jnp.mean(dj.apply(MODEL, {"params": dj.combine(t, frozen)}, x, strict=True) ** 2)

    grads = jax.grad(loss)(trainable)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  opt_state = jax.eval_shape(opt.init, trainable)
  x = jax.ShapeDtypeStruct(X.shape, X.dtype, sharding=batch)
  compiled = (
    jax.jit(
      step, in_shardings=(train_sh, None, frozen_sh, batch), out_shardings=(train_sh, None), donate_argnums=(0, 1)
    )
    .lower(trainable, opt_state, frozen, x)
    .compile()
  )
  assert compiled.memory_analysis().argument_size_in_bytes > 0
  a_sh = compiled.input_shardings[0][0]["Dense_0"]["kernel"].a
  assert a_sh.is_equivalent_to(NamedSharding(MESH, P("data", None)), 2)


def test_abstract_kernel_split_by_a_mesh_axis_that_does_not_divide_it():
  bad = {**SPECS, "Dense_1": {"kernel": P("model", "data"), "bias": P()}}
  params = abstract(bad)
  params["Dense_1"]["kernel"] = jax.ShapeDtypeStruct(
    (64, 6), jnp.float32, sharding=NamedSharding(MESH, P(None, "model"))
  )
  with pytest.raises(
    ValueError,
    match=r"Dense_1/kernel: mesh axes \('model',\) \(size 4\) do not "
    r"divide axis 1 \(size 6\)",
  ):
    dj.wrap(params, RULES)


def test_shardings_of_an_abstract_tree_without_shardings_names_the_leaf():
  params = abstract()
  params["Dense_0"]["bias"] = jax.ShapeDtypeStruct((64,), jnp.float32)  # no sharding
  tree = dj.wrap(params, RULES)
  with pytest.raises(
    ValueError,
    match=r"Dense_0/bias: `base_shardings` was not given.*has none\. "
    r"Build abstract params as jax\.ShapeDtypeStruct",
  ):
    dj.shardings(tree)
  dj.shardings(tree, jax.tree.map(lambda s: NamedSharding(MESH, s), SPECS))  # explicit: fine


def test_abstract_nnx_model_with_a_layer_axis_inside_its_kernels():
  """An abstract NNX model (nnx.eval_shape) scanned as MaxText scans (kernels stacked at axis 1, the adapters'
  frozen arrays layer-first): the adapters are abstract with the shapes of the concrete wrap's, and a kernel
  sharded over the layer axis gives its w_norm that split on its (moved) layer axis."""
  from flax import nnx  # noqa: PLC0415

  import delora_jax.nnx  # noqa: F401, PLC0415
  from tests import test_stacked  # noqa: PLC0415

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(4), ("layers",))
  rules = test_stacked.nnx_rules(1, True)
  concrete = dj.nnx.wrap(test_stacked.Decoder(1, nnx.Rngs(0), n_layers=4), rules)
  abstract = nnx.eval_shape(lambda: test_stacked.Decoder(1, nnx.Rngs(0), n_layers=4))
  gd, st = nnx.split(abstract)
  spec = lambda x: P(None, "layers") if x.ndim > 2 else P()  # noqa: E731
  st = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x))), st)
  adapted = dj.nnx.wrap(nnx.merge(gd, st), rules)
  got, want = dj._nnx.kernels(adapted), dj._nnx.kernels(concrete)
  for p, k in got.items():
    for f in ("a", "b", "lam", "w_norm"):
      assert isinstance(getattr(k, f), jax.ShapeDtypeStruct) and getattr(k, f).shape == getattr(want[p], f).shape
  ad = adapted.layers.query.kernel_delora
  assert ad.w_norm.get_value().shape == (4, test_stacked.E)  # stored layer-first in NNX
  assert ad.w_norm.get_value().sharding.spec == P("layers", None)
