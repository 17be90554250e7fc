"""The engine's edges, Linen side: stateful methods, custom derivatives, forward mode, MoE
through ``lax.ragged_dot``, full contractions, layouts a reshape contradicts, and uses that
never reach the outputs. Each case compares the factorised call with the merged model."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import delora_jax

REL = 1e-5  # float32, matmul precision "highest" (conftest)
INIT = nn.initializers.normal(0.5)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def setup(model, x, rules, **apply_kw):
  variables = model.init(jax.random.key(0), x, **apply_kw)
  tree = delora_jax.wrap(variables["params"], rules, key=jax.random.key(1))
  return variables, tree


def grads_both(model, variables, tree, x, **kw):
  """Gradients of a, b, lam: factorised, and through the merged weights."""
  trainable, frozen = delora_jax.split(tree)
  rest = {k: v for k, v in variables.items() if k != "params"}

  def out(y):
    y = y[0] if isinstance(y, tuple) else y
    return jnp.sin(y) * jnp.arange(1, y.shape[-1] + 1)[None, :]  # not invariant to a normalisation

  def fact(t):
    return jnp.sum(out(delora_jax.apply(model, {**rest, "params": delora_jax.combine(t, frozen)}, x, **kw)))

  def merged(t):
    return jnp.sum(out(model.apply({**rest, "params": delora_jax.merge(delora_jax.combine(t, frozen))}, x, **kw)))

  return jax.grad(fact)(trainable), jax.grad(merged)(trainable)


def merged_fallback_grads(model, x):
  """Checks a model whose kernel use falls back to w + ΔW: warned, reported merged, output equal to
  the merged model's; returns the adapted tree and the factorised and through-merge gradients."""
  variables, tree = setup(model, x, {"kernel": delora_jax.Rule(2, init="random")})
  with pytest.warns(delora_jax.FallbackWarning, match="kernel"):
    y_f = delora_jax.apply(model, {"params": tree}, x)
  assert rel(y_f, model.apply({"params": delora_jax.merge(tree)}, x)) < REL
  assert delora_jax.explain(model, {"params": tree}, x)["merged"] == ["kernel"]
  with pytest.warns(delora_jax.FallbackWarning):
    return tree, *grads_both(model, variables, tree, x)


def assert_grads_equal(g_fact, g_merged):
  for path, f in delora_jax.adapters(g_fact).items():
    m = delora_jax.adapters(g_merged)[path]
    for name in ("a", "b", "lam"):
      assert rel(f[name], m[name]) < REL, (path, name, rel(f[name], m[name]))


# ---------------------------------------------------------------- stateful methods


