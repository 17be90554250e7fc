"""wrap / unwrap / merge / adapters / with_adapters / split / combine, and every error path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import delora_jax
from delora_jax import Rule, _kernel
from tests.helpers import assert_trees_equal


def mlp_params():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))

  return MLP().init(jax.random.key(0), jnp.ones((1, 5)))["params"]


def snapshot(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_unchanged(tree, snap):
  jax.tree.map(np.testing.assert_array_equal, tree, snap)


# ----------------------------------------------------------------- wrapping


def test_wrap_shapes_init_and_untouched_leaves():
  params = mlp_params()
  tree = delora_jax.wrap(params, {".*kernel": Rule(2, lam=4.0)})
  assert tree["hidden"]["bias"] is params["hidden"]["bias"]
  k = tree["hidden"]["kernel"]
  assert k.w is params["hidden"]["kernel"]
  assert (k.a.shape, k.b.shape, k.lam.shape, k.w_norm.shape) == ((5, 2), (2, 8), (), (5,))
  assert float(k.lam) == 4.0 and not np.any(np.asarray(k.b))
  bound = 1 / np.sqrt(5)
  assert np.all(np.abs(np.asarray(k.a)) <= bound) and np.abs(np.asarray(k.a)).max() > 0.5 * bound
  np.testing.assert_allclose(k.w_norm, np.linalg.norm(np.asarray(params["hidden"]["kernel"]), axis=1), rtol=1e-6)
  rnd = delora_jax.wrap(params, {".*kernel": Rule(2, init="random")})["out"]["kernel"]
  assert np.all(np.abs(np.asarray(rnd.b)) <= 1 / np.sqrt(2)) and np.any(np.asarray(rnd.b))


def test_keys_depend_on_path_and_key_only():
  params = mlp_params()
  reordered = {"out": params["out"], "hidden": params["hidden"]}
  a = delora_jax.adapters(delora_jax.wrap(params, {".*kernel": Rule(2, init="random")}))
  b = delora_jax.adapters(delora_jax.wrap(reordered, {".*kernel": Rule(2, init="random")}))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c = delora_jax.adapters(delora_jax.wrap(params, {".*kernel": Rule(2, init="random")}, key=jax.random.key(5)))
  assert not np.allclose(a["hidden/kernel"]["a"], c["hidden/kernel"]["a"])
  # Two kernels of the same shape get independent draws.
  twins = delora_jax.adapters(
    delora_jax.wrap({"p": {"kernel": jnp.ones((4, 4))}, "q": {"kernel": jnp.ones((4, 4))}}, {".*kernel": 2})
  )
  assert not np.allclose(twins["p/kernel"]["a"], twins["q/kernel"]["a"])
  # Raw uint32 keys are accepted too.
  d = delora_jax.adapters(delora_jax.wrap(params, {".*kernel": Rule(2, init="random")}, key=jax.random.PRNGKey(0)))
  jax.tree.map(np.testing.assert_array_equal, a, d)


def test_first_matching_rule_wins():
  tree = delora_jax.wrap(mlp_params(), {"hidden/kernel": Rule(3, lam=2.0), ".*kernel": 1})
  ad = delora_jax.adapters(tree)
  assert ad["hidden/kernel"]["a"].shape[-1] == 3 and float(ad["hidden/kernel"]["lam"]) == 2.0
  assert ad["out/kernel"]["a"].shape[-1] == 1 and float(ad["out/kernel"]["lam"]) == 15.0


def test_unwrap_is_bit_exact_and_merge_keeps_structure():
  params = mlp_params()
  tree = delora_jax.wrap(params, {".*kernel": Rule(2, init="random")})
  back = delora_jax.unwrap(tree)
  assert_trees_equal(back, params)
  merged = delora_jax.merge(tree)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for m, p in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    assert m.shape == p.shape and m.dtype == p.dtype
  np.testing.assert_allclose(
    merged["out"]["kernel"], params["out"]["kernel"] + delora_jax.delta(tree)["out/kernel"], rtol=1e-6
  )


def test_bf16_base_with_float32_adapters():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), mlp_params())
  tree = delora_jax.wrap(params, {".*kernel": Rule(2, init="random")})
  k = tree["hidden"]["kernel"]
  assert k.w.dtype == jnp.bfloat16 and k.a.dtype == k.b.dtype == k.lam.dtype == k.w_norm.dtype == jnp.float32
  np.testing.assert_allclose(k.w_norm, np.linalg.norm(np.asarray(k.w, np.float32), axis=1), rtol=1e-6)
  assert delora_jax.merge(tree)["hidden"]["kernel"].dtype == jnp.bfloat16
  half = delora_jax.wrap(params, {".*kernel": Rule(2, dtype="bfloat16")})["out"]["kernel"]
  assert half.a.dtype == jnp.bfloat16 and half.w_norm.dtype == jnp.bfloat16
  x = jnp.ones((2, 5), jnp.bfloat16)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="out", param_dtype=jnp.bfloat16)(
        nn.relu(nn.Dense(8, name="hidden", param_dtype=jnp.bfloat16)(x))
      )

  y = delora_jax.apply(MLP(), {"params": tree}, x, strict=True)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(y, np.float32),
    np.asarray(MLP().apply({"params": delora_jax.merge(tree)}, x), np.float32),
    rtol=3e-2,
    atol=3e-2,
  )


def test_paper_init_starts_at_zero_then_moves():
  params = mlp_params()
  tree = delora_jax.wrap(params, {".*kernel": Rule(2, init="paper")})
  ad = delora_jax.adapters(tree)["hidden/kernel"]
  assert set(ad) == {"a", "b", "lam", "w_norm", "res_a", "res_b"} and np.any(np.asarray(ad["b"]))
  # ΔW = u @ v over 2r terms (the trained a·s·b and the residual -res_a·res_b) that cancel in exact
  # arithmetic; in float32 each entry keeps rounding residue bounded by the size of its terms: the
  # product's accumulation (2r roundings) plus a few ulps by which the residual's s (computed at
  # wrap time, jitted) differs from the recomputed one. Eager and jitted, any backend.
  u, v = _kernel.factors(delora_jax._tree.kernels(tree)["hidden/kernel"])
  terms = np.abs(np.asarray(u, np.float64)) @ np.abs(np.asarray(v, np.float64))
  tol = (u.shape[-1] + 8) * np.finfo(np.float32).eps * terms
  for fn in (delora_jax.delta, jax.jit(delora_jax.delta)):
    residue = np.abs(np.asarray(fn(tree)["hidden/kernel"], np.float64))
    assert np.all(residue <= tol), (residue.max(), terms.max())
  assert terms.max() > 1e-2  # the terms are not themselves negligible: the cancellation is real
  trainable, frozen = delora_jax.split(tree)
  assert frozen["hidden"]["kernel"].res_a is not None and trainable["hidden"]["kernel"].res_a is None
  g = jax.grad(lambda t: jnp.sum(delora_jax.merge(delora_jax.combine(t, frozen))["hidden"]["kernel"] ** 2))(trainable)
  moved = jax.tree.map(lambda p, d: p - 0.1 * d, trainable, g)
  assert np.abs(np.asarray(delora_jax.delta(delora_jax.combine(moved, frozen))["hidden/kernel"])).max() > 1e-4


# Shapes from a few sizes (edge 1, small, larger than the rank): each new shape compiles wrap's
# and delta's programs, while λ, the seed, b and the scale vary freely.
@settings(max_examples=25, deadline=None)
@given(
  n_in=st.sampled_from((1, 2, 5, 12)),
  n_out=st.sampled_from((1, 3, 12)),
  r=st.sampled_from((1, 4, 12)),
  lam=st.floats(-50, 50),
  seed=st.integers(0, 2**16),
  zero_b=st.booleans(),
  scale=st.floats(1e-6, 1e3),
)
def test_update_is_bounded_by_lambda(n_in, n_out, r, lam, seed, zero_b, scale):
  r = min(r, n_in, n_out)
  rng = np.random.default_rng(seed)  # numpy draws: no per-shape compilation
  w = jnp.asarray(rng.standard_normal((n_in, n_out), np.float32) * np.float32(scale))
  if zero_b and lam == 0.0:  # b = 0 and λ = 0 could never train: refused (test_reliability.py)
    with pytest.raises(ValueError, match="zero gradients"):
      Rule(r, lam=lam, init="peft")
    return
  tree = delora_jax.wrap(
    {"kernel": w}, {"kernel": Rule(r, lam=lam, init="peft" if zero_b else "random")}, key=jax.random.key(seed + 1)
  )
  k = tree["kernel"]
  # Any a, b: perturb them away from the initialisation.
  k = k.replace(
    a=jnp.asarray(np.asarray(k.a) * rng.uniform(-3, 3, k.a.shape).astype(np.float32)),
    b=jnp.asarray(np.asarray(k.b) + rng.standard_normal(k.b.shape, np.float32) * np.float32(0 if zero_b else scale)),
  )
  dw = np.asarray(delora_jax.delta({"kernel": k})["kernel"], np.float64)
  rel = dw / np.maximum(np.asarray(k.w_norm, np.float64)[:, None], 1e-30)
  assert np.linalg.norm(rel) <= abs(lam) * (1 + 1e-5) + 1e-30


# ------------------------------------------------------------ adapters API


def test_adapters_roundtrip_and_validation():
  params = mlp_params()
  tree = delora_jax.wrap(params, {".*kernel": Rule(2, init="random")})
  snap = snapshot(tree)
  ad = delora_jax.adapters(tree)
  assert set(ad) == {"hidden/kernel", "out/kernel"}
  new = jax.tree.map(lambda x: x + 1, ad)
  put = delora_jax.with_adapters(tree, new)
  jax.tree.map(np.testing.assert_array_equal, delora_jax.adapters(put), new)
  assert_unchanged(tree, snap)
  bad_cases = {
    "unknown path": ({**ad, "nope/kernel": ad["out/kernel"]}, ValueError, "unknown paths.*nope/kernel"),
    "missing path": ({"out/kernel": ad["out/kernel"]}, ValueError, "missing paths.*hidden/kernel"),
    "wrong shape": (
      {**ad, "out/kernel": {**ad["out/kernel"], "a": jnp.zeros((8, 3))}},
      ValueError,
      r"out/kernel.*'a'.*shape \(8, 3\), expected \(8, 2\)",
    ),
    "wrong dtype": (
      {**ad, "out/kernel": {**ad["out/kernel"], "lam": jnp.zeros((), jnp.bfloat16)}},
      ValueError,
      "dtype bfloat16, expected float32",
    ),
    "missing field": ({**ad, "out/kernel": {"a": ad["out/kernel"]["a"]}}, ValueError, "exactly the fields"),
    "not array": ({**ad, "out/kernel": {**ad["out/kernel"], "b": [[1.0]]}}, TypeError, "must be an array"),
  }
  for bad, exc, match in bad_cases.values():
    with pytest.raises(exc, match=match):
      delora_jax.with_adapters(tree, bad)
    assert_unchanged(tree, snap)


def test_split_combine_roundtrip_and_extra_trainable():
  tree = delora_jax.wrap(mlp_params(), {".*kernel": 2})
  t, f = delora_jax.split(tree, extra_trainable=r".*/bias")
  assert t["out"]["bias"] is tree["out"]["bias"] and f["out"]["bias"] is None
  back = delora_jax.combine(t, f)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, tree)
  mask = delora_jax.trainable_mask(tree, extra_trainable=r".*/bias")
  assert mask["out"]["bias"] is True and mask["out"]["kernel"].a is True and mask["out"]["kernel"].w is False


def test_combine_rejects_mismatched_halves():
  tree = delora_jax.wrap(mlp_params(), {".*kernel": 2})
  t, f = delora_jax.split(tree)
  other_t, other_f = delora_jax.split(delora_jax.wrap(mlp_params(), {"hidden/kernel": 2}))
  with pytest.raises(ValueError, match="DeLoRA kernel in one half only|different structures"):
    delora_jax.combine(t, other_f)
  with pytest.raises(ValueError, match="present in both halves"):
    delora_jax.combine(t, jax.tree.map(lambda x: x, tree))
  with pytest.raises(ValueError, match="different structures"):
    delora_jax.combine(t, {"hidden": f["hidden"]})
  t2, _ = delora_jax.split(tree, extra_trainable=".*bias")
  with pytest.raises(ValueError, match="present in both halves"):
    delora_jax.combine(t2, f)


def test_merge_safe_detects_non_finite():
  tree = delora_jax.wrap(mlp_params(), {".*kernel": Rule(2, init="random")})
  ad = delora_jax.adapters(tree)
  ad["out/kernel"]["lam"] = jnp.asarray(np.nan, jnp.float32)
  broken = delora_jax.with_adapters(tree, ad)
  snap = snapshot(broken)
  with pytest.raises(ValueError, match="out/kernel: merged kernel has NaN or inf"):
    delora_jax.merge(broken, safe=True)
  assert_unchanged(broken, snap)
  assert np.all(np.isfinite(delora_jax.merge(tree, safe=True)["out"]["kernel"]))
  with pytest.raises(TypeError, match="cannot run under jit"):
    jax.jit(lambda t: delora_jax.merge(t, safe=True))(tree)


# ---------------------------------------------------------------- errors

ERROR_CASES = {
  "bad regex": (
    lambda p: delora_jax.wrap(p, {"hidden/(kernel": 2}),
    ValueError,
    r"'hidden/\(kernel' is not a valid regular expression",
  ),
  "matches nothing": (
    lambda p: delora_jax.wrap(p, {"encoder/.*": 2}),
    ValueError,
    r"'encoder/\.\*' matches no leaf.*'hidden/bias'",
  ),
  "shadowed": (
    lambda p: delora_jax.wrap(p, {".*kernel": 2, "out/kernel": 1}),
    ValueError,
    "only matches leaves that earlier patterns already adapt",
  ),
  "bias leaf": (
    lambda p: delora_jax.wrap(p, {"hidden/.*": 2}),
    ValueError,
    r"hidden/bias: rules pattern 'hidden/\.\*' matched a 1-D array",
  ),
  "integer leaf": (
    lambda p: delora_jax.wrap({**p, "step": {"count": jnp.zeros((3, 3), jnp.int32)}}, {"step/count": 2}),
    TypeError,
    "step/count.*dtype int32",
  ),
  "non-array leaf": (
    lambda p: delora_jax.wrap({**p, "meta": {"kernel": "x"}}, {"meta/kernel": 2}),
    TypeError,
    "meta/kernel.*matched a str",
  ),
  "already adapted": (
    lambda p: delora_jax.wrap(delora_jax.wrap(p, {"out/kernel": 2}), {"hidden/kernel": 2}),
    ValueError,
    r"already adapted.*'out/kernel'",
  ),
  "rules not a dict": (lambda p: delora_jax.wrap(p, [("out/kernel", 2)]), TypeError, "must map regex"),
  "empty rules": (lambda p: delora_jax.wrap(p, {}), ValueError, "empty"),
  "rule value": (
    lambda p: delora_jax.wrap(p, {"out/kernel": 2.5}),
    TypeError,
    r"rules\['out/kernel'\] must be a delora_jax.Rule or an int",
  ),
  "ambiguous N-D": (
    lambda p: delora_jax.wrap({"q": {"kernel": jnp.ones((8, 2, 4))}}, {".*kernel": 2}),
    ValueError,
    r"q/kernel: kernel of shape \(8, 2, 4\) is 3-D.*ambiguous",
  ),
  "axes out of range": (
    lambda p: delora_jax.wrap({"q": {"kernel": jnp.ones((8, 2, 4))}}, {".*kernel": Rule(2, in_axes=5)}),
    ValueError,
    "q/kernel: `in_axes` axis 5 is out of range",
  ),
  "axes overlap": (
    lambda p: delora_jax.wrap(
      {"q": {"kernel": jnp.ones((8, 2, 4))}}, {".*kernel": Rule(2, in_axes=0, out_axes=(0, 1))}
    ),
    ValueError,
    "overlap",
  ),
  "axes incomplete": (
    lambda p: delora_jax.wrap({"q": {"kernel": jnp.ones((8, 2, 4))}}, {".*kernel": Rule(2, in_axes=0, out_axes=1)}),
    ValueError,
    "must together cover",
  ),
  "stacked axis as input": (
    lambda p: delora_jax.wrap({"q": {"kernel": jnp.ones((3, 8, 4))}}, {".*kernel": Rule(2, stack_axes=1, in_axes=0)}),
    ValueError,
    "leading stacked axes",
  ),
  "too many stack axes": (
    lambda p: delora_jax.wrap({"q": {"kernel": jnp.ones((3, 8))}}, {".*kernel": Rule(2, stack_axes=1)}),
    ValueError,
    "expected at least 2",
  ),
  "unwrap plain": (lambda p: delora_jax.unwrap(p), ValueError, "holds no DeLoRA-adapted kernel"),
  "merge plain": (lambda p: delora_jax.merge(p), ValueError, "holds no DeLoRA-adapted kernel"),
  "apply without params": (
    lambda p: delora_jax.apply(nn.Dense(2), {"kernel": 1}, jnp.ones(2)),
    TypeError,
    "'params' collection",
  ),
  "extra_trainable regex": (
    lambda p: delora_jax.split(delora_jax.wrap(p, {"out/kernel": 2}), extra_trainable="(bias"),
    ValueError,
    "not a valid regular expression",
  ),
}


@pytest.mark.parametrize("name", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_errors_are_clear_and_leave_inputs_untouched(name):
  params = mlp_params()
  snap = snapshot(params)
  fn, exc, match = ERROR_CASES[name]
  with pytest.raises(exc, match=match):
    fn(params)
  assert_unchanged(params, snap)


RULE_ERRORS = {
  "rank zero": (dict(rank=0), ValueError, "`rank` must be a positive int; got 0"),
  "rank negative": (dict(rank=-3), ValueError, "positive int"),
  "rank float": (dict(rank=2.0), TypeError, "positive int"),
  "lam nan": (dict(rank=2, lam=float("nan")), ValueError, "`lam` must be finite"),
  "lam inf": (dict(rank=2, lam=float("inf")), ValueError, "`lam` must be finite"),
  "lam str": (dict(rank=2, lam="big"), TypeError, "`lam` must be a real number"),
  "init": (dict(rank=2, init="zeros"), ValueError, "`init` must be one of"),
  "dropout": (dict(rank=2, dropout=1.0), ValueError, r"`dropout` must be in \[0, 1\)"),
  "stack axes": (dict(rank=2, stack_axes=-1), ValueError, "`stack_axes`"),
  "axes type": (dict(rank=2, in_axes="0"), TypeError, "`in_axes` must be an int"),
  "empty axes": (dict(rank=2, out_axes=()), ValueError, "at least one axis"),
  "dtype int": (dict(rank=2, dtype="int32"), TypeError, "floating dtype"),
  "dtype junk": (dict(rank=2, dtype="nonsense"), TypeError, "floating dtype"),
}


@pytest.mark.parametrize("name", list(RULE_ERRORS), ids=list(RULE_ERRORS))
def test_rule_validation(name):
  kwargs, exc, match = RULE_ERRORS[name]
  with pytest.raises(exc, match=match):
    Rule(**kwargs)
