"""Linen: any module that contracts an adapted kernel runs factorised (the generic path).

Each case is a module delora_jax did not write. The three invariants: the factorised
call equals the merged model (outputs and gradients), identity at init, and the report
(explain / strict=True) says every adapted kernel ran factorised.
"""

import collections
import dataclasses
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import delora_jax
from tests import models

REL = 1e-5  # float32, matmul precision "highest" (conftest): factorised vs merged
INIT = nn.initializers.normal(0.5)


def rel(a, b):
  """Norm-based relative error of ``a`` against ``b`` (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# ---------------------------------------------------------------- the custom modules


class Custom(nn.Module):
  """One parameter of ``shape`` named ``param_name``, used by ``fn(x, w)``."""

  shape: tuple
  fn: Callable
  param_name: str = "kernel"

  @nn.compact
  def __call__(self, x):
    return self.fn(x, self.param(self.param_name, INIT, self.shape))


@jax.jit
def _jitted_einsum(x, w):
  """A user helper jitted once at module level (its trace cache is shared by calls)."""
  return jnp.einsum("bti,io->bto", x, w)


def _checkpointed(x, w):
  return jax.checkpoint(lambda x, w: jnp.tanh(jnp.einsum("bti,io->bto", x, w)))(x, w)


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _merge_heads_out(x, w):
  b, t, h, d = x.shape
  return x.reshape(b, t, h * d) @ w.reshape(h * d, w.shape[-1])


class GemmaEinsum(nn.Module):
  """gemma's ``_layers.Einsum``: the equation is a call argument, the weight name a field."""

  shape: tuple
  weight_name: str = "w"

  @nn.compact
  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.param(self.weight_name, INIT, self.shape))


class FeedForward(nn.Module):
  """gemma's FeedForward: two Einsum children share the parent's scope (nn.share_scope)."""

  @nn.compact
  def __call__(self, x):
    gating = GemmaEinsum((2, x.shape[-1], 6), weight_name="gating_einsum")
    nn.share_scope(self, gating)
    gate = gating("...F,NFH->...NH", x)
    linear = GemmaEinsum((6, x.shape[-1]), weight_name="linear")
    nn.share_scope(self, linear)
    return linear("...H,HF->...F", nn.gelu(gate[..., 0, :]) * gate[..., 1, :])


class EinsumLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    w = self.param("kernel", INIT, (x.shape[-1], x.shape[-1]))
    return jnp.tanh(jnp.einsum("bti,io->bto", x, w)), None


class NdimLayer(nn.Module):
  """Contracts x's last axis with the kernel's second-to-last, found from ``w.ndim``."""

  @nn.compact
  def __call__(self, x, _=None):
    w = self.param("kernel", INIT, (x.shape[-1], x.shape[-1]))
    assert w.ndim == len(w.shape), (w.ndim, w.shape)  # an array's invariant
    return jnp.tanh(jnp.tensordot(x, w, axes=(x.ndim - 1, w.ndim - 2))), None


