"""Bad input found by an adversarial pass (issue 13): each a clear error, or handled."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import delora_jax


@pytest.mark.parametrize(
  "lam, dtype", [(1e39, "float32"), (7e4, "float16"), (1e5, "float16")], ids=["f32", "f16", "f16_big"]
)
def test_lam_that_overflows_the_adapter_dtype_is_refused(lam, dtype):
  with pytest.raises(ValueError, match=rf"`lam`=.* overflows the adapter dtype {dtype}"):
    delora_jax.Rule(4, lam, dtype=dtype)
  delora_jax.Rule(4, 6e4, dtype="float16")  # representable: accepted


def test_lam_zero_with_peft_init_is_refused_and_allowed_otherwise():
  with pytest.raises(ValueError, match="zero gradients .* could never train"):
    delora_jax.Rule(4, 0.0)
  # With a random b, λ itself gets a gradient and moves off 0.
  tree = delora_jax.wrap(
    {"kernel": jax.random.normal(jax.random.key(0), (6, 5))}, {"kernel": delora_jax.Rule(2, 0.0, init="random")}
  )
  trainable, frozen = delora_jax.split(tree)
  x = jax.random.normal(jax.random.key(1), (3, 6))
  g = jax.grad(lambda t: jnp.sum((x @ delora_jax.merge(delora_jax.combine(t, frozen))["kernel"]) ** 2))(trainable)
  assert float(jnp.abs(g["kernel"].lam)) > 0.0


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: delora_jax.Rule(4, dropout="x"), r"`dropout` must be a probability"),
    (lambda: delora_jax.Rule(4, dropout=True), r"`dropout` must be a probability"),
    (
      lambda: delora_jax.split(delora_jax.wrap({"kernel": jnp.ones((4, 4))}, {"kernel": 2}), extra_trainable=3),
      r"`extra_trainable` must be a regex string",
    ),
    (lambda: delora_jax.wrap({"kernel": jnp.ones((4, 4))}, {"kernel": 2}, key=0), r"`key` must be a PRNG key"),
  ],
  ids=["dropout_str", "dropout_bool", "extra_trainable_int", "key_int"],
)
def test_type_errors_name_the_argument(call, match):
  with pytest.raises(TypeError, match=match):
    call()


def test_raw_uint32_keys_still_work():
  a = delora_jax.wrap({"kernel": jnp.ones((4, 4))}, {"kernel": 2}, key=jax.random.PRNGKey(3))
  b = delora_jax.wrap({"kernel": jnp.ones((4, 4))}, {"kernel": 2}, key=np.asarray(jax.random.PRNGKey(3)))
  np.testing.assert_array_equal(a["kernel"].a, b["kernel"].a)


def test_none_leaves_survive_split_and_combine():
  tree = delora_jax.wrap({"dense": {"kernel": jnp.ones((4, 4)), "bias": None}, "opt": None}, {"dense/kernel": 2})
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
  code = (
    "import os, sys; sys.path.insert(0, os.getcwd()); import tests.conftest, jax; "
    "print(os.environ['XLA_FLAGS']); print(jax.local_device_count())"
  )
  for flags in ("", "--xla_cpu_enable_fast_math=false"):
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
      [sys.executable, "-c", code],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
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
      lambda _, k, ks=ks, seed=seed: k.replace(
        a=k.a + jax.random.normal(ks[0], k.a.shape), b=k.b + jax.random.normal(ks[1], k.b.shape), lam=k.lam * (1 + seed)
      ),
      tree,
    )
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
  with pytest.raises(
    ValueError,
    match=r"kernel: the layer's input has trailing shape \(5,\), "
    r"but its kernel \(6, 4\) expects inputs of shape \(6,\)",
  ):
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


# --- #4: float16 adapters ----------------------------------------------------------------


@pytest.mark.parametrize("init", ["peft", "random", "paper"])
def test_float16_adapters_are_finite_and_match_float32(init):
  from tests.models import MLP  # noqa: PLC0415

  model, x = MLP(), jax.random.normal(jax.random.key(0), (16, 8))
  params = model.init(jax.random.key(1), x)["params"]
  tree16 = delora_jax.wrap(params, {"hidden/kernel": delora_jax.Rule(4, 2.0, init=init, dtype="float16")})
  k16 = tree16["hidden"]["kernel"]
  # The same adapter values in float32 (random draws differ between dtypes).
  k32 = k16.replace(
    **{f: getattr(k16, f).astype(jnp.float32) for f in ("a", "b", "lam", "w_norm") if getattr(k16, f) is not None},
    **(
      {"res_a": k16.res_a.astype(jnp.float32), "res_b": k16.res_b.astype(jnp.float32)} if k16.res_a is not None else {}
    ),
  )
  out = {}
  for dtype, k in (("float16", k16), ("float32", k32)):
    tree = {**tree16, "hidden": {**tree16["hidden"], "kernel": k}}
    trainable, frozen = delora_jax.split(tree)

    def loss(t, frozen=frozen):
      return jnp.mean(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x) ** 2)

    value, grads = jax.value_and_grad(loss)(trainable)
    merged = delora_jax.merge(tree)["hidden"]["kernel"]
    for leaf in [value, merged, *jax.tree.leaves(grads)]:
      assert bool(jnp.all(jnp.isfinite(leaf))), (dtype, leaf)
    out[dtype] = (value, merged, grads["hidden"]["kernel"].a)
  # float16 factors round the update to ~1e-3 relative; the base kernel stays float32.
  np.testing.assert_allclose(out["float16"][1], out["float32"][1], rtol=0, atol=2e-3)
  np.testing.assert_allclose(out["float16"][0], out["float32"][0], rtol=1e-2)
  g16, g32 = np.asarray(out["float16"][2], np.float32), np.asarray(out["float32"][2])
  np.testing.assert_allclose(g16, g32, rtol=0, atol=2e-2 * np.abs(g32).max() + 1e-6)


def test_float16_zero_b_norm_is_clamped_not_zero():
  from delora_jax import _kernel  # noqa: PLC0415

  b = jnp.zeros((3, 5), jnp.float16)
  norm = _kernel.clamped_norm(b, -1)
  np.testing.assert_allclose(norm, _kernel.NORM_EPS, rtol=1e-6)  # 1e-8 is 0 in float16
  a = jnp.full((4, 3), 1e-3, jnp.float16)  # s = λ/r/(|a||b|) ~ 1e7 overflows float16...
  u, v = _kernel.normalised(a, jnp.full((3, 5), 1e-3, jnp.float16), jnp.asarray(1.0, jnp.float16))
  assert u.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(u @ v)))  # ...its halves do not
  np.testing.assert_allclose(np.linalg.norm(np.asarray(u, np.float32), axis=0), 1 / 3, rtol=1e-3)


# --- #7: huge learning rates -------------------------------------------------------------


# XLA's cheaper CPU code generation: these runs are compiled once each and take 0.1 s to run.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _quickstart_run(tx, steps, rules=None, **hyper):
  """The README quickstart's model and loop (``steps`` steps in one ``lax.scan``, compiled once);
  returns the per-step losses and the final tree."""
  import optax  # noqa: PLC0415

  from tests.models import MLP  # noqa: PLC0415

  model, x = MLP(), jax.random.normal(jax.random.key(0), (256, 8))
  y = jnp.sin(x.sum(axis=1, keepdims=True))
  params = model.init(jax.random.key(1), x)["params"]
  tree = delora_jax.wrap(params, rules or {"hidden/kernel": delora_jax.Rule(rank=4, lam=4.0)})
  trainable, frozen = delora_jax.split(tree)
  opt = delora_jax.optimizer(tx, **hyper)

  def loss_fn(t):
    return jnp.mean((delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x) - y) ** 2)

  def step(carry, _):
    t, s = carry
    loss, g = jax.value_and_grad(loss_fn)(t)
    u, s = opt.update(g, s, t, value=loss)  # `value`: for polyak_sgd; the others ignore it
    return (optax.apply_updates(t, u), s), loss

  state = opt.init(trainable)
  run = jax.jit(lambda t, s: jax.lax.scan(step, (t, s), length=steps)).lower(trainable, state).compile(_FAST_COMPILE)
  (trainable, _), losses = run(trainable, state)
  return np.asarray(losses), delora_jax.combine(trainable, frozen)


def _assert_finite_with_the_bound_held(losses, tree):
  from delora_jax import _optim  # noqa: PLC0415

  assert np.all(np.isfinite(losses)), f"first non-finite loss at step {np.flatnonzero(~np.isfinite(losses))[:1]}"
  figures = delora_jax.diagnostics(tree)["kernels"]
  for path, k in delora_jax._tree.kernels(tree).items():
    for leaf in (k.a, k.b, k.lam):
      assert bool(jnp.all(jnp.isfinite(leaf))), path
    # The applied updates are rounded to the adapters' dtype (2 eps), and this norm is summed in another
    # order than the bound's (n/2 eps for n squares: jax versions reduce differently).
    n = max(k.a.shape[-2], k.b.shape[-1])
    rounding = 1 + (2 + n / 2) * float(jnp.finfo(k.a.dtype).eps)
    assert float(jnp.abs(k.lam).max()) <= _optim.lam_limit(k.lam.dtype) * rounding, path
    limit = _optim.factor_limit(k.a.dtype) * rounding
    assert float(jnp.linalg.norm(k.a.astype(jnp.float32), axis=0).max()) <= limit, path
    assert float(jnp.linalg.norm(k.b.astype(jnp.float32), axis=1).max()) <= limit, path
    assert float(figures[path]["bound_use"]) <= 1.0 + 1e-5, path
  assert all(bool(jnp.isfinite(w).all()) for w in jax.tree.leaves(delora_jax.merge(tree)))


# Every optimizer family of optax (optax/_src/alias.py; lbfgs and optimistic_adam, renamed twice, aside):
# (factory, hyperparameters, id). sm3 gets λ its own optimizer: optax's sm3 cannot take a 0-d
# parameter (λ of an unstacked kernel).
FAMILIES = {
  "adamw_wd0.01": ("adamw", {"weight_decay": 0.01}),
  "adamw_wd0.1": ("adamw", {"weight_decay": 0.1}),
  "adam": ("adam", {}),
  "nadamw": ("nadamw", {"weight_decay": 0.01}),
  "adamax": ("adamax", {}),
  "adamaxw": ("adamaxw", {}),
  "amsgrad": ("amsgrad", {}),
  "adabelief": ("adabelief", {}),
  "radam": ("radam", {}),
  "yogi": ("yogi", {}),
  "adan": ("adan", {}),
  "sgd": ("sgd", {}),
  "sgd_momentum": ("sgd", {"momentum": 0.9}),
  "sgd_nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
  "optimistic_gd": ("optimistic_gradient_descent", {}),
  "sign_sgd": ("sign_sgd", {}),
  "noisy_sgd": ("noisy_sgd", {"key": 0}),
  "polyak_sgd": ("polyak_sgd", {}),
  "rprop": ("rprop", {}),
  "adafactor": ("adafactor", {}),
  "lamb": ("lamb", {}),
  "lars": ("lars", {}),
  "novograd": ("novograd", {}),
  "fromage": ("fromage", {}),
  "lion": ("lion", {}),
  "rmsprop": ("rmsprop", {}),
  "adagrad": ("adagrad", {}),
  "adadelta": ("adadelta", {}),
  "sm3": ("sm3", {"lam_tx": "adam"}),
}
# lr=1e3 for every family; lr=10 too for those that went NaN there before λ was bounded.
HIGH_RATES = [(f, 1e3) for f in FAMILIES] + [(f, 10.0) for f in ("adafactor", "lamb", "sgd")]


def _family(family, learning_rate):
  import optax  # noqa: PLC0415

  name, hyper = FAMILIES[family]
  hyper = dict(hyper)
  if "lam_tx" in hyper:
    hyper["lam_tx"] = getattr(optax, hyper["lam_tx"])(learning_rate)
  rate = "max_learning_rate" if name == "polyak_sgd" else "learning_rate"
  return getattr(optax, name), {rate: learning_rate, **hyper}


@pytest.mark.parametrize("family, learning_rate", HIGH_RATES, ids=[f"{f}-lr{lr:g}" for f, lr in HIGH_RATES])
def test_every_optax_family_stays_finite_with_the_bound_held(family, learning_rate):
  tx, hyper = _family(family, learning_rate)
  _assert_finite_with_the_bound_held(*_quickstart_run(tx, 400, **hyper))


# The float32 state wraps whatever transformation is given; these families cover the kinds of
# state optax keeps (moments, factored moments, trust ratios, signs, accumulators, none).
LOW_PRECISION = ["adamw_wd0.01", "adam", "sgd", "sgd_momentum", "adafactor", "lamb", "lion", "rmsprop", "adagrad"]


@pytest.mark.parametrize("family", LOW_PRECISION)
def test_low_precision_adapters_stay_finite_with_every_optax_family(family):
  # float16 (hidden) and bfloat16 (out) adapters at lr=1e-3, optimizer state and arithmetic in
  # float32: in float16, Adam's eps (1e-8) and the square of a small gradient are 0, and PEFT's
  # start (b = 0, so grad a = 0) gave 0/0, NaN from step 2.
  rules = {
    "hidden/kernel": delora_jax.Rule(4, 4.0, dtype="float16"),
    "out/kernel": delora_jax.Rule(1, 4.0, dtype="bfloat16"),
  }
  tx, hyper = _family(family, 1e-3)
  losses, tree = _quickstart_run(tx, 100, rules, **hyper)
  _assert_finite_with_the_bound_held(losses, tree)
  if family.startswith("adam"):
    assert losses[-1] < 0.9 * losses[0]  # and it trains
  for path, dtype in (("hidden", jnp.float16), ("out", jnp.bfloat16)):
    k = tree[path]["kernel"]
    assert k.a.dtype == k.b.dtype == k.lam.dtype == dtype  # the adapters keep their dtype


def test_factor_bound_does_not_touch_updates_in_the_normal_range():
  import optax  # noqa: PLC0415

  from delora_jax import _optim  # noqa: PLC0415

  tree = delora_jax.wrap(
    {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}, {"kernel": delora_jax.Rule(3, 2.0, init="random")}
  )
  trainable, _ = delora_jax.split(tree)
  updates = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), trainable)
  got, _ = _optim.bounded_factors().update(updates, optax.EmptyState(), trainable)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(got)):
    np.testing.assert_array_equal(u, g)  # bit for bit


def test_factor_bound_rescales_unseen_by_the_model():
  import optax  # noqa: PLC0415

  from delora_jax import _optim  # noqa: PLC0415

  tree = delora_jax.wrap(
    {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}, {"kernel": delora_jax.Rule(3, 2.0, init="random")}
  )
  trainable, frozen = delora_jax.split(tree)
  k = trainable["kernel"]
  # An update that multiplies the factors by -9 (AdamW at lr=1e3, weight_decay=0.01), 12 times over.
  grow = k.replace(a=k.a * (-(9.0**12) - 1), b=k.b * (-(9.0**12) - 1), lam=jnp.zeros_like(k.lam))
  got, _ = _optim.bounded_factors().update({"kernel": grow}, optax.EmptyState(), trainable)
  new = optax.apply_updates(trainable, got)["kernel"]
  limit = _optim.factor_limit(jnp.float32)
  assert float(jnp.linalg.norm(new.a, axis=0).max()) <= limit * (1 + 1e-6)
  assert float(jnp.linalg.norm(new.b, axis=1).max()) <= limit * (1 + 1e-6)
  before = delora_jax.delta(delora_jax.combine(trainable, frozen))["kernel"]
  after = delora_jax.delta(delora_jax.combine({"kernel": new}, frozen))["kernel"]
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6 * float(jnp.abs(before).max()))


def test_factor_bound_lands_the_column_past_the_limit_on_it_and_moves_the_rest_by_one_rounding_at_most():
  import optax  # noqa: PLC0415

  from delora_jax import _optim  # noqa: PLC0415

  keys = jax.random.split(jax.random.key(3), 4)
  tree = delora_jax.wrap(
    {"p": jax.random.normal(keys[0], (8, 6)), "q": jax.random.normal(keys[1], (5, 7))},
    {".*": delora_jax.Rule(3, 2.0, init="random")},
  )
  trainable, _ = delora_jax.split(tree)
  ups = jax.tree.map(lambda x: 10.0 * jax.random.normal(keys[2], x.shape), trainable)
  grow = ups["p"].a.at[:, 1].set(1e13)  # one column of p's a goes past the limit: the branch runs
  ups = {"p": ups["p"].replace(a=grow), "q": ups["q"]}
  got, _ = jax.jit(_optim.bounded_factors().update)(ups, optax.EmptyState(), trainable)
  new = optax.apply_updates(trainable, got)
  limit = _optim.factor_limit(jnp.float32)
  assert float(jnp.linalg.norm(new["p"].a[:, 1])) == pytest.approx(limit, rel=1e-6)
  plain = optax.apply_updates(trainable, ups)
  keep = np.array([0, 2])  # p's other columns, and every column and row of q: x + u to one rounding
  np.testing.assert_array_max_ulp(np.asarray(new["p"].a)[:, keep], np.asarray(plain["p"].a)[:, keep], maxulp=1)
  for got_x, want in ((new["p"].b, plain["p"].b), (new["q"].a, plain["q"].a), (new["q"].b, plain["q"].b)):
    np.testing.assert_array_max_ulp(np.asarray(got_x), np.asarray(want), maxulp=1)


def test_factor_bound_branch_keeps_float64_updates_in_float64():
  """x64: in a step where one column is rescaled, a float64 update elsewhere keeps float64 precision
  (the branch computes in float32 only for float32 factors)."""
  import optax  # noqa: PLC0415

  from delora_jax import _optim  # noqa: PLC0415

  with jax.enable_x64(True):
    rule = delora_jax.Rule(2, 2.0, init="random", dtype="float64")
    tree = delora_jax.wrap({"p": jnp.ones((6, 4), jnp.float64), "q": jnp.ones((5, 3), jnp.float64)}, {".*": rule})
    trainable, _ = delora_jax.split(tree)
    ups = jax.tree.map(lambda x: jnp.full(x.shape, 1e-9, x.dtype), trainable)
    ups = {"p": ups["p"].replace(a=ups["p"].a.at[:, 0].set(1e13)), "q": ups["q"]}
    got, _ = _optim.bounded_factors().update(ups, optax.EmptyState(), trainable)
    assert got["q"].a.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got["q"].a), 1e-9, rtol=1e-6)  # float32 arithmetic gives 0 or 1.2e-7


def test_factor_bound_is_one_branch_for_the_whole_tree():
  """The norms are checked everywhere; the rescale sits under one lax.cond, so a step with every
  norm below the limit does not compute it."""
  import optax  # noqa: PLC0415

  from delora_jax import _optim  # noqa: PLC0415

  tree = delora_jax.wrap({f"k{i}": jnp.ones((6, 4)) for i in range(3)}, {".*": delora_jax.Rule(2, init="random")})
  trainable, _ = delora_jax.split(tree)
  jaxpr = jax.make_jaxpr(_optim.bounded_factors().update)(trainable, optax.EmptyState(), trainable)
  conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
  assert len(conds) == 1 and len(conds[0].outvars) == 6  # a and b of the three kernels


@pytest.mark.parametrize("dtype, limit", [("float32", 1e4), ("bfloat16", 1e4), ("float16", 65504**0.5)])
def test_lam_bound_clips_only_past_the_limit(dtype, limit):
  import optax  # noqa: PLC0415

  from delora_jax import _optim  # noqa: PLC0415

  assert _optim.lam_limit(dtype) == pytest.approx(limit, rel=1e-12)
  tree = delora_jax.wrap({"kernel": jnp.ones((4, 3))}, {"kernel": delora_jax.Rule(2, 3.0, dtype=dtype)})
  trainable, _ = delora_jax.split(tree)
  k = trainable["kernel"]
  zero = jax.tree.map(jnp.zeros_like, k)

  def step(lam, u):
    params = {"kernel": k.replace(lam=jnp.asarray(lam, dtype))}
    got, _ = _optim.bounded_factors().update({"kernel": zero.replace(lam=jnp.asarray(u, dtype))}, None, params)
    return float(optax.apply_updates(params, got)["kernel"].lam)

  def held(lam):  # as the dtype holds it
    return float(jnp.asarray(lam, dtype))

  ulp = float(jnp.finfo(dtype).eps)  # the clipped update and the sum are each rounded to the dtype
  assert step(3.0, 100.0) == 103.0  # below the limit: untouched
  assert step(3.0, 6e4) == pytest.approx(limit, rel=2 * ulp)  # past it: onto it
  assert step(3.0, -6e4) == pytest.approx(-limit, rel=2 * ulp)
  if dtype != "float16":  # a λ set above the limit is not grown further, but may shrink
    assert step(2e4, 1e3) == held(2e4) and step(2e4, -1e3) == held(held(2e4) - 1e3)


# --- issue 21: numerics at the edges (L2, L3) ---------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_huge_base_kernels_get_finite_norms(dtype):
  # Entries near 1e20 are legal in float32 and bfloat16, but their squares overflow: the norm
  # of such a row is taken scaled by its largest entry.
  from tests.models import MLP  # noqa: PLC0415

  model, x = MLP(), jnp.ones((2, 8))
  params = model.init(jax.random.key(1), x)["params"]
  w = params["hidden"]["kernel"]
  params = {**params, "hidden": {**params["hidden"], "kernel": (w * 1e20).astype(dtype)}}
  tree = delora_jax.wrap(params, {"hidden/kernel": delora_jax.Rule(4, 2.0, init="random")})
  k = tree["hidden"]["kernel"]
  want = np.linalg.norm(np.asarray(k.w, np.float64), axis=1)
  np.testing.assert_allclose(np.asarray(k.w_norm, np.float64), want, rtol=1e-6)
  assert bool(jnp.isfinite(delora_jax.merge(tree)["hidden"]["kernel"]).all())
  assert bool(jnp.isfinite(delora_jax.apply(model, {"params": tree}, x)).all())


def test_an_inf_input_gives_nan_through_the_factorised_branch_as_documented():
  # Not promised (docs/reliability.md): the branch computes (x @ u) @ v, and inf * 0 is NaN, so
  # an input holding inf gives NaN even at step 0 with b = 0, where the base model alone gives
  # inf. Finite inputs are unchanged at step 0.
  import flax.linen as nn  # noqa: PLC0415

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.tanh(nn.Dense(3, name="dense")(x))

  model, x = Layer(), jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)["params"]
  tree = delora_jax.wrap(params, {"dense/kernel": 2})
  np.testing.assert_allclose(
    delora_jax.apply(model, {"params": tree}, x), model.apply({"params": params}, x), rtol=1e-6
  )
  x = x.at[0, 1].set(jnp.inf)
  assert bool(jnp.isfinite(model.apply({"params": params}, x)).all())  # tanh(±inf) = ±1
  got = delora_jax.apply(model, {"params": tree}, x)
  assert bool(jnp.isnan(got[0]).all()) and bool(jnp.isfinite(got[1]).all())


# --- #1: keys holding '/' ----------------------------------------------------------------


def test_keys_holding_a_slash_that_collide_are_refused_everywhere():
  w1, w2 = jnp.ones((4, 4)), 2 * jnp.ones((4, 4))
  params = {"a/b": {"kernel": w1}, "a": {"b": {"kernel": w2}}}
  with pytest.raises(ValueError, match=r"two leaves of the tree have the path 'a/b/kernel'.*\['a/b'\].*Rename"):
    delora_jax.wrap(params, {".*kernel": 2})
  # A tree put together by hand from two adapted halves is refused by everything that reads paths.
  t1 = delora_jax.wrap({"kernel": w1}, {"kernel": 2})
  t2 = delora_jax.wrap({"kernel": w2}, {"kernel": 2}, key=jax.random.key(1))
  mixed = {"a/b": t1, "a": {"b": t2}}
  for fn in (delora_jax.adapters, delora_jax.merge, delora_jax.split):
    with pytest.raises(ValueError, match="two leaves of the tree have the path 'a/b/kernel'"):
      fn(mixed)


def test_keys_holding_a_slash_without_a_collision_still_work(tmp_path):
  params = {"a/b": {"kernel": jnp.ones((4, 4))}, "c": {"kernel": 2 * jnp.ones((4, 4))}}
  tree = delora_jax.wrap(params, {".*kernel": 2})
  assert sorted(delora_jax.adapters(tree)) == ["a/b/kernel", "c/kernel"]
  path = delora_jax.save_adapters(tmp_path / "ckpt", tree)
  back = delora_jax.load_adapters(path, delora_jax.wrap(params, {".*kernel": 2}, key=jax.random.key(5)))
  np.testing.assert_array_equal(back["a/b"]["kernel"].a, tree["a/b"]["kernel"].a)


def test_an_empty_kernel_is_refused_by_name():
  with pytest.raises(
    ValueError, match=r"enc/kernel: rules pattern '.\*kernel' matched a kernel of shape \(0, 4\), which has no entries"
  ):
    delora_jax.wrap({"enc": {"kernel": jnp.ones((0, 4))}}, {".*kernel": 2})


def test_nnx_adamw_at_lr_1e3_stays_finite():
  import optax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden, self.out = nnx.Linear(8, 64, rngs=rngs), nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.gelu(self.hidden(x)))

  x = jax.random.normal(jax.random.key(0), (256, 8))
  y = jnp.sin(x.sum(axis=1, keepdims=True))
  model = delora_jax.nnx.wrap(MLP(nnx.Rngs(1)), {"hidden/kernel": delora_jax.Rule(4, 4.0)})
  opt = nnx.Optimizer(
    model, delora_jax.optimizer(optax.adamw, learning_rate=1e3, weight_decay=0.01), wrt=delora_jax.nnx.DeloraParam
  )

  @nnx.jit
  def step(model, opt):
    diff = nnx.DiffState(0, delora_jax.nnx.DeloraParam)
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=diff)(model)
    opt.update(model, g)
    return loss

  losses = [float(step(model, opt)) for _ in range(100)]
  assert np.all(np.isfinite(losses))
  a = model.hidden.kernel_delora.a.get_value()
  assert float(jnp.linalg.norm(a, axis=0).max()) <= 1e12 * (1 + 1e-6)
  assert float(delora_jax.diagnostics(model)["summary"]["bound_use"]["max"]) <= 1.0 + 1e-5
