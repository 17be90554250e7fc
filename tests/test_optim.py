"""optimizer(): state only for adapters, λ undecayed with its own learning rate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import delora_jax


def tree():
  params = {
    "l0": {"kernel": jnp.ones((6, 4)) * 0.3, "bias": jnp.zeros(4)},
    "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
  }
  return delora_jax.wrap(params, {"l0/kernel": delora_jax.Rule(2, lam=5.0, init="random")})


def state_sizes(state):
  return sum(np.size(x) for x in jax.tree.leaves(state))


def test_state_only_for_adapter_leaves():
  t = tree()
  adapter_size = sum(np.size(t["l0"]["kernel"].__dict__[f]) for f in ("a", "b", "lam"))
  st = delora_jax.optimizer(optax.adam, learning_rate=1e-3).init(t)
  # adam: mu and nu per trainable leaf, plus step counters.
  assert state_sizes(st) <= 2 * adapter_size + 4
  st_split = delora_jax.optimizer(optax.adam, learning_rate=1e-3).init(delora_jax.split(t)[0])
  assert state_sizes(st_split) == state_sizes(st)
  st_head = delora_jax.optimizer(optax.adam, learning_rate=1e-3, extra_trainable="head/.*").init(t)
  assert state_sizes(st_head) == state_sizes(st) + 2 * (8 + 2)


def test_lambda_not_decayed_and_own_learning_rate():
  t = tree()
  zero_grads = jax.tree.map(jnp.zeros_like, t)
  opt = delora_jax.optimizer(optax.adamw, learning_rate=0.1, weight_decay=0.5)
  upd, _ = opt.update(zero_grads, opt.init(t), t)
  k = upd["l0"]["kernel"]
  assert float(k.lam) == 0.0  # no decay on λ
  np.testing.assert_allclose(k.a, -0.1 * 0.5 * t["l0"]["kernel"].a, rtol=1e-6)  # a is decayed
  # optax.adamw's default weight decay (1e-4) is also kept off λ.
  upd, _ = delora_jax.optimizer(optax.adamw, learning_rate=0.1).update(
    zero_grads, delora_jax.optimizer(optax.adamw, learning_rate=0.1).init(t), t
  )
  assert float(upd["l0"]["kernel"].lam) == 0.0
  upd, _ = delora_jax.optimizer(optax.adamw, learning_rate=0.1, weight_decay=0.5, decay_lam=True).update(
    zero_grads, delora_jax.optimizer(optax.adamw, learning_rate=0.1).init(t), t
  )
  np.testing.assert_allclose(float(upd["l0"]["kernel"].lam), -0.1 * 0.5 * 5.0, rtol=1e-6)
  # λ's own learning rate: with sgd the λ step is -lr_lam * grad.
  ones = jax.tree.map(jnp.ones_like, t)
  opt = delora_jax.optimizer(optax.sgd, learning_rate=0.1, lam_learning_rate=0.7)
  upd, _ = opt.update(ones, opt.init(t), t)
  assert float(upd["l0"]["kernel"].lam) == pytest.approx(-0.7)
  np.testing.assert_allclose(upd["l0"]["kernel"].a, -0.1)
  np.testing.assert_array_equal(upd["l0"]["kernel"].w, 0.0)
  np.testing.assert_array_equal(upd["head"]["kernel"], 0.0)


def test_ready_transformation_and_errors():
  t = tree()
  opt = delora_jax.optimizer(optax.sgd(0.1), lam_tx=optax.sgd(0.3))
  upd, _ = opt.update(jax.tree.map(jnp.ones_like, t), opt.init(t), t)
  assert float(upd["l0"]["kernel"].lam) == pytest.approx(-0.3)
  with pytest.raises(TypeError, match="hyperparameters.*ready GradientTransformation"):
    delora_jax.optimizer(optax.sgd(0.1), learning_rate=0.1)
  with pytest.raises(TypeError, match="`lam_learning_rate` needs a factory"):
    delora_jax.optimizer(optax.sgd(0.1), lam_learning_rate=0.1)
  with pytest.raises(TypeError, match="must be an optax factory"):
    delora_jax.optimizer(0.1)
  with pytest.raises(TypeError, match=r"optax.lbfgs is not supported.*optax.adamw"):
    delora_jax.optimizer(optax.lbfgs, learning_rate=0.1)
  with pytest.raises(ValueError, match="not a valid regular expression"):
    delora_jax.optimizer(optax.sgd, learning_rate=0.1, extra_trainable="(").init(t)


def test_nnx_optimizer_state_fits_the_restore_shardings_of_a_sharded_model():
  """tunix's PeftTrainer restores the optimizer state with shardings from
  ``nnx.get_named_sharding(state, mesh)`` once the model is sharded; that tree must have the
  state's structure (orbax maps one over the other). The parts of a partitioned state that belong
  to another group are bare MaskedNodes (the Variable labelled whole), which it reproduces; a
  label per array (inside the Variable) leaves a Variable holding a MaskedNode, which it cannot."""
  from flax import nnx

  mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
  model = delora_jax.nnx.wrap(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), {"kernel": 2})
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))

  def restore_shardings_fit(tx):
    opt_state = nnx.state(nnx.Optimizer(model, tx, wrt=nnx.LoRAParam), nnx.optimizer.OptState)
    jax.tree.map(lambda x, s: None, opt_state, nnx.get_named_sharding(opt_state, mesh))  # orbax's check

  restore_shardings_fit(delora_jax.optimizer(optax.adamw, learning_rate=1e-3))
  per_array = lambda p: jax.tree.map(lambda x: "lam" if x.ndim == 0 else "ab", p)  # noqa: E731
  with pytest.raises(ValueError, match="MaskedNode|Expected named tuple, got None"):  # jax >= 0.9 | older
    restore_shardings_fit(optax.partition({"ab": optax.adam(1e-3), "lam": optax.sgd(1e-3)}, per_array))
