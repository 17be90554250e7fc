"""delora_jax equals Hugging Face PEFT's DeLoRA: outputs, gradients, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import delora_jax
from tests import torch_mlp as tm
from tests.helpers import rel

RTOL = 1e-5


def make_pair(seed, *, init_weights, r=4, lam=15.0, rank_pattern=None, lambda_pattern=None, targets=tm.NAMES):
  torch.manual_seed(seed)
  base = tm.TorchMLP()
  cfg = peft.DeloraConfig(
    r=r,
    delora_lambda=lam,
    target_modules=list(targets),
    init_weights=init_weights,
    rank_pattern=rank_pattern or {},
    lambda_pattern=lambda_pattern or {},
  )
  pm = peft.get_peft_model(base, cfg)
  return pm


def jax_tree_from(pm, rules):
  params = tm.base_params(pm.base_model.model)
  tree = delora_jax.wrap(params, rules)
  return delora_jax.with_adapters(tree, tm.peft_adapters(pm))


def batches(seed, n, batch=16):
  rng = np.random.default_rng(seed)
  return [
    (rng.standard_normal((batch, tm.SIZES[0]), np.float32), rng.standard_normal((batch, tm.SIZES[-1]), np.float32))
    for _ in range(n)
  ]


def jax_loss(trainable, frozen, x, y):
  out = delora_jax.apply(tm.FlaxMLP(), {"params": delora_jax.combine(trainable, frozen)}, x, strict=True)
  return jnp.mean((out - y) ** 2)


def torch_loss(pm, x, y):
  return torch.mean((pm(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2)


RULE_CASES = {
  "uniform": (dict(r=4, lam=15.0), {".*kernel": delora_jax.Rule(4, lam=15.0)}),
  "patterns": (
    dict(r=4, lam=7.0, rank_pattern={"lin1": 2}, lambda_pattern={"lin0": 3.0, "lin2": 11.0}),
    {
      "lin1/kernel": delora_jax.Rule(2, lam=7.0),
      "lin0/kernel": delora_jax.Rule(4, lam=3.0),
      "lin2/kernel": delora_jax.Rule(4, lam=11.0),
    },
  ),
  "subset": (dict(r=3, lam=5.0, targets=("lin0", "lin2")), {"lin[02]/kernel": delora_jax.Rule(3, lam=5.0)}),
}


@pytest.mark.parametrize("case", list(RULE_CASES), ids=list(RULE_CASES))
def test_forward_and_gradients_match_peft(case):
  peft_kw, rules = RULE_CASES[case]
  pm = make_pair(0, init_weights=False, **peft_kw)
  tree = jax_tree_from(pm, rules)
  ((x, y),) = batches(1, 1)
  with torch.no_grad():
    want = tm.t2n(pm(torch.from_numpy(x)))
  got = delora_jax.apply(tm.FlaxMLP(), {"params": tree}, x, strict=True)
  assert rel(got, want) < RTOL
  assert rel(tm.FlaxMLP().apply({"params": delora_jax.merge(tree)}, x), want) < RTOL

  torch_loss(pm, x, y).backward()
  want_g = tm.peft_grads(pm)
  trainable, frozen = delora_jax.split(tree)
  grads = jax.grad(jax_loss)(trainable, frozen, x, y)
  got_g = delora_jax.adapters(delora_jax.combine(grads, frozen))
  assert set(got_g) == set(want_g)
  for path, fields in want_g.items():
    for f, w in fields.items():
      assert rel(got_g[path][f], w) < RTOL, (path, f, rel(got_g[path][f], w))


def _train(pm, tree, data, lr, wd):
  topt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
  opt = delora_jax.optimizer(optax.adamw, learning_rate=lr, weight_decay=wd, decay_lam=True)
  trainable, frozen = delora_jax.split(tree)
  state = opt.init(trainable)

  @jax.jit
  def step(trainable, state, x, y):
    loss, g = jax.value_and_grad(jax_loss)(trainable, frozen, x, y)
    upd, state = opt.update(g, state, trainable)
    return optax.apply_updates(trainable, upd), state, loss

  jl, tl = [], []
  for x, y in data:
    trainable, state, loss = step(trainable, state, x, y)
    jl.append(float(loss))
    topt.zero_grad()
    l = torch_loss(pm, x, y)
    l.backward()
    topt.step()
    tl.append(float(l.detach()))
  return delora_jax.combine(trainable, frozen), np.array(jl), np.array(tl)


@pytest.mark.parametrize("case", ["uniform", "patterns"])
def test_twenty_adamw_steps_match_peft(case):
  peft_kw, rules = RULE_CASES[case]
  pm = make_pair(2, init_weights=False, **peft_kw)
  tree = jax_tree_from(pm, rules)
  data = batches(3, 21)
  tree, jl, tl = _train(pm, tree, data[:20], lr=1e-2, wd=0.01)
  np.testing.assert_allclose(jl, tl, rtol=RTOL)
  assert jl[-1] < jl[0]  # it trains
  x, y = data[20]
  with torch.no_grad():
    want = float(torch_loss(pm, x, y))
  got = float(jax_loss(*delora_jax.split(tree), x, y))
  np.testing.assert_allclose(got, want, rtol=RTOL)
  for path, fields in tm.peft_adapters(pm).items():
    for f, w in fields.items():
      assert rel(delora_jax.adapters(tree)[path][f], w) < 1e-4, (path, f)


def test_peft_default_init_first_steps_match():
  """b == 0 exactly: clamped norms, huge first gradient on b, zero on a and λ."""
  pm = make_pair(4, init_weights=True)
  tree = jax_tree_from(pm, {".*kernel": 4})
  for ad in delora_jax.adapters(tree).values():
    assert not np.any(np.asarray(ad["b"]))
  data = batches(5, 3)
  x, y = data[0]
  torch_loss(pm, x, y).backward()
  want_g = tm.peft_grads(pm)
  pm.zero_grad()
  trainable, frozen = delora_jax.split(tree)
  got_g = delora_jax.adapters(delora_jax.combine(jax.grad(jax_loss)(trainable, frozen, x, y), frozen))
  for path, fields in want_g.items():
    assert np.all(np.isfinite(got_g[path]["b"]))
    assert not np.any(np.asarray(got_g[path]["a"])) and float(got_g[path]["lam"]) == 0.0
    assert rel(got_g[path]["b"], fields["b"]) < RTOL
  tree, jl, tl = _train(pm, tree, data, lr=1e-3, wd=0.0)
  np.testing.assert_allclose(jl, tl, rtol=RTOL)
  for path, fields in tm.peft_adapters(pm).items():
    for f, w in fields.items():
      assert rel(delora_jax.adapters(tree)[path][f], w) < 1e-4, (path, f)
