"""DeLoRA fine-tuning of a tiny transformer on a ("data", "model") device mesh.

The frozen base is laid out FSDP-style over "data" and tensor-parallel over
"model"; `delora_jax.shardings` derives the adapters' layout from it, `wrap`
creates the adapters directly in that layout, and one jitted, donated step
trains them. Runs as is on a CPU (8 simulated devices), a GPU or a TPU host:

    python examples/mesh_finetune.py [--steps 30] [--mesh 2,4]
"""

import os

if "XLA_FLAGS" not in os.environ:  # CPU only: simulate 8 devices. No effect on GPU/TPU.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import math  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import delora_jax as dj  # noqa: E402

VOCAB, EMBED, HEADS, HIDDEN, SEQ = 64, 32, 4, 64, 16


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h, h)
    h = nn.LayerNorm(name="ln2")(x)
    return x + nn.Dense(EMBED, name="down")(nn.gelu(nn.Dense(HIDDEN, name="up")(h)))


class TinyLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, EMBED, name="embed")(tokens)
    x = Block(name="block")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


def base_spec(path: str) -> P:
  """The base model's own layout: embed dim over "data" (FSDP), heads/hidden over "model"."""
  if path.endswith(("query/kernel", "key/kernel", "value/kernel")):  # (embed, heads, head_dim)
    return P("data", "model", None)
  if path.endswith("attn/out/kernel"):  # (heads, head_dim, embed)
    return P("model", None, "data")
  if path.endswith("up/kernel"):  # (embed, hidden)
    return P("data", "model")
  if path.endswith("down/kernel"):  # (hidden, embed)
    return P("model", "data")
  if path.endswith("head/kernel"):  # (embed, vocab)
    return P("data", None)
  if path.endswith("embed/embedding"):  # (vocab, embed)
    return P(None, "data")
  return P()  # biases and layer norms: replicated


RULES = {  # N-D attention kernels declare which axes are inputs / outputs.
  r".*attn/(query|key|value)/kernel": dj.Rule(4, lam=8.0, in_axes=0),
  r".*attn/out/kernel": dj.Rule(4, lam=8.0, out_axes=-1),
  r".*(up|down)/kernel|head/kernel": dj.Rule(4, lam=8.0),
}


def default_mesh_shape(n: int) -> tuple[int, int]:
  model = math.gcd(n, HEADS)
  return n // model, model


def main(steps: int = 30, mesh_shape: tuple[int, int] | None = None, verbose: bool = True):
  n = jax.device_count()
  shape = mesh_shape or default_mesh_shape(n)
  mesh = Mesh(np.array(jax.devices()[: shape[0] * shape[1]]).reshape(shape), ("data", "model"))
  batch = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  model = TinyLM()
  tokens = jax.random.randint(jax.random.key(1), (8 * shape[0], SEQ), 0, VOCAB)
  targets = (tokens * 3 + 1) % VOCAB  # a new mapping for the "pretrained" model to learn
  tokens, targets = jax.device_put(tokens, batch), jax.device_put(targets, batch)

  # 1. The pretrained base, laid out on the mesh (here: random init, sharded at creation).
  def init(key):
    return model.init(key, tokens)["params"]

  def named(path, _):
    return NamedSharding(mesh, base_spec(jax.tree_util.keystr(path, simple=True, separator="/")))

  base_sh = jax.tree_util.tree_map_with_path(named, jax.eval_shape(init, jax.random.key(0)))
  params = jax.jit(init, out_shardings=base_sh)(jax.random.key(0))

  # 2. Adapters created in place with the derived shardings; no spec written by hand.
  tree = dj.wrap(params, RULES, key=jax.random.key(2))
  sh = dj.shardings(tree, base_sh)
  trainable, frozen = dj.split(tree)
  t_sh, f_sh = dj.split(sh)
  if verbose:
    q = sh["block"]["attn"]["query"]["kernel"]
    print(
      f"mesh {dict(mesh.shape)}; query kernel {q.w.spec} -> a {q.a.spec}, b {q.b.spec}, "
      f"w_norm {q.w_norm.spec}, lam {q.lam.spec}"
    )

  # 3. Optimizer state next to the adapters (scalar step counts replicated).
  opt = dj.optimizer(optax.adamw, learning_rate=1e-2, weight_decay=0.01, lam_learning_rate=1e-2)
  opt_state = opt.init(trainable)
  s_sh = jax.tree.map(lambda x: x.sharding if len(x.sharding.device_set) > 1 else replicated, opt_state)
  opt_state = jax.device_put(opt_state, s_sh)

  def loss_fn(trainable, frozen, tokens, targets):
    logits = dj.apply(model, {"params": dj.combine(trainable, frozen)}, tokens, strict=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def train_step(trainable, opt_state, frozen, tokens, targets):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens, targets)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  step = jax.jit(
    train_step,
    in_shardings=(t_sh, s_sh, f_sh, batch, batch),
    out_shardings=(t_sh, s_sh, replicated),
    donate_argnums=(0, 1),
  )
  losses = []
  for i in range(steps):
    trainable, opt_state, loss = step(trainable, opt_state, frozen, tokens, targets)
    losses.append(float(loss))
    if verbose:
      print(f"step {i:3d}  loss {losses[-1]:.4f}")
  return losses


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument(
    "--mesh",
    type=lambda s: tuple(int(v) for v in s.split(",")),
    default=None,
    help="data,model sizes, e.g. 2,4 (default: all devices)",
  )
  args = parser.parse_args()
  main(args.steps, args.mesh)
