"""`delora_jax.diagnostics`: equal to the dense computation, bounded, jit-able, sharded, cheap."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import delora_jax
from delora_jax import _kernel

RTOL = 1e-5


def dense(k):
  """The four figures from the dense ΔW (float64), the definitions in the docstring."""
  dw = np.asarray(_kernel.delta_matrix(k), np.float64)
  w = np.asarray(_kernel.to_matrix(k.w, k.in_axes, k.out_axes), np.float64)
  wn = np.asarray(k.w_norm, np.float64)[..., :, None]
  learned = dw / wn
  if k.res_a is not None:  # the trained part: remove the frozen initial update
    learned = learned + np.asarray(k.res_a, np.float64) @ np.asarray(k.res_b, np.float64)
  lam = np.asarray(k.lam, np.float64)
  upd = np.linalg.norm(dw, axis=(-2, -1))
  return {
    "lam": lam,
    "update_norm": upd,
    "relative_update": upd / np.linalg.norm(w, axis=(-2, -1)),
    "bound_use": np.linalg.norm(learned, axis=(-2, -1)) / np.abs(lam),
  }


def trained(tree, seed=7):
  """Moves a, b, λ off their initial values (as training would)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return delora_jax._tree.map_kernels(
    lambda _, k: k.replace(
      a=k.a + 0.3 * jax.random.normal(next(keys), k.a.shape),
      b=k.b + 0.1 * jax.random.normal(next(keys), k.b.shape),
      lam=k.lam * 1.3,
    ),
    tree,
  )


def params():
  ks = jax.random.split(jax.random.key(0), 3)
  return {
    "dense": {"kernel": jax.random.normal(ks[0], (16, 12))},
    "attn": {"kernel": jax.random.normal(ks[1], (12, 3, 4))},  # (embed, heads, head_dim)
    "layers": {"kernel": jax.random.normal(ks[2], (3, 8, 8))},
  }  # stacked (L, in, out)


def rules(init):
  return {
    "dense/kernel": delora_jax.Rule(4, 2.0, init=init),
    "attn/kernel": delora_jax.Rule(2, 0.5, init=init, in_axes=0),
    "layers/kernel": delora_jax.Rule(3, 4.0, init=init, stack_axes=1),
  }


@pytest.mark.parametrize("init", ["peft", "random", "paper"])
def test_equal_to_the_dense_computation(init):
  tree = delora_jax.wrap(params(), rules(init))
  tree = tree if init == "peft" else trained(tree)
  d = jax.jit(delora_jax.diagnostics)(tree)
  for path, k in delora_jax._tree.kernels(tree).items():
    want, got = dense(k), d["kernels"][path]
    assert got["lam"].shape == k.lam.shape  # the stacked shape, () when not stacked
    for m, v in want.items():
      np.testing.assert_allclose(got[m], v, rtol=RTOL, atol=1e-12 if init == "peft" else 0, err_msg=f"{path} {m}")
  # summary: min / mean / max over all layers, stacked slices counted one by one
  for m in want:
    flat = np.concatenate([np.ravel(dense(k)[m]) for k in delora_jax._tree.kernels(tree).values()])
    for stat, fn in (("min", np.min), ("mean", np.mean), ("max", np.max)):
      np.testing.assert_allclose(d["summary"][m][stat], fn(flat), rtol=RTOL, atol=1e-12)


def test_bound_use_is_in_zero_one_and_saturates_for_aligned_directions():
  tree = trained(delora_jax.wrap(params(), rules("random")), seed=3)
  for seed in range(5):
    d = delora_jax.diagnostics(trained(tree, seed))
    b = np.concatenate([np.ravel(f["bound_use"]) for f in d["kernels"].values()])
    assert np.all(b >= 0.0) and np.all(b <= 1.0 + 1e-6)
  # All rank-one terms in one direction: the bound is used fully.
  k = delora_jax._tree.kernels(tree)["dense/kernel"]
  a = jnp.tile(k.a[:, :1], (1, 4))
  b = jnp.tile(k.b[:1, :], (4, 1))
  full = delora_jax.wrap({"kernel": params()["dense"]["kernel"]}, {"kernel": 4})
  full = delora_jax._tree.map_kernels(lambda _, k: k.replace(a=a, b=b), full)
  np.testing.assert_allclose(delora_jax.diagnostics(full)["kernels"]["kernel"]["bound_use"], 1.0, rtol=1e-5)