class SowDot(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = x @ self.param("kernel", INIT, (x.shape[-1], 5))
    self.sow("intermediates", "y", y)
    return jnp.tanh(y)


class CacheDot(nn.Module):
  """Keeps a running sum of its outputs in a mutable 'cache' collection."""

  @nn.compact
  def __call__(self, x):
    y = jnp.einsum("bi,io->bo", x, self.param("kernel", INIT, (x.shape[-1], 5)))
    total = self.variable("cache", "total", jnp.zeros, (5,))
    count = self.variable("cache", "count", lambda: jnp.zeros((), jnp.int32))
    total.value = total.value + y.sum(0)
    count.value = count.value + 1
    return y


class DotBatchNorm(nn.Module):
  """A dot and a BatchNorm child in one method: batch statistics written during the call."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    y = x @ self.param("kernel", INIT, (x.shape[-1], 5))
    return nn.BatchNorm(use_running_average=not train)(y)


STATEFUL = {
  "sow": (SowDot, ["intermediates"]),
  "cache": (CacheDot, ["cache"]),
  "batch_stats": (DotBatchNorm, ["batch_stats"]),
}


@pytest.mark.parametrize("name", list(STATEFUL), ids=list(STATEFUL))
def test_state_written_by_an_adapted_method_equals_the_merged_models(name):
  make, mutable = STATEFUL[name]
  model, x = make(), jax.random.normal(jax.random.key(2), (4, 6))
  variables, tree = setup(model, x, {"kernel": delora_jax.Rule(2, init="random")})
  rest = {k: v for k, v in variables.items() if k != "params"}
  for run in (lambda f: f(), lambda f: jax.jit(f)()):
    y_f, s_f = run(lambda: delora_jax.apply(model, {**rest, "params": tree}, x, mutable=mutable, strict=True))
    y_m, s_m = run(lambda: model.apply({**rest, "params": delora_jax.merge(tree)}, x, mutable=mutable))
    assert rel(y_f, y_m) < REL
    assert jax.tree.structure(s_f) == jax.tree.structure(s_m)
    for a, b in zip(jax.tree.leaves(s_f), jax.tree.leaves(s_m)):
      assert isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)
      assert a.dtype == b.dtype and rel(a, b) < REL
  assert delora_jax.explain(model, {**rest, "params": tree}, x, mutable=mutable)["factorised"] == ["kernel"]
  assert_grads_equal(*grads_both(model, variables, tree, x, mutable=mutable))


def test_state_of_a_scanned_stateful_layer_equals_the_merged_models():
  class Wrapped(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(
        lambda m, c, _: (m(c), None),
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True},
        length=3,
      )(CacheDot(), x, None)[0]

  model, x = Wrapped(), jax.random.normal(jax.random.key(2), (4, 5))
  rules = {".*kernel": delora_jax.Rule(2, init="random", stack_axes=1)}
  variables, tree = setup(model, x, rules)
  y_f, s_f = delora_jax.apply(model, {"cache": variables["cache"], "params": tree}, x, mutable=["cache"], strict=True)
  y_m, s_m = model.apply({"cache": variables["cache"], "params": delora_jax.merge(tree)}, x, mutable=["cache"])
  assert rel(y_f, y_m) < REL
  for a, b in zip(jax.tree.leaves(s_f), jax.tree.leaves(s_m)):
    assert rel(a, b) < REL


class SowsAnObject(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = x @ self.param("kernel", INIT, (x.shape[-1], 5))
    self.sow("intermediates", "note", object())
    return y


def test_state_that_cannot_be_threaded_is_a_type_error_naming_the_module():
  model, x = SowsAnObject(), jax.random.normal(jax.random.key(2), (4, 6))
  params = model.init(jax.random.key(0), x)["params"]
  tree = delora_jax.wrap(params, {"kernel": 2})
  with pytest.raises(TypeError, match=r"writes 'note' = a tuple holding \['object'\]"):
    delora_jax.apply(model, {"params": tree}, x, mutable=["intermediates"])


# ---------------------------------------------------------------- custom derivatives


@jax.custom_jvp
def _ste_round(w):
  """A straight-through quantiser: rounds in the forward pass, identity derivative."""
  return jnp.round(w * 4.0) / 4.0


_ste_round.defjvp(lambda primals, tangents: (_ste_round(primals[0]), tangents[0]))


@jax.custom_jvp
def _half_grad(w):
  return w


_half_grad.defjvp(lambda primals, tangents: (primals[0], 0.5 * tangents[0]))


@jax.custom_vjp
def _clip_grad(w):
  return w


_clip_grad.defvjp(lambda w: (w, None), lambda _, g: (jnp.clip(g, -0.01, 0.01),))


class CustomRule(nn.Module):
  fn: object

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(x @ self.fn(self.param("kernel", INIT, (x.shape[-1], 5))))


CUSTOM = {"ste_quantiser": _ste_round, "half_derivative": _half_grad, "custom_vjp_clip": _clip_grad}


@pytest.mark.parametrize("name", list(CUSTOM), ids=list(CUSTOM))
def test_custom_derivative_rules_are_kept(name):
  model, x = CustomRule(CUSTOM[name]), jax.random.normal(jax.random.key(2), (4, 6))
  tree, g_f, g_m = merged_fallback_grads(model, x)
  assert_grads_equal(g_f, g_m)
  g = delora_jax.adapters(g_f)["kernel"]
  assert np.abs(np.asarray(g["a"])).max() > 0  # the straight-through rule lets gradients through
  with pytest.raises(TypeError, match="kernel: this adapted kernel is used by `custom_"):
    delora_jax.apply(model, {"params": tree}, x, strict=True)


def _forward_mode(model, tree, x):
  trainable, frozen = delora_jax.split(tree)
  tangent = jax.tree.map(lambda t: jnp.ones_like(t), trainable)

  def fact(t):
    return delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x, strict=True)

  def merged(t):
    return model.apply({"params": delora_jax.merge(delora_jax.combine(t, frozen))}, x)

  return jax.jvp(fact, (trainable,), (tangent,)), jax.jvp(merged, (trainable,), (tangent,))


@pytest.mark.parametrize("kind", ["dense", "einsum"])
def test_jvp_and_jacfwd_through_fused_and_generic_paths(kind):
  if kind == "dense":
    model = nn.Dense(5)
  else:
    model = CustomRule(lambda w: w)
  x = jax.random.normal(jax.random.key(2), (3, 6))
  _, tree = setup(model, x, {"kernel": delora_jax.Rule(2, init="random")})
  (y_f, t_f), (y_m, t_m) = _forward_mode(model, tree, x)
  assert rel(y_f, y_m) < REL and rel(t_f, t_m) < REL
  jac_f = jax.jacfwd(lambda x: delora_jax.apply(model, {"params": tree}, x, strict=True))(x)
  jac_m = jax.jacfwd(lambda x: model.apply({"params": delora_jax.merge(tree)}, x))(x)
  assert rel(jac_f, jac_m) < REL
  # jvp with respect to the input too (the fused op's x tangent).
  fx = jax.jvp(lambda x: delora_jax.apply(model, {"params": tree}, x, strict=True), (x,), (jnp.ones_like(x),))[1]
  mx = jax.jvp(lambda x: model.apply({"params": delora_jax.merge(tree)}, x), (x,), (jnp.ones_like(x),))[1]
  assert rel(fx, mx) < REL


# ---------------------------------------------------------------- MoE via ragged_dot


class RaggedMoE(nn.Module):
  """Tokens sorted by expert, each expert's (in, out) kernel applied by lax.ragged_dot."""

  experts: int = 3
  out: int = 5

  @nn.compact
  def __call__(self, x, group_sizes):
    w = self.param("experts", INIT, (self.experts, x.shape[-1], self.out))
    return jax.nn.gelu(lax.ragged_dot(x, w, group_sizes))


def moe_grads_equal(model, tree, x, gs):
  """Asserts the factorised gradients of a, b, lam equal those through the merged weights; returns them."""
  trainable, frozen = delora_jax.split(tree)
  g_f = jax.jit(
    jax.grad(lambda t: jnp.sum(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x, gs) ** 2))
  )(trainable)
  g_m = jax.jit(
    jax.grad(lambda t: jnp.sum(model.apply({"params": delora_jax.merge(delora_jax.combine(t, frozen))}, x, gs) ** 2))
  )(trainable)
  assert_grads_equal(g_f, g_m)
  return g_f


