"""Linen: modules delora_jax did not write, beyond the invariants of tests/test_invariants.py.

A declared layout the model contradicts is an error naming the path and the axes; jitted
modules and functions are traced once; a jitted train step on a custom einsum trains only
the adapters; a bfloat16 base kernel with float32 adapters stays within bf16 rounding.
"""

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import delora_jax
from tests import models
from tests.helpers import REL, R, init_and_wrap, rel


def custom(shape, fn, param="kernel"):
  return lambda: models.Custom(shape, fn, param)


# id: (model factory, input shape, rules, path, declared axes, contracted axes); axes of the
# stored kernel (the scanned one has a leading layer axis).
WRONG_LAYOUTS = {
  "out_in_declared_in_out": (
    custom((5, 4), lambda x, w: x @ w.T),
    (2, 3, 4),
    {"kernel": R(in_axes=0)},
    "kernel",
    (0,),
    (1,),
  ),
  "heads_embed_head_dim": (
    custom((2, 4, 3), lambda x, w: jnp.einsum("btd,hdk->bthk", x, w)),
    (2, 3, 4),
    {"kernel": R(in_axes=0)},
    "kernel",
    (0,),
    (1,),
  ),
  "named_w": (
    custom((4, 5), lambda x, w: jnp.einsum("bto,io->bti", x, w), "w"),
    (2, 3, 5),
    {"w": R()},
    "w",
    (0,),
    (1,),
  ),
  "scanned": (models.Scanned, (2, 3, 4), {"layers/kernel": R(stack_axes=1, in_axes=2)}, "layers/kernel", (2,), (1,)),
}


@pytest.mark.parametrize("name", list(WRONG_LAYOUTS), ids=list(WRONG_LAYOUTS))
def test_wrong_declared_layout_raises_naming_path_and_axes(name):
  make, shape, rules, path, declared, contracted = WRONG_LAYOUTS[name]
  model = make()
  x = jax.random.normal(jax.random.key(2), shape)
  _, tree = init_and_wrap(model, x, rules, key=None)
  for call in (delora_jax.apply, delora_jax.explain):
    with pytest.raises(ValueError) as info:
      call(model, {"params": tree}, x)
    msg = str(info.value)
    assert msg.startswith(f"{path}:"), msg
    assert re.search(rf"contracts this kernel over its axes {re.escape(str(contracted))}", msg), msg
    assert re.search(rf"declares input axes {re.escape(str(declared))}", msg), msg


# ---------------------------------------------------------------- tracing and compilation


TRACES = collections.Counter()


class CountingEinsum(nn.Module):
  """Counts how often its Python body runs (under jit: only when traced)."""

  tag: str

  @nn.compact
  def __call__(self, x):
    TRACES[self.tag] += 1
    return jnp.einsum("bti,io->bto", x, self.param("kernel", models.INIT, (x.shape[-1], 5)))


def _counting_setup(model):
  x = jax.random.normal(jax.random.key(2), (2, 3, 4))
  _, tree = init_and_wrap(model, x, {"kernel": R()}, key=None)
  return x, tree, model.apply({"params": delora_jax.merge(tree)}, x)


def test_nn_jit_module_is_traced_once_over_eager_apply_calls():
  model = nn.jit(CountingEinsum)("nn_jit")
  x, tree, want = _counting_setup(model)
  start, counts = TRACES["nn_jit"], []
  for _ in range(3):
    got = delora_jax.apply(model, {"params": tree}, x, strict=True)
    counts.append(TRACES["nn_jit"] - start)
    assert rel(got, want) <= REL
  assert counts == [1, 1, 1]


def test_jitted_user_function_over_apply_is_traced_once():
  model = CountingEinsum("jax_jit")
  x, tree, want = _counting_setup(model)
  f = jax.jit(lambda t, x: delora_jax.apply(model, {"params": t}, x, strict=True))
  start, counts = TRACES["jax_jit"], []
  for _ in range(3):
    got = f(tree, x)
    counts.append(TRACES["jax_jit"] - start)
    assert rel(got, want) <= REL
  assert counts == [1, 1, 1]


def test_jitted_train_step_on_a_custom_einsum_lowers_the_loss():
  model = models.Custom((4, 5), lambda x, w: jnp.einsum("bti,io->bto", x, w))
  x = jax.random.normal(jax.random.key(2), (8, 3, 4))
  target = jnp.tanh(x @ jax.random.normal(jax.random.key(5), (4, 5)))
  _, tree = init_and_wrap(model, x, {"kernel": delora_jax.Rule(2, 1.0)}, key=None)
  trainable, frozen = delora_jax.split(tree)
  opt = delora_jax.optimizer(optax.adam, learning_rate=3e-2)

  def loss(t):
    y = delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x, strict=True)
    return jnp.mean((y - target) ** 2)

  trainable, losses = models.train_steps(loss, trainable, opt, 30)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0]
  # Only the adapter moved: the frozen half is the one we started from.
  np.testing.assert_array_equal(frozen["kernel"].w, tree["kernel"].w)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32"])
def test_bfloat16_base_kernel_with_float32_adapters(x_dtype):
  model = models.Custom((16, 8), lambda x, w: jnp.einsum("bti,io->bto", x, w))
  x = jax.random.normal(jax.random.key(2), (4, 3, 16)).astype(x_dtype)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.init(jax.random.key(0), x)["params"])
  tree = delora_jax.wrap(params, {"kernel": delora_jax.Rule(4, 3.0, init="random")})
  ad = delora_jax.adapters(tree)["kernel"]
  assert {ad[f].dtype for f in ("a", "b", "lam", "w_norm")} == {jnp.dtype(jnp.float32)}
  got, merged = jax.jit(
    lambda t, x: (
      delora_jax.apply(model, {"params": t}, x, strict=True),
      model.apply({"params": delora_jax.merge(t)}, x),
    )
  )(tree, x)
  assert got.dtype == merged.dtype == jnp.result_type(x_dtype, jnp.bfloat16)
  assert np.all(np.isfinite(np.asarray(got, np.float32)))
  # The exact answer: x @ (w + ΔW) in float32 from the same bf16 w and x.
  exact = jnp.einsum(
    "bti,io->bto", x.astype(jnp.float32), params["kernel"].astype(jnp.float32) + delora_jax.delta(tree)["kernel"]
  )
  # bf16 keeps 8 significand bits: unit roundoff u = 2**-8 ~ 3.9e-3. The merged path
  # rounds w + ΔW (each entry, <= u) and its output (<= u); the factorised one rounds
  # its base output, its branch output and their sum (<= u each). Norm-wise these
  # largely independent roundings stay below ~2u; 4u = 1.6e-2 leaves headroom, and the
  # two paths, each within 4u of the exact answer, are within 8u of each other.
  u = 2.0**-8
  assert rel(merged, exact) <= 4 * u
  assert rel(got, exact) <= 4 * u
  assert rel(got, merged) <= 8 * u
  if x_dtype == "float32":
    # With a float32 input the factorised path never rounds ΔW to bf16: it is at least
    # as accurate as the merged kernel, and float32-exact.
    assert rel(got, exact) <= REL