class Scanned(nn.Module):
  layer: type = EinsumLayer

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(self.layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")
    return layers(x, None)[0]


class Lifted(nn.Module):
  """A custom einsum layer under a Linen lifted transform (nn.jit, nn.remat)."""

  transform: Callable

  @nn.compact
  def __call__(self, x):
    return self.transform(EinsumLayer)(name="inner")(x)[0] * 2.0


def R(**kw):  # noqa: N802 (a Rule with the test defaults)
  return delora_jax.Rule(2, 3.0, init="random", **kw)


def custom(shape, fn, param="kernel"):
  return lambda: Custom(shape, fn, param)


# id: (model factory, input shape, rules)
CASES = {
  "einsum": (custom((4, 5), lambda x, w: jnp.einsum("bti,io->bto", x, w)), (2, 3, 4), {"kernel": R()}),
  "einsum_ellipsis": (custom((4, 5), lambda x, w: jnp.einsum("...i,io->...o", x, w)), (2, 3, 4), {"kernel": R()}),
  "jnp_dot": (custom((4, 5), jnp.dot), (2, 3, 4), {"kernel": R()}),
  "jnp_matmul": (custom((4, 5), jnp.matmul), (2, 3, 4), {"kernel": R()}),
  "matmul_operator": (custom((4, 5), lambda x, w: x @ w), (2, 3, 4), {"kernel": R()}),
  "lax_dot_general": (
    custom((4, 5), lambda x, w: lax.dot_general(x, w, (((2,), (0,)), ((), ())))),
    (2, 3, 4),
    {"kernel": R()},
  ),
  "astype": (custom((4, 5), lambda x, w: x @ w.astype(x.dtype)), (2, 3, 4), {"kernel": R()}),
  # gemma 4's per-layer input projection: `w *= w_scale` before the einsum
  "scaled_by_a_constant": (custom((4, 5), lambda x, w: x @ (w * 0.25)), (2, 3, 4), {"kernel": R()}),
  "out_in_kernel_transposed": (custom((5, 4), lambda x, w: x @ w.T), (2, 3, 4), {"kernel": R(in_axes=1)}),
  "reshape_merges_head_axes_in": (
    custom((4, 2, 3), lambda x, w: x @ w.reshape(4, 6)),
    (2, 3, 4),
    {"kernel": R(in_axes=0)},
  ),
  "reshape_merges_head_axes_out": (custom((2, 3, 4), _merge_heads_out), (2, 3, 2, 3), {"kernel": R(out_axes=-1)}),
  "param_named_w": (custom((4, 5), lambda x, w: jnp.einsum("bti,io->bto", x, w), "w"), (2, 3, 4), {"w": R()}),
  "heads_embed_head_dim": (
    custom((2, 4, 3), lambda x, w: jnp.einsum("btd,hdk->bthk", x, w)),
    (2, 3, 4),
    {"kernel": R(in_axes=1)},
  ),
  "kv_stacked_output_axis": (
    custom((2, 2, 4, 3), lambda x, w: jnp.einsum("BTD,SNDH->SBTNH", x, w)),
    (2, 3, 4),
    {"kernel": R(stack_axes=1, in_axes=2)},
  ),
  "lax_conv": (custom((3, 3, 3, 4), _conv), (2, 5, 5, 3), {"kernel": R(out_axes=-1)}),
  "nested_jit": (custom((4, 5), _jitted_einsum), (2, 3, 4), {"kernel": R()}),
  "jax_checkpoint": (custom((4, 5), _checkpointed), (2, 3, 4), {"kernel": R()}),
  "share_scope": (FeedForward, (2, 3, 4), {"gating_einsum": R(stack_axes=1), "linear": R()}),
  "nn_scan": (Scanned, (2, 3, 4), {"layers/kernel": R(stack_axes=1)}),
  "nn_scan_reads_kernel_ndim": (lambda: Scanned(NdimLayer), (2, 3, 4), {"layers/kernel": R(stack_axes=1)}),
  "nn_jit": (lambda: Lifted(nn.jit), (2, 3, 4), {"inner/kernel": R()}),
  "nn_remat": (lambda: Lifted(nn.remat), (2, 3, 4), {"inner/kernel": R()}),
}


def setup(name, **rule_changes):
  make, shape, rules = CASES[name]
  model = make()
  x = jax.random.normal(jax.random.key(2), shape)
  params = model.init(jax.random.key(0), x)["params"]
  rules = {p: dataclasses.replace(r, **rule_changes) for p, r in rules.items()}
  return model, x, params, delora_jax.wrap(params, rules, key=jax.random.key(1))


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_factorised_equals_merged_outputs_and_gradients(name):
  model, x, params, tree = setup(name)
  assert delora_jax.explain(model, {"params": tree}, x) == {
    "factorised": list(delora_jax.adapters(tree)),
    "merged": [],
    "unused": [],
  }

  @jax.jit  # one compilation for the three calls (the tests are compile-bound on CPU)
  def outputs(tree, x):
    return (
      delora_jax.apply(model, {"params": tree}, x, strict=True),
      model.apply({"params": delora_jax.merge(tree)}, x),
      model.apply({"params": delora_jax.unwrap(tree)}, x),
    )

  got, want, base = outputs(tree, x)
  assert got.shape == want.shape and got.dtype == want.dtype
  assert rel(got, base) > 1e-3  # the adapters do something
  assert rel(got, want) <= REL

  ct = jax.random.normal(jax.random.key(3), want.shape)  # a generic cotangent
  trainable, frozen = delora_jax.split(tree)

  def fact(t):
    return jnp.sum(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x, strict=True) * ct)

  def merged(t):
    return jnp.sum(model.apply({"params": delora_jax.merge(delora_jax.combine(t, frozen))}, x) * ct)

  g_fact, g_merged = jax.jit(lambda t: (jax.grad(fact)(t), jax.grad(merged)(t)))(trainable)
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(g_merged))
  assert len(leaves) == 3 * len(delora_jax.adapters(tree))  # a, b, lam of each kernel
  for p, gf, gm in zip(map(jax.tree_util.keystr, paths), jax.tree.leaves(g_fact), leaves):
    assert np.linalg.norm(np.asarray(gm)) > 0, p
    assert rel(gf, gm) <= REL, p


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_identity_at_init_on_repeated_eager_calls(name):
  """init="peft" (b = 0): the adapted model is the base model, call after call (eager
  calls re-trace the module; nothing of an earlier call's trace may be reused)."""
  model, x, params, tree = setup(name, init="peft")
  base = model.apply({"params": params}, x)
  for strict in (True, True, False):
    got = delora_jax.apply(model, {"params": tree}, x, strict=strict)
    np.testing.assert_array_equal(got, base)


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
  "scanned": (Scanned, (2, 3, 4), {"layers/kernel": R(stack_axes=1, in_axes=2)}, "layers/kernel", (2,), (1,)),
}


@pytest.mark.parametrize("name", list(WRONG_LAYOUTS), ids=list(WRONG_LAYOUTS))
def test_wrong_declared_layout_raises_naming_path_and_axes(name):
  make, shape, rules, path, declared, contracted = WRONG_LAYOUTS[name]
  model = make()
  x = jax.random.normal(jax.random.key(2), shape)
  tree = delora_jax.wrap(model.init(jax.random.key(0), x)["params"], rules)
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
    return jnp.einsum("bti,io->bto", x, self.param("kernel", INIT, (x.shape[-1], 5)))


def _counting_setup(model):
  x = jax.random.normal(jax.random.key(2), (2, 3, 4))
  tree = delora_jax.wrap(model.init(jax.random.key(0), x)["params"], {"kernel": R()})
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
  model = Custom((4, 5), lambda x, w: jnp.einsum("bti,io->bto", x, w))
  x = jax.random.normal(jax.random.key(2), (8, 3, 4))
  target = jnp.tanh(x @ jax.random.normal(jax.random.key(5), (4, 5)))
  tree = delora_jax.wrap(model.init(jax.random.key(0), x)["params"], {"kernel": delora_jax.Rule(2, 1.0)})
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
  model = Custom((16, 8), lambda x, w: jnp.einsum("bti,io->bto", x, w))
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
