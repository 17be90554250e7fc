"""Flax NNX: wrap / merge on the State from nnx.split, and the documented training recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import delora_jax


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(5, 16, rngs=rngs)
    self.out = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def test_wrap_and_merge_nnx_state():
  model = MLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tree = delora_jax.wrap(state, {".*kernel": delora_jax.Rule(2, init="random")})
  assert sorted(delora_jax.adapters(tree)) == ["hidden/kernel", "out/kernel"]
  merged = delora_jax.merge(tree)
  assert isinstance(merged, nnx.State)
  assert jax.tree.structure(merged) == jax.tree.structure(state)
  x = jax.random.normal(jax.random.key(1), (4, 5))
  y = nnx.merge(graphdef, merged)(x)
  d = delora_jax.delta(tree)
  w1 = state["hidden"]["kernel"].get_value() + d["hidden/kernel"]
  w2 = state["out"]["kernel"].get_value() + d["out/kernel"]
  want = jax.nn.relu(x @ w1 + state["hidden"]["bias"].get_value()[None]) @ w2 + state["out"]["bias"].get_value()[None]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  unwrapped = delora_jax.unwrap(tree)
  np.testing.assert_array_equal(unwrapped["out"]["kernel"].get_value(), state["out"]["kernel"].get_value())


def test_nnx_training_recipe():
  # --- the recipe from the README, verbatim in spirit ---
  model = MLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  original = np.array(state["hidden"]["kernel"].get_value())
  tree = delora_jax.wrap(state, {".*kernel": delora_jax.Rule(2, lam=4.0)})
  trainable, frozen = delora_jax.split(tree)
  opt = delora_jax.optimizer(optax.adam, learning_rate=1e-2)
  opt_state = opt.init(trainable)

  def loss_fn(trainable, x, y):
    m = nnx.merge(graphdef, delora_jax.merge(delora_jax.combine(trainable, frozen)))
    return jnp.mean((m(x) - y) ** 2)

  @jax.jit
  def step(trainable, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, x, y)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  x = jax.random.normal(jax.random.key(1), (64, 5))
  y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=-1)
  losses = []
  for _ in range(60):
    trainable, opt_state, loss = step(trainable, opt_state, x, y)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0]
  nnx.update(model, delora_jax.merge(delora_jax.combine(trainable, frozen)))  # fine-tuned model in place
  np.testing.assert_allclose(float(jnp.mean((model(x) - y) ** 2)), losses[-1], rtol=0.2)
  # The frozen base inside `frozen` never changed; the model now holds w + ΔW.
  np.testing.assert_array_equal(frozen["hidden"]["kernel"].get_value().w, original)
  assert not np.allclose(model.hidden.kernel.get_value(), original)
