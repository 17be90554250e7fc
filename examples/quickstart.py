import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import delora_jax

class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, name="out")(nn.gelu(nn.Dense(64, name="hidden")(x)))

model, x = MLP(), jax.random.normal(jax.random.key(0), (256, 8))
y = jnp.sin(x.sum(axis=1, keepdims=True))
params = model.init(jax.random.key(1), x)["params"]  # stands in for pretrained weights

tree = delora_jax.wrap(params, {"hidden/kernel": delora_jax.Rule(rank=4, lam=4.0)})
trainable, frozen = delora_jax.split(tree)  # only a, b and λ train
opt = delora_jax.optimizer(optax.adamw, learning_rate=1e-2, weight_decay=0.01)
opt_state = opt.init(trainable)

def loss_fn(trainable):
  tree = delora_jax.combine(trainable, frozen)
  return jnp.mean((delora_jax.apply(model, {"params": tree}, x) - y) ** 2)

@jax.jit
def step(trainable, opt_state):
  loss, grads = jax.value_and_grad(loss_fn)(trainable)
  updates, opt_state = opt.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, loss

for _ in range(200):
  trainable, opt_state, loss = step(trainable, opt_state)
print(f"loss {loss_fn(delora_jax.split(tree)[0]):.4f} -> {loss:.4f}")
merged = delora_jax.merge(delora_jax.combine(trainable, frozen))  # plain params again
print(jax.tree.map(jnp.shape, merged))
