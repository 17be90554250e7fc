"""A small torch MLP adapted with PEFT's DeLoRA, and the same model in Flax Linen.

Shared by the parity tests: builds both sides from the same weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch

SIZES = (12, 32, 24, 8)  # in -> lin0 -> lin1 -> lin2
NAMES = ("lin0", "lin1", "lin2")


class TorchMLP(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.lin0 = torch.nn.Linear(SIZES[0], SIZES[1])
    self.lin1 = torch.nn.Linear(SIZES[1], SIZES[2])
    self.lin2 = torch.nn.Linear(SIZES[2], SIZES[3])

  def forward(self, x):
    x = torch.tanh(self.lin0(x))
    x = torch.tanh(self.lin1(x))
    return self.lin2(x)


class FlaxMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(SIZES[1], name="lin0")(x))
    x = jnp.tanh(nn.Dense(SIZES[2], name="lin1")(x))
    return nn.Dense(SIZES[3], name="lin2")(x)


def t2n(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().numpy().copy()


def base_params(torch_model) -> dict:
  """Flax params (kernel = weight.T) of the torch base layers."""
  out = {}
  for name in NAMES:
    lin = torch_model.get_submodule(name)
    lin = getattr(lin, "base_layer", lin)
    out[name] = {"kernel": jnp.asarray(t2n(lin.weight).T), "bias": jnp.asarray(t2n(lin.bias))}
  return out


def _per_layer(peft_model, read) -> dict:
  """``{"<name>/kernel": read(layer)}`` for every DeLoRA-adapted layer."""
  out = {}
  for name in NAMES:
    layer = peft_model.base_model.model.get_submodule(name)
    if hasattr(layer, "delora_A"):
      out[f"{name}/kernel"] = read(layer)
  return out


def peft_adapters(peft_model, adapter="default") -> dict:
  """delora_jax.adapters()-shaped dict read from a PEFT DeLoRA model."""
  return _per_layer(
    peft_model,
    lambda l: {
      "a": jnp.asarray(t2n(l.delora_A[adapter]).T),
      "b": jnp.asarray(t2n(l.delora_B[adapter]).T),
      "lam": jnp.asarray(t2n(l.delora_lambda[adapter]).reshape(())),
      "w_norm": jnp.asarray(t2n(l.delora_w_norm[adapter])),
    },
  )


def peft_grads(peft_model, adapter="default") -> dict:
  """Gradients of a, b, λ in delora_jax orientation."""
  return _per_layer(
    peft_model,
    lambda l: {
      "a": t2n(l.delora_A[adapter].grad).T,
      "b": t2n(l.delora_B[adapter].grad).T,
      "lam": t2n(l.delora_lambda[adapter].grad).reshape(()),
    },
  )
