"""Flax NNX: adapted modules whose call writes state (caches, batch statistics, sow, Rngs draws).

The adapted call is traced as a pure function of the module's state; the reference is the
merged model (``delora_jax.nnx.merge``) run from the same state: outputs and every Variable
after the call (except the adapters and the adapted kernels themselves) must agree, eagerly,
under ``nnx.jit``, under ``jax.jit`` on a split model, and in ``nnx.value_and_grad`` steps.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

import delora_jax
from delora_jax.nnx import DeloraParam

REL = 1e-5  # float32, matmul precision "highest" (conftest)


def rel(a, b):
  """Norm-based relative error of ``a`` against ``b`` (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def R(**kw):  # noqa: N802 (a Rule with the test defaults)
  return delora_jax.Rule(2, 3.0, init="random", **kw)


def _normal(rngs, shape):
  return nnx.initializers.normal(0.5)(rngs.params(), shape)


# ---------------------------------------------------------------- models


class CacheLayer(nnx.Module):
  """Writes two caches during its call: a running sum of its outputs and a step counter."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(_normal(rngs, (4, 5)))
    self.total = nnx.Cache(jnp.zeros((5,)))
    self.index = nnx.Cache(jnp.array(0, jnp.int32))

  def __call__(self, x):
    y = x @ self.kernel[...]
    self.total[...] = self.total[...] + jnp.sum(y, axis=0)
    self.index[...] += 1
    return y


class RefCache(nnx.Module):
  """Its cache is a mutable array reference (``ref=True``): written in place, not returned."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(_normal(rngs, (4, 5)))
    self.total = nnx.Cache(jnp.zeros((5,)), ref=True)

  def __call__(self, x):
    y = x @ self.kernel[...]
    self.total[...] = self.total[...] + jnp.sum(y, axis=0)
    return y


class LazyCache(nnx.Module):
  """Creates its cache Variable on the first call (as decoding caches often do)."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(_normal(rngs, (4, 5)))

  def __call__(self, x):
    y = x @ self.kernel[...]
    if not hasattr(self, "last"):
      self.last = nnx.Cache(jnp.zeros_like(y))
    self.last[...] = self.last[...] + y
    return y


class Normed(nnx.Module):
  """An adapted kernel followed by BatchNorm (train mode: batch statistics written)."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(_normal(rngs, (4, 5)))
    self.bn = nnx.BatchNorm(5, momentum=0.5, rngs=rngs)

  def __call__(self, x):
    return self.bn(x @ self.kernel[...])


class Noisy(nnx.Module):
  """Draws from its own Rngs stream (RngCount increments) and runs a Dropout child."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(_normal(rngs, (4, 5)))
    self.rngs = nnx.Rngs(noise=3, dropout=4)
    self.drop = nnx.Dropout(0.5, rngs=self.rngs)

  def __call__(self, x):
    y = x @ self.kernel[...]
    return self.drop(y) + 0.1 * jax.random.normal(self.rngs.noise(), y.shape)


class Sown(nnx.Module):
  """Sows its hidden activation (collected with nnx.capture)."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(_normal(rngs, (4, 5)))

  def __call__(self, x):
    h = x @ self.kernel[...]
    self.sow(nnx.Intermediate, "h", h)
    return jnp.tanh(h)


class Block(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)

  def __call__(self, x):
    return self.bn(jnp.tanh(self.lin(x)))


class Scanned(nnx.Module):
  """Three stacked Blocks (nnx.vmap) run by nnx.scan: each layer's BatchNorm writes its slice."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(4, 5, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(block, x):
      return block(x)

    return self.head(body(self.blocks, x))


class Outer(nnx.Module):
  """An adapted kernel of its own and two adapted stateful children called from its call."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(_normal(rngs, (5, 4)))
    self.inner = CacheLayer(rngs)
    self.norm = Normed(rngs)

  def __call__(self, x):
    return self.norm(jnp.tanh(self.inner(x)) @ self.kernel[...])


class LinenDot(nn.Module):
  """A Linen contraction that draws an rng and counts its calls in a collection (MaxText's AQT
  dot_general is such a module, bridged into its NNX layers)."""

  @nn.compact
  def __call__(self, x, w):
    count = self.variable("aqt", "count", lambda: jnp.zeros((), jnp.int32))
    count.value += 1
    scale = 1.0 + 0.01 * jax.random.uniform(self.make_rng("aqt"), ())
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))) * scale