def _moe_inputs():
  return jax.random.normal(jax.random.key(2), (9, 6)), jnp.array([2, 0, 7], jnp.int32)


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "like"])
def test_ragged_dot_experts_are_adapted_per_expert_and_factorised(declared):
  model, (x, gs) = RaggedMoE(), _moe_inputs()
  params = model.init(jax.random.key(0), x, gs)["params"]
  if declared:
    tree = delora_jax.wrap(params, {"experts": delora_jax.Rule(2, init="random", stack_axes=1)}, key=jax.random.key(1))
  else:
    tree = delora_jax.wrap(params, {"experts": delora_jax.Rule(2, init="random")}, like=(model, x, gs))
  ad = delora_jax.adapters(tree)["experts"]
  assert ad["a"].shape == (3, 6, 2) and ad["b"].shape == (3, 2, 5) and ad["lam"].shape == (3,)
  y_f = delora_jax.apply(model, {"params": tree}, x, gs, strict=True)
  assert rel(y_f, model.apply({"params": delora_jax.merge(tree)}, x, gs)) < REL
  assert delora_jax.explain(model, {"params": tree}, x, gs)["factorised"] == ["experts"]
  g_f = moe_grads_equal(model, tree, x, gs)
  # An expert that gets no token gets no gradient.
  assert not np.any(np.asarray(delora_jax.adapters(g_f)["experts"]["b"][1]))


