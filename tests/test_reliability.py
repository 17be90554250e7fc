"""Bad input found by an adversarial pass (issue 13): each a clear error, or handled."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import delora_jax


@pytest.mark.parametrize("lam, dtype", [(1e39, "float32"), (7e4, "float16"), (1e5, "float16")],
                         ids=["f32", "f16", "f16_big"])
def test_lam_that_overflows_the_adapter_dtype_is_refused(lam, dtype):
  with pytest.raises(ValueError, match=rf"`lam`=.* overflows the adapter dtype {dtype}"):
    delora_jax.Rule(4, lam, dtype=dtype)
  delora_jax.Rule(4, 6e4, dtype="float16")  # representable: accepted


def test_lam_zero_with_peft_init_is_refused_and_allowed_otherwise():
  with pytest.raises(ValueError, match="zero gradients .* could never train"):
    delora_jax.Rule(4, 0.0)
  # With a random b, λ itself gets a gradient and moves off 0.
  tree = delora_jax.wrap({"kernel": jax.random.normal(jax.random.key(0), (6, 5))},
                         {"kernel": delora_jax.Rule(2, 0.0, init="random")})
  trainable, frozen = delora_jax.split(tree)
  x = jax.random.normal(jax.random.key(1), (3, 6))
  g = jax.grad(lambda t: jnp.sum((x @ delora_jax.merge(delora_jax.combine(t, frozen))["kernel"]) ** 2))(trainable)
  assert float(jnp.abs(g["kernel"].lam)) > 0.0


@pytest.mark.parametrize("call, match", [
    (lambda: delora_jax.Rule(4, dropout="x"), r"`dropout` must be a probability"),
    (lambda: delora_jax.Rule(4, dropout=True), r"`dropout` must be a probability"),
    (lambda: delora_jax.split(delora_jax.wrap({"kernel": jnp.ones((4, 4))}, {"kernel": 2}),
                              extra_trainable=3), r"`extra_trainable` must be a regex string"),
    (lambda: delora_jax.wrap({"kernel": jnp.ones((4, 4))}, {"kernel": 2}, key=0),
     r"`key` must be a PRNG key"),
], ids=["dropout_str", "dropout_bool", "extra_trainable_int", "key_int"])
def test_type_errors_name_the_argument(call, match):
  with pytest.raises(TypeError, match=match):
    call()


def test_raw_uint32_keys_still_work():
  a = delora_jax.wrap({"kernel": jnp.ones((4, 4))}, {"kernel": 2}, key=jax.random.PRNGKey(3))
  b = delora_jax.wrap({"kernel": jnp.ones((4, 4))}, {"kernel": 2},
                      key=np.asarray(jax.random.PRNGKey(3)))
  np.testing.assert_array_equal(a["kernel"].a, b["kernel"].a)


def test_none_leaves_survive_split_and_combine():
  tree = delora_jax.wrap({"dense": {"kernel": jnp.ones((4, 4)), "bias": None}, "opt": None},
                         {"dense/kernel": 2})
  back = delora_jax.combine(*delora_jax.split(tree))
  assert back["opt"] is None and back["dense"]["bias"] is None
  np.testing.assert_array_equal(back["dense"]["kernel"].w, tree["dense"]["kernel"].w)


def test_safe_merge_blames_a_broken_base_kernel_not_the_adapter():
  w = jnp.ones((4, 4)).at[1, 2].set(jnp.inf)
  tree = delora_jax.wrap({"kernel": w}, {"kernel": 2})
  with pytest.raises(ValueError, match=r"kernel: the base kernel itself has NaN or inf"):
    delora_jax.merge(tree, safe=True)
  ok = delora_jax.wrap({"kernel": jnp.ones((4, 4))}, {"kernel": delora_jax.Rule(2, init="random")})
  bad = delora_jax._tree.map_kernels(lambda _, k: k.replace(lam=k.lam * jnp.inf), ok)
  with pytest.raises(ValueError, match=r"kernel: merged kernel has NaN or inf .* adapter is broken"):
    delora_jax.merge(bad, safe=True)


def test_conftest_keeps_the_users_xla_flags():
  """The test setup adds the 8-device flag to XLA_FLAGS the user already has."""
  code = ("import os, sys; sys.path.insert(0, os.getcwd()); import tests.conftest, jax; "
          "print(os.environ['XLA_FLAGS']); print(jax.local_device_count())")
  for flags in ("", "--xla_cpu_enable_fast_math=false"):
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    got_flags, devices = out.stdout.strip().splitlines()[-2:]
    assert flags in got_flags and "--xla_force_host_platform_device_count=8" in got_flags
    assert devices == "8"


def test_paper_init_bound_holds_for_the_trained_part_exactly():
  from delora_jax import _kernel
  w = jax.random.normal(jax.random.key(0), (12, 10))
  tree = delora_jax.wrap({"kernel": w}, {"kernel": delora_jax.Rule(4, 2.0, init="paper")})
  for seed in range(4):  # as if trained: a, b and λ moved
    ks = jax.random.split(jax.random.key(seed), 3)
    t = delora_jax._tree.map_kernels(
        lambda _, k, ks=ks, seed=seed: k.replace(a=k.a + jax.random.normal(ks[0], k.a.shape),
                                                 b=k.b + jax.random.normal(ks[1], k.b.shape),
                                                 lam=k.lam * (1 + seed)), tree)
    k = t["kernel"]
    lam = float(jnp.abs(k.lam))
    trained = k.a * _kernel.scales(k.a, k.b, k.lam)[..., None, :] @ k.b
    res = float(jnp.linalg.norm(k.res_a @ k.res_b))
    rel = delora_jax.delta(t)["kernel"] / k.w_norm[:, None]
    assert float(jnp.linalg.norm(trained)) <= lam * (1 + 1e-6)
    assert float(jnp.linalg.norm(rel)) <= (lam + res) * (1 + 1e-6)
    np.testing.assert_allclose(rel, trained - k.res_a @ k.res_b, rtol=1e-5, atol=1e-6)


def test_wrong_input_width_names_the_kernel():
  import flax.linen as nn
  model = nn.Dense(4)
  params = model.init(jax.random.key(0), jnp.ones((1, 6)))["params"]
  tree = delora_jax.wrap(params, {"kernel": 2})
  with pytest.raises(ValueError, match=r"kernel: the layer's input has trailing shape \(5,\), "
                                       r"but its kernel \(6, 4\) expects inputs of shape \(6,\)"):
    delora_jax.apply(model, {"params": tree}, jnp.ones((2, 5)))


def test_optimizer_without_the_split_extra_trainable_is_an_error_at_init():
  import optax
  tree = delora_jax.wrap({"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}, {"kernel": 2})
  trainable, _ = delora_jax.split(tree, extra_trainable=".*bias")
  with pytest.raises(ValueError, match=r"bias is in the trainable half .* never train"):
    delora_jax.optimizer(optax.adam, learning_rate=1e-3).init(trainable)
  state = delora_jax.optimizer(optax.adam, learning_rate=1e-3, extra_trainable=".*bias").init(trainable)
  assert state is not None
  delora_jax.optimizer(optax.adam, learning_rate=1e-3).init(tree)  # the full tree: bias frozen
