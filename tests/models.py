"""Small Linen and NNX models covering every kernel layout delora_jax adapts."""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

INIT = nn.initializers.normal(0.5)


class Attention(nn.Module):
  """q/k/v DenseGeneral (embed, heads, head_dim) and out (heads, head_dim, embed)."""

  heads: int = 2
  head_dim: int = 4

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(x)
    k = nn.DenseGeneral((self.heads, self.head_dim), name="key")(x)
    v = nn.DenseGeneral((self.heads, self.head_dim), name="value")(x)
    att = nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    x = x + Attention(name="attn")(x)
    x = x + nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(nn.Dense(16, name="mlp_in")(x)))
    return x, None


class Transformer(nn.Module):
  """Two blocks, optionally under nn.scan (params get a leading layer axis)."""

  scan: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="embed")(x)
    if self.scan:
      x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(x, None)
    else:
      for i in range(2):
        x, _ = Block(name=f"layers_{i}")(x)
    return nn.Einsum((8, 3), "bld,do->blo", name="head")(x)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME", name="conv0")(x))
    x = nn.Conv(5, (2, 2), padding="VALID", kernel_dilation=2, name="conv1")(x)
    return x.mean(axis=(1, 2))


class CustomDot(nn.Module):
  """Contracts its kernel with a plain jnp.dot: computed factorised by the generic path."""

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 5))
    return jnp.dot(x, w) + nn.Dense(5, name="dense")(x)


class CustomColumnSums(nn.Module):
  """Uses its kernel elementwise (its column sums scale the input's row sums), which no
  low-rank form can compute: it gets the merged kernel w + ΔW and is reported."""

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 5))
    return x.sum(-1, keepdims=True) * jnp.sum(w, axis=0)[None] + nn.Dense(5, name="dense")(x)


class CustomGather(nn.Module):
  """Looks rows of its kernel up by index (an embedding-style gather `kernel[ids]`), which
  no low-rank form computes: it gets the merged kernel w + ΔW and is reported."""

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 5))
    return w[jnp.argmax(x, axis=-1)] + nn.Dense(5, name="dense")(x)


TRANSFORMER_RULES = {
  r".*attn/(query|key|value)/kernel": 2,  # 2 is replaced per test
}


def transformer_rules(scan: bool, init: str = "random", rank: int = 2, lam: float = 3.0):
  from delora_jax import Rule

  s = 1 if scan else 0
  return {
    r".*attn/(query|key|value)/kernel": Rule(rank, lam, init=init, in_axes=s, stack_axes=s),
    r".*attn/out/kernel": Rule(rank, lam, init=init, out_axes=-1, stack_axes=s),
    r".*mlp_(in|out)/kernel": Rule(rank, lam, init=init, stack_axes=s),
    r"head/kernel": Rule(rank, lam, init=init),
  }


def train_steps(loss, trainable, opt, steps: int):
  """``steps`` jitted optimizer steps of ``loss(trainable)``: (trainable, losses)."""
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415

  @jax.jit
  def step(t, s):
    value, g = jax.value_and_grad(loss)(t)
    upd, s = opt.update(g, s, t)
    return optax.apply_updates(t, upd), s, value

  state, losses = opt.init(trainable), []
  for _ in range(steps):
    trainable, state, value = step(trainable, state)
    losses.append(float(value))
  return trainable, losses


class MLP(nn.Module):
  """The README quickstart's model."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, name="out")(nn.gelu(nn.Dense(64, name="hidden")(x)))


# ---------------------------------------------------------------- custom layers (Linen)


class Custom(nn.Module):
  """One parameter of ``shape`` named ``param_name``, used by ``fn(x, w)``."""

  shape: tuple
  fn: Callable
  param_name: str = "kernel"

  @nn.compact
  def __call__(self, x):
    return self.fn(x, self.param(self.param_name, INIT, self.shape))


class EinsumLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    w = self.param("kernel", INIT, (x.shape[-1], x.shape[-1]))
    return jnp.tanh(jnp.einsum("bti,io->bto", x, w)), None


class Scanned(nn.Module):
  """Two ``layer``s under nn.scan: params ``layers/...`` with a leading layer axis."""

  layer: type = EinsumLayer

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(self.layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")
    return layers(x, None)[0]


# ---------------------------------------------------------------- custom layers (NNX)


class NnxCustom(nnx.Module):
  """NNX twin of :class:`Custom`: one Param of ``shape`` named ``param_name``, used by ``fn(x, w)``."""

  def __init__(self, shape, fn, param_name="kernel", *, rngs):
    self.fn, self.param_name = fn, param_name
    setattr(self, param_name, nnx.Param(INIT(rngs.params(), shape)))

  def __call__(self, x):
    return self.fn(x, getattr(self, self.param_name)[...])


class TunixEinsum(nnx.Module):
  """tunix's Einsum layer: a Param ``w`` and the equation as an attribute."""

  def __init__(self, einsum_str, shape, *, rngs):
    self.einsum_str = einsum_str
    self.w = nnx.Param(nnx.initializers.normal(0.5)(rngs.params(), shape))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


class LaxDot(nnx.Module):
  """A custom layer contracting its kernel with lax.dot_general."""

  def __init__(self, shape, *, rngs):
    self.kernel = nnx.Param(nnx.initializers.normal(0.5)(rngs.params(), shape))

  def __call__(self, x):
    return jax.lax.dot_general(x, self.kernel[...], (((x.ndim - 1,), (0,)), ((), ())))


class Holder(nnx.Module):
  """The adapted layer as a child (paths ``layer/...``), with a nonlinearity after it."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    return jnp.tanh(self.layer(x))