def test_ragged_dot_step_forms_no_per_expert_delta():
  model, (x, gs) = RaggedMoE(experts=4, out=48), _moe_inputs()
  x = jnp.tile(x[:, :1], (1, 40))
  gs = jnp.array([2, 0, 4, 3], jnp.int32)
  tree = delora_jax.wrap(
    model.init(jax.random.key(0), x, gs)["params"], {"experts": delora_jax.Rule(3, init="random", stack_axes=1)}
  )
  trainable, frozen = delora_jax.split(tree)
  loss = lambda t: jnp.sum(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x, gs, strict=True))
  hlo = jax.jit(jax.grad(loss)).lower(trainable).compile().as_text()
  assert not [l for l in hlo.splitlines() if "f32[4,40,48]" in l and " = " in l and "parameter" not in l]


# ---------------------------------------------------------------- edges


class FullContraction(nn.Module):
  """A layer plus a regulariser that contracts every axis of its kernel."""

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", INIT, (x.shape[-1], 5))
    return x @ w + jnp.einsum("ij,ij->", w, jnp.ones_like(w))


def test_full_contraction_falls_back_to_the_merged_kernel_with_a_warning():
  _, g_f, g_m = merged_fallback_grads(FullContraction(), jax.random.normal(jax.random.key(2), (4, 6)))
  assert_grads_equal(g_f, g_m)


class Reshaped(nn.Module):
  """Stores (4, 3, 5) and contracts its first two axes together, after a reshape."""

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", INIT, (4, 3, 5))
    return x @ w.reshape(12, 5)


def test_declared_layout_a_reshape_contradicts_is_a_value_error_naming_the_path():
  model, x = Reshaped(), jax.random.normal(jax.random.key(2), (2, 12))
  params = model.init(jax.random.key(0), x)["params"]
  tree = delora_jax.wrap(params, {"kernel": delora_jax.Rule(2, in_axes=0)})  # wrong: the model contracts (0, 1)
  for call in (delora_jax.apply, delora_jax.explain):
    with pytest.raises(ValueError, match=re.escape("kernel: the model reshapes this kernel")) as info:
      call(model, {"params": tree}, x)
    assert "Rule(r, in_axes=(0, 1))" in str(info.value)
  right = delora_jax.wrap(params, {"kernel": delora_jax.Rule(2, in_axes=(0, 1), init="random")})
  assert (
    rel(delora_jax.apply(model, {"params": right}, x, strict=True), model.apply({"params": delora_jax.merge(right)}, x))
    < REL
  )
  inferred = delora_jax.wrap(params, {"kernel": 2}, like=(model, x))
  assert delora_jax.adapters(inferred)["kernel"]["a"].shape == (12, 2)


class DeadBranch(nn.Module):
  """Computes a projection with its second kernel and drops it (gemma 4's KV-shared layers)."""

  @nn.compact
  def __call__(self, x):
    used = nn.Dense(5, name="used")(x)
    nn.Dense(5, name="dropped")(x)
    return used


def test_explain_reports_a_kernel_whose_use_never_reaches_the_outputs_as_unused():
  model, x = DeadBranch(), jax.random.normal(jax.random.key(2), (4, 6))
  _, tree = setup(model, x, {".*kernel": 2})
  assert delora_jax.explain(model, {"params": tree}, x) == {
    "factorised": ["used/kernel"],
    "merged": [],
    "unused": ["dropped/kernel"],
  }
  trainable, frozen = delora_jax.split(tree)
  g = jax.grad(lambda t: jnp.sum(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x)))(trainable)
  assert not np.any(np.asarray(delora_jax.adapters(g)["dropped/kernel"]["a"]))


class _Weight(nn.Module):
  """Holds one parameter and returns it (gemma 4's MoE keeps its expert weights this way)."""

  shape: tuple

  @nn.compact
  def __call__(self):
    return self.param("w", INIT, self.shape)