class Bridged(nnx.Module):
  """An NNX layer that contracts its kernel through a bridged Linen module (``bridge.ToNNX``)."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(_normal(rngs, (4, 5)))
    self.dot = bridge.ToNNX(LinenDot(), rngs=nnx.Rngs(params=5, aqt=6))
    bridge.lazy_init(self.dot, jnp.ones((1, 4)), jnp.ones((4, 5)))

  def __call__(self, x):
    return self.dot(x, self.kernel[...], mutable=True)


# id: (model factory, adapted kernel paths)
CASES = {
  "cache": (CacheLayer, ["kernel"]),
  "cache_created_on_first_call": (LazyCache, ["kernel"]),
  "batchnorm": (Normed, ["kernel"]),
  "rngs_and_dropout": (Noisy, ["kernel"]),
  "nested_adapted_modules": (Outer, ["inner/kernel", "kernel", "norm/kernel"]),
  "linen_bridge_rng_and_collection": (Bridged, ["kernel"]),
  "cache_held_as_array_ref": (RefCache, ["kernel"]),
  "batchnorm_in_nnx_scan": (Scanned, ["blocks/lin/kernel"]),
}


def setup(name):
  make, paths = CASES[name]
  model = make(nnx.Rngs(0))
  rules = {p: R(stack_axes=1) if p.startswith("blocks/") else R() for p in paths}
  adapted = delora_jax.nnx.wrap(model, rules, key=jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (3, 4))
  return adapted, delora_jax.nnx.merge(adapted), x, paths


def other_state(model, paths):
  """``{path: array}`` of every Variable except the adapters and the adapted kernels."""
  out = {}
  for p, v in nnx.to_flat_state(nnx.state(model)):
    path = "/".join(map(str, p))
    if "_delora" in path or path in paths:
      continue
    value = v.get_value()
    out[path] = np.asarray(jax.random.key_data(value) if jnp.issubdtype(value.dtype, jax.dtypes.prng_key) else value)
  return out


def assert_same_state(got, want):
  assert sorted(got) == sorted(want)
  for p, v in want.items():
    if np.issubdtype(v.dtype, np.floating):
      assert rel(got[p], v) <= REL, p
    else:
      np.testing.assert_array_equal(got[p], v, err_msg=p)


# ---------------------------------------------------------------- outputs and state after the call


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_eager_calls_equal_merged_outputs_and_state(name):
  adapted, merged, x, paths = setup(name)
  before = other_state(adapted, paths)
  for _ in range(2):  # the second call reads what the first one wrote
    got, want = adapted(x), merged(x)
    assert rel(got, want) <= REL
    assert_same_state(other_state(adapted, paths), other_state(merged, paths))
  changed = [p for p, v in other_state(adapted, paths).items() if p not in before or not np.array_equal(v, before[p])]
  assert changed, "the call wrote no state: the case tests nothing"
  now = other_state(adapted, paths)
  report = delora_jax.explain(adapted, x)
  assert sorted(report["factorised"]) == sorted(paths) and report["merged"] == report["unused"] == []
  assert_same_state(other_state(adapted, paths), now)  # explain traces abstractly: no state written


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_nnx_jit_calls_equal_merged_outputs_and_state(name):
  adapted, merged, x, paths = setup(name)
  adapted(x), merged(x)  # create any lazily created state outside jit (nnx.jit needs a fixed structure)
  call = nnx.jit(lambda m, x: m(x))
  for _ in range(2):
    assert rel(call(adapted, x), call(merged, x)) <= REL
    assert_same_state(other_state(adapted, paths), other_state(merged, paths))


@pytest.mark.parametrize("name", ["cache", "batchnorm", "rngs_and_dropout"])
def test_jax_jit_on_the_split_model_equals_merged(name):
  adapted, merged, x, paths = setup(name)

  @jax.jit
  def call(graphdef, state, x):
    y, (_, state) = nnx.call((graphdef, state))(x)
    return y, state

  def run(model):
    graphdef, state = nnx.split(model)
    y, state = call(graphdef, state, x)
    nnx.update(model, state)
    return y

  assert rel(run(adapted), run(merged)) <= REL
  assert_same_state(other_state(adapted, paths), other_state(merged, paths))


def _loss(m, x):
  ct = jax.random.normal(jax.random.key(3), (3, 5))  # a random cotangent (BatchNorm's output norm is ~constant)
  return jnp.sum(m(x) * ct)


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_value_and_grad_equals_through_merge_and_writes_the_state(name):
  adapted, _, x, paths = setup(name)
  adapted(x)  # create any lazily created state outside the transforms
  before = nnx.clone(adapted)  # the state the step starts from, for the references
  merged = delora_jax.nnx.merge(adapted)
  diff = nnx.DiffState(0, DeloraParam)
  loss, grads = nnx.jit(nnx.value_and_grad(_loss, argnums=diff))(adapted, x)
  through_merge = lambda m, x: _loss(delora_jax.nnx.merge(m), x)  # noqa: E731
  want_loss, want_grads = nnx.jit(nnx.value_and_grad(through_merge, argnums=diff))(before, x)
  assert rel(loss, want_loss) <= REL
  g, w = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(want_grads))
  assert sorted(g) == sorted(w) and len(g) == 3 * len(paths)
  for p in w:
    assert np.linalg.norm(w[p].get_value()) > 0, p
    assert rel(g[p].get_value(), w[p].get_value()) <= REL, p
  nnx.jit(nnx.value_and_grad(_loss))(merged, x)  # the same step on the merged model (its nnx.Params)
  assert_same_state(other_state(adapted, paths), other_state(merged, paths))


def test_training_steps_update_the_state_as_the_merged_model_does():
  """nnx.Optimizer steps under nnx.jit on a model with BatchNorm and caches: each step's batch
  statistics and caches equal those of the merged model (taken before the step) after one call."""
  adapted, _, x, paths = setup("nested_adapted_modules")
  opt = nnx.Optimizer(adapted, delora_jax.optimizer(optax.adamw, learning_rate=1e-2), wrt=DeloraParam)

  @nnx.jit
  def step(model, opt, x):
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, DeloraParam))(model, x)
    opt.update(model, grads)
    return loss

  losses = []
  for _ in range(3):
    merged = delora_jax.nnx.merge(adapted)
    losses.append(float(step(adapted, opt, x)))
    assert rel(losses[-1], _loss(merged, x)) <= REL
    assert_same_state(other_state(adapted, paths), other_state(merged, paths))
  assert losses[-1] < losses[0]


# ---------------------------------------------------------------- sow, dropout, layout inference


def test_sown_intermediates_equal_the_merged_models():
  adapted = delora_jax.nnx.wrap(Sown(nnx.Rngs(0)), {"kernel": R()})
  merged, x = delora_jax.nnx.merge(adapted), jax.random.normal(jax.random.key(2), (3, 4))
  if hasattr(nnx, "capture"):  # flax >= 0.12.2 (the lower bound, 0.12.1, has no nnx.capture)
    (got, got_h), (want, want_h) = (nnx.capture(m, nnx.Intermediate)(x) for m in (adapted, merged))
    assert rel(got, want) <= REL
    (got_h,), (want_h,) = got_h["h"].get_value(), want_h["h"].get_value()
    assert rel(got_h, want_h) <= REL
  # Outside nnx.capture (deprecated by newer flax, still supported): the Intermediate is created on
  # the first call and appended to on the next.
  sow_warns = pytest.warns(DeprecationWarning, match="sow") if hasattr(nnx, "capture") else contextlib.nullcontext()
  for _ in range(2):
    for m in (adapted, merged):
      with sow_warns:
        m(x)
  got_h, want_h = adapted.h.get_value(), merged.h.get_value()
  assert len(got_h) == len(want_h) == 2
  for g, w in zip(got_h, want_h):
    assert rel(g, w) <= REL


def test_adapter_dropout_on_a_stateful_module():
  model = CacheLayer(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (8, 4))
  adapted = delora_jax.nnx.wrap(model, {"kernel": R(dropout=0.5)}, rngs=nnx.Rngs(dropout=0))
  merged = delora_jax.nnx.merge(adapted)
  y1, y2 = adapted(x), adapted(x)
  assert rel(y1, merged(x)) > 1e-3 and not np.allclose(y1, y2)  # dropped, a new key each call
  assert int(adapted.index[...]) == 2
  adapted.eval()
  merged = delora_jax.nnx.merge(adapted)
  assert rel(adapted(x), merged(x)) <= REL
  assert_same_state(other_state(adapted, ["kernel"]), other_state(merged, ["kernel"]))


@pytest.mark.parametrize("name", ["cache", "batchnorm", "linen_bridge_rng_and_collection"])
def test_layout_inference_on_a_stateful_module(name):
  make, paths = CASES[name]
  model = make(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (3, 4))
  before = other_state(model, [])
  adapted = delora_jax.nnx.wrap(model, {p: delora_jax.Rule(2, init="random") for p in paths}, like=(x,))
  assert [ad["a"].shape for ad in delora_jax.adapters(adapted).values()] == [(4, 2)]
  assert_same_state(other_state(model, []), before)  # the probe call wrote into a copy
  merged = delora_jax.nnx.merge(adapted)
  assert rel(adapted(x), merged(x)) <= REL


# ---------------------------------------------------------------- state that cannot be threaded


class WritesArgument(nnx.Module):
  def __init__(self, rngs):
    self.kernel = nnx.Param(_normal(rngs, (4, 5)))

  def __call__(self, x, log):
    y = x @ self.kernel[...]
    log[...] = jnp.sum(y)  # a Variable that is not the module's
    return y


class CountsInPython(nnx.Module):
  def __init__(self, rngs):
    self.kernel = nnx.Param(_normal(rngs, (4, 5)))
    self.cache = nnx.Cache(jnp.zeros(()))
    self.calls = 0

  def __call__(self, x):
    y = x @ self.kernel[...]
    self.cache[...] += 1.0
    self.calls += 1  # a plain attribute: part of the graph's structure, not of its state
    return y


def _call_with_log():
  adapted = delora_jax.nnx.wrap(WritesArgument(nnx.Rngs(0)), {"kernel": 2})
  adapted(jnp.ones((1, 4)), nnx.Variable(jnp.zeros(())))


def _count_in_python():
  adapted = delora_jax.nnx.wrap(CountsInPython(nnx.Rngs(0)), {"kernel": 2})
  try:
    adapted(jnp.ones((1, 4)))
  finally:  # nothing was written: the call raised before the write-back
    assert float(adapted.cache[...]) == 0.0 and adapted.calls == 0


ERRORS = {
  "writes_an_argument_variable": (_call_with_log, TypeError, r"'kernel': its call writes NNX state that is not part"),
  "changes_a_plain_attribute": (_count_in_python, TypeError, r"'kernel': its call changes the module's structure"),
}


@pytest.mark.parametrize("name", list(ERRORS), ids=list(ERRORS))
def test_errors(name):
  fn, exc, match = ERRORS[name]
  with pytest.raises(exc, match=match):
    fn()