def test_summary_counts_only_the_adapted_slices():
  # Rule(slices=(1,)): slices 0 and 2 are left out (λ = 0, w_norm = 0) and must not pull the
  # summary's min and mean down; the plain kernel beside it is counted as usual.
  p = params()
  sliced = delora_jax.Rule(3, 3.0, stack_axes=1, slices=(1,))
  rules = {"dense/kernel": delora_jax.Rule(4, 2.0, init="random"), "layers/kernel": sliced}
  tree = trained(delora_jax.wrap({"dense": p["dense"], "layers": p["layers"]}, rules))
  d = jax.jit(delora_jax.diagnostics)(tree)
  np.testing.assert_allclose(d["kernels"]["layers/kernel"]["lam"], [0.0, 3.9, 0.0], rtol=RTOL)  # every slice
  for m in ("lam", "update_norm", "relative_update", "bound_use"):
    counted = [float(d["kernels"]["dense/kernel"][m]), float(d["kernels"]["layers/kernel"][m][1])]
    got = d["summary"][m]
    np.testing.assert_allclose(
      [got["min"], got["mean"], got["max"]], [min(counted), np.mean(counted), max(counted)], rtol=RTOL, err_msg=m
    )


def test_peft_init_is_zero_and_nnx_models_work():
  model = nnx.Linear(10, 6, rngs=nnx.Rngs(0))
  adapted = delora_jax.nnx.wrap(model, {"kernel": 3})
  d = delora_jax.diagnostics(adapted)
  assert float(d["kernels"]["kernel"]["update_norm"]) == 0.0
  assert float(d["kernels"]["kernel"]["bound_use"]) == 0.0
  np.testing.assert_allclose(d["kernels"]["kernel"]["lam"], 15.0)
  rnd = delora_jax.nnx.wrap(model, {"kernel": delora_jax.Rule(3, init="random")})
  from delora_jax import _nnx

  k = _nnx.kernels(rnd)["kernel"]
  for m, v in dense(k).items():
    np.testing.assert_allclose(delora_jax.diagnostics(rnd)["kernels"]["kernel"][m], v, rtol=RTOL)


def test_inside_a_jitted_step_and_under_grad():
  tree = trained(delora_jax.wrap(params(), rules("random")))
  trainable, frozen = delora_jax.split(tree)

  @jax.jit
  def step(t):
    def loss(t):
      d = delora_jax.diagnostics(delora_jax.combine(t, frozen))
      return d["summary"]["bound_use"]["mean"], d

    (value, d), g = jax.value_and_grad(loss, has_aux=True)(t)
    return value, d["summary"]["relative_update"]["max"], g

  value, rel_max, g = step(trainable)
  assert 0.0 < float(value) <= 1.0 and float(rel_max) > 0.0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))


def test_sharded_tree_no_kernel_sized_gather():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  w = jax.device_put(jax.random.normal(jax.random.key(1), (64, 32)), NamedSharding(mesh, P("data", "model")))
  tree = trained(delora_jax.wrap({"kernel": w}, {"kernel": delora_jax.Rule(4, init="random")}))
  want = delora_jax.diagnostics(jax.device_get(tree))
  fn = jax.jit(delora_jax.diagnostics)
  got = fn(tree)
  for m in ("lam", "update_norm", "relative_update", "bound_use"):
    np.testing.assert_allclose(got["kernels"]["kernel"][m], want["kernels"]["kernel"][m], rtol=RTOL)
  hlo = fn.lower(tree).compile().as_text()
  gathered = [
    int(np.prod([int(d) for d in s.split(",") if d])) for s in re.findall(r"f32\[([\d,]*)\][^\n]*all-gather\(", hlo)
  ]
  assert all(n < 64 * 32 // 4 for n in gathered), gathered  # never the kernel, only small factors


def test_errors():
  with pytest.raises(ValueError, match="diagnostics.*no DeLoRA-adapted kernel"):
    delora_jax.diagnostics({"kernel": jnp.ones((4, 4))})