def _held_moe(mod, x, sizes):
  """The MoE body (a plain function, so it runs inside the calling method)."""
  w = jnp.transpose(mod.gating(), (0, 3, 1, 2)).reshape(3, 6, 8)
  h = lax.ragged_dot(x, w, sizes).reshape(x.shape[0], 2, 4)
  return lax.ragged_dot(jax.nn.gelu(h[:, 0]) * h[:, 1], mod.linear(), sizes)


class HeldMoE(nn.Module):
  """gemma 4's MoERagged pattern: expert kernels held by child modules, used by the parent."""

  def setup(self):
    self.gating = _Weight((3, 2, 4, 6))  # (E, 2, H, F), used as (E, F, 2H)
    self.linear = _Weight((3, 4, 6))  # (E, H, F)

  def __call__(self, x, sizes):
    return _held_moe(self, x, sizes)


def test_kernels_returned_by_weight_holders_are_factorised_where_the_parent_uses_them():
  model, (x, gs) = HeldMoE(), _moe_inputs()
  params = model.init(jax.random.key(0), x, gs)["params"]
  tree = delora_jax.wrap(params, {".*/w": delora_jax.Rule(2, init="random")}, like=(model, x, gs))
  ads = delora_jax.adapters(tree)
  assert ads["gating/w"]["a"].shape == (3, 6, 2) and ads["gating/w"]["b"].shape == (3, 2, 8)
  assert ads["linear/w"]["a"].shape == (3, 4, 2) and ads["linear/w"]["b"].shape == (3, 2, 6)
  assert delora_jax.explain(model, {"params": tree}, x, gs) == {
    "factorised": ["gating/w", "linear/w"],
    "merged": [],
    "unused": [],
  }
  y_f = delora_jax.apply(model, {"params": tree}, x, gs, strict=True)
  assert rel(y_f, model.apply({"params": delora_jax.merge(tree)}, x, gs)) < REL
  moe_grads_equal(model, tree, x, gs)


class SowingHeldMoE(HeldMoE):
  """Writes state before its weight holders return their kernels (traced again on escalation)."""

  def __call__(self, x, sizes):
    self.sow("intermediates", "x_sum", jnp.sum(x))
    return _held_moe(self, x, sizes)


def test_state_written_before_a_holder_escalates_is_written_once():
  model, (x, gs) = SowingHeldMoE(), _moe_inputs()
  params = model.init(jax.random.key(0), x, gs)["params"]
  tree = delora_jax.wrap(params, {".*/w": delora_jax.Rule(2, init="random")}, like=(model, x, gs))
  y, state = delora_jax.apply(model, {"params": tree}, x, gs, strict=True, mutable=["intermediates"])
  y_m, state_m = model.apply({"params": delora_jax.merge(tree)}, x, gs, mutable=["intermediates"])
  assert jax.tree.structure(state) == jax.tree.structure(state_m)
  assert len(state["intermediates"]["x_sum"]) == 1
  assert rel(y, y_m) < REL


class _Tap(nn.Module):
  @nn.compact
  def __call__(self, x):
    self.sow("intermediates", "s", jnp.sum(x))
    return x


class ChildSowingHeldMoE(HeldMoE):
  """A child creates a variable before the weight holders return their kernels."""

  def setup(self):
    super().setup()
    self.tap = _Tap()

  def __call__(self, x, sizes):
    x = self.tap(x)
    return _held_moe(self, x, sizes)


def test_a_child_variable_created_before_a_holder_escalates_is_a_type_error():
  model, (x, gs) = ChildSowingHeldMoE(), _moe_inputs()
  params = model.init(jax.random.key(0), x, gs)["params"]
  tree = delora_jax.wrap(params, {".*/w": delora_jax.Rule(2, init="random")}, like=(model, x, gs))
  with pytest.raises(TypeError, match=r"creates the variable intermediates/tap/s in a child module"):
    delora_jax.apply(model, {"params": tree}, x, gs, mutable=["intermediates"])
