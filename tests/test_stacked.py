"""Stacked layers with the layer axis anywhere: ``Rule(stack_axes=(p,))``, Linen ``nn.scan`` over
``variable_axes={"params": p}`` and an NNX model scanned the way MaxText 0.2.5 scans its decoder.

The references are independent of the library: each layer's merged kernel ``w + ΔW`` is rebuilt
here from METHOD.md (``ΔW = diag(w_norm) a diag(s) b``) after moving the layer axis first with
``jnp.moveaxis``, and run through the original model.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import delora_jax
from delora_jax import _kernel

REL = 1e-5  # float32, matmul precision "highest" (conftest)


def rel(a, b):
  """Norm-based relative error of ``a`` against ``b`` (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def leading(x, p, n_own):
  """An adapter array stacked at position ``p`` (size-1 padding after its own axes) as
  ``(L, *own)``: the layout this file checks, written out by hand."""
  x = jnp.moveaxis(x, p, 0)
  return x.reshape(x.shape[: 1 + n_own])


def ref_merged(w, p, n_in, a, b, lam, w_norm):
  """``w + ΔW`` of a kernel stacked at axis ``p`` whose other axes are its ``n_in`` input axes
  and then its output axes; adapter arrays ``(L, in, r)``, ``(L, r, out)``, ``(L,)``, ``(L, in)``."""
  wl = jnp.moveaxis(w, p, 0)
  n_layers, rest = wl.shape[0], wl.shape[1:]
  n_i = math.prod(rest[:n_in])
  r = a.shape[-1]
  na = jnp.maximum(jnp.linalg.norm(a, axis=1), 1e-4)  # (L, r): column norms of a
  nb = jnp.maximum(jnp.linalg.norm(b, axis=2), 1e-4)  # (L, r): row norms of b
  s = lam[:, None] / r / (na * nb)
  dw = jnp.einsum("li,lik,lk,lko->lio", w_norm, a, s, b, precision="highest")
  return jnp.moveaxis(wl + dw.reshape(n_layers, n_i, -1).reshape(wl.shape), 0, p)


def scramble(tree, seed=3):
  """Moves every a, b, λ off its initial value (as training would)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return delora_jax._tree.map_kernels(
    lambda _, k: k.replace(
      a=k.a + 0.3 * jax.random.normal(next(keys), k.a.shape),
      b=k.b + 0.2 * jax.random.normal(next(keys), k.b.shape),
      lam=k.lam * 1.3,
    ),
    tree,
  )


# ---------------------------------------------------------------- Rule(stack_axes=...)


@pytest.mark.parametrize(
  "given, want",
  [((1,), (1,)), ((0,), 1), ((0, 1), 2), ((3, 1), (1, 3)), ((), 0), (2, 2), (np.int64(1), 1)],
  ids=["position-1", "leading-position-is-a-count", "two-leading", "sorted", "none", "count", "numpy-int"],
)
def test_stack_axes_forms(given, want):
  assert delora_jax.Rule(2, stack_axes=given).stack_axes == want


@pytest.mark.parametrize(
  "given, match",
  [
    ((-1,), r"positions count from the first axis .* >= 0"),
    ((1, 1), r"repeats an axis"),
    ((1.0,), r"int >= 0 .* or a tuple of axis positions"),
    ((True,), r"int >= 0 .* or a tuple of axis positions"),
    ("1", r"int >= 0 .* or a tuple of axis positions"),
    (-1, r"int >= 0"),
  ],
  ids=["negative", "duplicate", "float", "bool", "str", "negative-count"],
)
def test_stack_axes_bad_values(given, match):
  with pytest.raises(ValueError, match=match):
    delora_jax.Rule(2, stack_axes=given)


W3 = (6, 4, 5)  # (in, L, out)
W4 = (6, 4, 2, 3)  # (embed, L, heads, head_dim)


@pytest.mark.parametrize(
  "shape, rule, match",
  [
    (
      W3,
      dict(stack_axes=(3,)),
      r"k: stack_axes=\(3,\) names axis 3, but the kernel of shape \(6, 4, 5\) has axes 0 to 2",
    ),
    (W3, dict(stack_axes=(0, 2)), r"k: kernel of shape \(6, 4, 5\) with stack_axes=\(0, 2\) leaves 1 axis"),
    (W3, dict(stack_axes=(1,), in_axes=1), r"k: `in_axes` axis 1 is one of the stacked axes \(1,\) .*\(6, 4, 5\)"),
    (W3, dict(stack_axes=(1,), out_axes=-2), r"k: `out_axes` axis 1 is one of the stacked axes \(1,\)"),
    (W3, dict(stack_axes=(1,), in_axes=0, out_axes=0), r"k: in_axes \(0,\) and out_axes \(0,\) overlap"),
    (W4, dict(stack_axes=(1,)), r"k: kernel of shape \(6, 4, 2, 3\) is 3-D after its stacked axes .*ambiguous"),
    (W3, dict(stack_axes=(1,), slices=(4,)), r"k: Rule slices \(4,\) name slice 4, but the kernel .* has 4 stacked"),
  ],
  ids=["out-of-range", "too-few-axes", "in-is-stacked", "out-is-stacked", "in-out-overlap", "nd-undeclared", "slice"],
)
def test_positioned_layout_errors_name_path_shape_and_fix(shape, rule, match):
  with pytest.raises(ValueError, match=match) as e:
    delora_jax.wrap({"k": jnp.ones(shape)}, {"k": delora_jax.Rule(2, **rule)})
  assert "Rule(" in str(e.value) or "Use indices below" in str(e.value)  # the fix


def test_slices_need_stacked_axes():
  with pytest.raises(ValueError, match=r"`slices`=\(0,\) .* stack_axes=0.*stack_axes=\(1,\)"):
    delora_jax.Rule(2, slices=(0,))


# ---------------------------------------------------------------- the kernel math


# id: (kernel shape, rule kwargs, stacked position, number of input axes, the same layout's
# rule kwargs for the kernel with its layer axis moved first)
LAYOUTS = {
  "dense-L1": ((6, 4, 5), dict(stack_axes=(1,)), 1, 1, dict()),
  "query-L1": ((6, 4, 2, 3), dict(stack_axes=(1,), in_axes=0), 1, 1, dict(in_axes=1)),
  "out-L1": ((2, 4, 3, 6), dict(stack_axes=(1,), out_axes=-1), 1, 2, dict(out_axes=-1)),
  "dense-L2": ((2, 3, 4, 5), dict(stack_axes=(2,), out_axes=-1), 2, 2, dict(out_axes=-1)),
  "wo-L2-last": ((6, 5, 4), dict(stack_axes=(2,)), 2, 1, dict()),
}


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("init", ["peft", "random", "paper"])
def test_adapters_stack_where_the_kernel_does_and_merge_per_layer(name, init):
  shape, kw, p, n_in, _ = LAYOUTS[name]
  w = jax.random.normal(jax.random.key(0), shape)
  tree = delora_jax.wrap({"k": w}, {"k": delora_jax.Rule(3, 2.0, init=init, **kw)})
  tree = tree if init == "peft" else scramble(tree)
  k = tree["k"]
  n_layers, rest = shape[p], shape[:p] + shape[p + 1 :]
  n_i, n_o = math.prod(rest[:n_in]), math.prod(rest[n_in:])
  # Each adapter array has the layer axis at p; arrays with fewer axes get size-1 padding.
  for f, own in (("a", (n_i, 3)), ("b", (3, n_o)), ("lam", ()), ("w_norm", (n_i,))):
    x = getattr(k, f)
    assert x.shape[p] == n_layers, (f, x.shape)
    assert leading(x, p, len(own)).shape == (n_layers, *own), (f, x.shape)
    assert all(d == 1 for d in jnp.moveaxis(x, p, 0).shape[1 + len(own) :]), (f, x.shape)
  assert k.rank == 3
  a, b = leading(k.a, p, 2), leading(k.b, p, 2)
  lam, w_norm = leading(k.lam, p, 0), leading(k.w_norm, p, 1)
  wl = jnp.moveaxis(w, p, 0).reshape(n_layers, n_i, n_o)
  np.testing.assert_allclose(w_norm, jnp.linalg.norm(wl, axis=2), rtol=1e-6)
  want = ref_merged(w, p, n_in, a, b, lam, w_norm)
  if init == "paper":  # the frozen initial update, subtracted
    res_a, res_b = leading(k.res_a, p, 2), leading(k.res_b, p, 2)
    want = want - jnp.moveaxis(
      jnp.einsum("li,lik,lko->lio", w_norm, res_a, res_b).reshape(jnp.moveaxis(w, p, 0).shape), 0, p
    )
  merged = delora_jax.merge(tree)["k"]
  assert merged.shape == shape
  assert rel(merged, want) < REL
  assert rel(delora_jax.delta(tree)["k"], want - w) < REL
  if init == "peft":
    np.testing.assert_array_equal(merged, w)


@pytest.mark.parametrize("name", LAYOUTS)
def test_positioned_equals_the_leading_layout(name):
  """The same kernel stored with its layer axis first gives the same adapters (same key and
  path), so merge, delta, diagnostics, to_lora and an optimizer step agree exactly."""
  shape, kw, p, _, kw0 = LAYOUTS[name]
  w = jax.random.normal(jax.random.key(0), shape)
  rule, rule0 = (
    delora_jax.Rule(3, 2.0, init="random", **kw),
    delora_jax.Rule(3, 2.0, init="random", stack_axes=1, **kw0),
  )
  tree = scramble(delora_jax.wrap({"k": w}, {"k": rule}))
  tree0 = scramble(delora_jax.wrap({"k": jnp.moveaxis(w, p, 0)}, {"k": rule0}))
  assert tree0["k"].stack == () and tree["k"].stack == (p,)
  # scramble draws noise of each array's own shape: put the positioned tree's adapters in instead
  ad = {f: _kernel.lead(x, (p,), f) for f, x in delora_jax.adapters(tree)["k"].items()}
  tree0 = delora_jax.with_adapters(tree0, {"k": ad})
  np.testing.assert_array_equal(delora_jax.merge(tree)["k"], jnp.moveaxis(delora_jax.merge(tree0)["k"], 0, p))
  np.testing.assert_array_equal(delora_jax.delta(tree)["k"], jnp.moveaxis(delora_jax.delta(tree0)["k"], 0, p))
  d, d0 = delora_jax.diagnostics(tree), delora_jax.diagnostics(tree0)
  for m in d["kernels"]["k"]:
    np.testing.assert_array_equal(d["kernels"]["k"][m], d0["kernels"]["k"][m], err_msg=m)
  lo, lo0 = delora_jax.to_lora(tree)["k"], delora_jax.to_lora(tree0)["k"]
  np.testing.assert_array_equal(lo["lora_a"], lo0["lora_a"])
  # One AdamW step of the same loss (in the leading layout's terms) moves the same numbers.
  opt = delora_jax.optimizer(optax.adamw, learning_rate=1e-2, weight_decay=0.1)

  def step(t, to_leading):
    train, frozen = delora_jax.split(t)
    loss = lambda tr: jnp.sum(jnp.sin(to_leading(delora_jax.merge(delora_jax.combine(tr, frozen))["k"])))  # noqa: E731
    g = jax.grad(loss)(train)
    upd, _ = opt.update(g, opt.init(train), train)
    return delora_jax.adapters(delora_jax.combine(optax.apply_updates(train, upd), frozen))["k"]

  got, want = step(tree, lambda m: jnp.moveaxis(m, p, 0)), step(tree0, lambda m: m)
  for f in ("a", "b", "lam"):
    np.testing.assert_allclose(_kernel.lead(got[f], (p,), f), want[f], rtol=1e-6, atol=1e-7, err_msg=f)


def test_slices_of_a_positioned_stack():
  w = jax.random.normal(jax.random.key(0), (6, 4, 5))
  tree = delora_jax.wrap({"k": w}, {"k": delora_jax.Rule(2, init="random", stack_axes=(1,), slices=(0, 2))})
  k = tree["k"]
  live = np.array([True, False, True, False])
  np.testing.assert_array_equal(np.asarray(k.lam)[0] != 0, live)
  np.testing.assert_array_equal(np.any(np.asarray(k.a) != 0, axis=(0, 2)), live)
  np.testing.assert_array_equal(np.any(np.asarray(k.w_norm) != 0, axis=0), live)
  dw = delora_jax.delta(tree)["k"]
  assert np.all(np.asarray(dw)[:, ~live] == 0) and np.all(np.any(np.asarray(dw)[:, live] != 0, axis=(0, 2)))


def test_bounded_factors_clip_along_the_input_axis_of_a_positioned_a():
  w = jax.random.normal(jax.random.key(0), (6, 4, 5))
  tree = delora_jax.wrap({"k": w}, {"k": delora_jax.Rule(2, init="random", stack_axes=(1,))})
  trainable, _ = delora_jax.split(tree)
  grow = jax.tree.map(jnp.zeros_like, trainable)
  big = jnp.zeros((6, 4, 2)).at[:, 1, 0].set(1e13)  # one column (layer 1, rank 0) of a
  grow = {"k": grow["k"].replace(a=big)}
  got, _ = delora_jax._optim.bounded_factors().update(grow, optax.EmptyState(), trainable)
  new = np.asarray(trainable["k"].a, np.float64) + np.asarray(got["k"].a, np.float64)
  norms = np.linalg.norm(new, axis=0)  # (L, r): the column norms over the input axis
  limit = delora_jax._optim.factor_limit(jnp.float32)
  assert norms[1, 0] == pytest.approx(limit, rel=1e-5)
  np.testing.assert_array_equal(np.asarray(got["k"].a)[:, [0, 2, 3]], 0)  # other layers untouched
  np.testing.assert_array_equal(np.asarray(got["k"].a)[:, 1, 1], 0)  # and the other column


def test_bounded_factors_bound_a_stacked_nnx_factor_as_a_whole():
  """An NNX state's stacked ``a`` (``(in, L, r)`` or ``(L, in, r)``: the array does not say) is
  bounded as a whole: its norm bounds each column's, and one scale changes nothing the model sees."""
  x = jax.random.normal(jax.random.key(0), (6, 4, 2))
  u = jnp.zeros_like(x).at[:, 1, 0].set(1e13)
  state = {"wi": {"kernel_delora": {"a": x}}}
  got, _ = delora_jax._optim.bounded_factors().update({"wi": {"kernel_delora": {"a": u}}}, optax.EmptyState(), state)
  new = np.asarray(x, np.float64) + np.asarray(got["wi"]["kernel_delora"]["a"], np.float64)
  limit = delora_jax._optim.factor_limit(jnp.float32)
  assert np.linalg.norm(new) == pytest.approx(limit, rel=1e-5)
  want = np.asarray(x + u, np.float64)
  np.testing.assert_allclose(new, want * limit / np.linalg.norm(want), rtol=1e-5, atol=1.0)  # one scale
  small = jnp.ones_like(x)  # below the limit: the update passes unchanged, bit for bit
  same, _ = delora_jax._optim.bounded_factors().update({"wi": {"kernel_delora": {"a": small}}}, None, state)
  np.testing.assert_array_equal(same["wi"]["kernel_delora"]["a"], small)


def test_shardings_follow_the_stacked_axis():
  tree = delora_jax.wrap({"k": jnp.ones((8, 4, 6))}, {"k": delora_jax.Rule(2, stack_axes=(1,))})
  sh = delora_jax.shardings(tree, {"k": P("x", "layers", "y")})["k"]
  assert (sh.a, sh.b, sh.lam, sh.w_norm) == (
    P("x", "layers", None),
    P(None, "layers", "y"),
    P(None, "layers"),
    P("x", "layers"),
  )


def test_sharded_kernel_gets_sharded_adapters_equal_to_unsharded():
  from jax.sharding import Mesh, NamedSharding

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("x", "layers", "y"))
  w = jax.random.normal(jax.random.key(0), (8, 4, 6))
  ws = jax.device_put(w, NamedSharding(mesh, P("x", "layers", "y")))
  rule = delora_jax.Rule(2, init="random", stack_axes=(1,))
  got, want = delora_jax.wrap({"k": ws}, {"k": rule})["k"], delora_jax.wrap({"k": w}, {"k": rule})["k"]
  assert got.a.sharding.spec == P("x", "layers", None) and got.lam.sharding.spec == P(None, "layers")
  for f in ("a", "b", "lam", "w_norm"):
    np.testing.assert_allclose(getattr(got, f), getattr(want, f), rtol=1e-6, err_msg=f)
  abstract = jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=ws.sharding)
  k = delora_jax.wrap({"k": abstract}, {"k": rule})["k"]
  assert (k.lam.shape, k.lam.sharding.spec) == ((1, 4), P(None, "layers"))


def test_checkpoint_round_trip(tmp_path):
  w = jax.random.normal(jax.random.key(0), (6, 4, 2, 3))
  rule = delora_jax.Rule(2, init="random", stack_axes=(1,), in_axes=0)
  tree = scramble(delora_jax.wrap({"k": w}, {"k": rule}))
  delora_jax.save_adapters(tmp_path / "ck", tree)
  fresh = delora_jax.wrap({"k": w}, {"k": rule}, key=jax.random.key(9))
  back = delora_jax.load_adapters(tmp_path / "ck", fresh)
  for f, x in delora_jax.adapters(tree)["k"].items():
    np.testing.assert_array_equal(delora_jax.adapters(back)["k"][f], x, err_msg=f)
  # The same kernel adapted with its layer axis leading is another layout: refused, both named.
  other = delora_jax.wrap({"k": w}, {"k": delora_jax.Rule(2, init="random", stack_axes=1, in_axes=1)})
  with pytest.raises(ValueError, match=r"k: stacked axes at positions \[1\] in the checkpoint, leading in the target"):
    delora_jax.load_adapters(tmp_path / "ck", other)
  # A base kernel that differs from the one the adapters were made for (stored w_norm checked).
  with pytest.raises(ValueError, match=r"k: the base kernel differs"):
    delora_jax.load_adapters(tmp_path / "ck", delora_jax.wrap({"k": 2 * w}, {"k": rule}))


def test_peft_export_refuses_a_positioned_stack(tmp_path):
  tree = delora_jax.wrap({"k": jnp.ones((6, 4, 5))}, {"k": delora_jax.Rule(2, stack_axes=(1,))})
  with pytest.raises(
    ValueError, match=r"k: kernel of shape \(6, 4, 5\) has its stacked .* positions \(1,\).*save_adapters"
  ):
    delora_jax.peft.export(tree, tmp_path / "p", module_names={"k": "m{}"})


# ---------------------------------------------------------------- Linen nn.scan


class Block(nn.Module):
  """A layer with an nn.Dense (fused path) and an einsum kernel (generic path)."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(8, name="dense")(x)
    w = self.param("proj", nn.initializers.normal(0.5), (8, 2, 3))  # (in, heads, head_dim)
    y = jnp.einsum("bi,ihd->bhd", jnp.tanh(h), w).reshape(x.shape[0], 6)
    return jnp.tanh(y), None


class Scanned(nn.Module):
  axis: int  # variable_axes={"params": axis}

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(Block, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=4)
    return scan(name="layers")(x, None)[0]


def linen_rules(p, declared, init="random"):
  if not declared:
    return {"layers/(dense/kernel|proj)": delora_jax.Rule(2, 3.0, init=init)}
  stack = 1 if p == 0 else (p,)
  return {
    "layers/dense/kernel": delora_jax.Rule(2, 3.0, init=init, stack_axes=stack),
    "layers/proj": delora_jax.Rule(2, 3.0, init=init, stack_axes=stack, in_axes=1 if p == 0 else 0),
  }


def f64(tree):
  """Every floating leaf in float64 (call inside ``jax.enable_x64(True)``)."""
  return jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)), tree)


def linen_ref_params(params, p, ad):
  """``params`` with both kernels replaced by their reference merged kernels (``ad``: the
  adapter arrays by path below ``layers/``)."""
  out = jax.tree.map(lambda v: v, params)
  layers = out["layers"]
  for q, leaf in (("dense/kernel", layers["dense"]), ("proj", layers)):
    d, name = ad[q], q.split("/")[-1]
    arrays = (leading(d["a"], p, 2), leading(d["b"], p, 2), leading(d["lam"], p, 0), leading(d["w_norm"], p, 1))
    leaf[name] = ref_merged(leaf[name], p, 1, *arrays)
  return out


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "like"])
@pytest.mark.parametrize("p", [0, 1], ids=["params-0", "params-1"])
def test_linen_scan(p, declared):
  model, x = Scanned(p), jax.random.normal(jax.random.key(1), (3, 6))
  params = model.init(jax.random.key(0), x)["params"]
  like = None if declared else (model, x)
  tree = delora_jax.wrap(params, linen_rules(p, declared), like=like)
  ks = delora_jax._tree.kernels(tree)
  lam = (4,) if p == 0 else (1, 4)  # the layer axis at p (padded for p = 1)
  assert {q: (k.a.shape, k.lam.shape) for q, k in ks.items()} == {
    "layers/dense/kernel": (((4, 6, 2) if p == 0 else (6, 4, 2)), lam),
    "layers/proj": (((4, 8, 2) if p == 0 else (8, 4, 2)), lam),
  }
  tree = scramble(tree)
  assert delora_jax.explain(model, {"params": tree}, x) == {
    "factorised": ["layers/dense/kernel", "layers/proj"],
    "merged": [],
    "unused": [],
  }
  ad = {q.removeprefix("layers/"): a for q, a in delora_jax.adapters(tree).items()}
  y = jax.jit(lambda t, x: delora_jax.apply(model, {"params": t}, x, strict=True))(tree, x)
  assert rel(y, model.apply({"params": linen_ref_params(params, p, ad)}, x)) < REL
  assert rel(y, model.apply({"params": delora_jax.merge(tree)}, x)) < REL
  assert rel(y, model.apply({"params": params}, x)) > 1e-3  # the adapters change the model

  trainable, frozen = delora_jax.split(tree)
  loss = lambda t, x: jnp.sum(jnp.sin(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x)))  # noqa: E731
  g = jax.jit(jax.grad(loss))(trainable, x)
  with jax.enable_x64(True):  # the reference in float64

    def ref_loss(tr, params, ad, x):
      full = {q: {**ad[q], **tr[q]} for q in ad}
      return jnp.sum(jnp.sin(model.apply({"params": linen_ref_params(params, p, full)}, x)))

    train = {q: {f: d[f] for f in ("a", "b", "lam")} for q, d in ad.items()}
    want = jax.jit(jax.grad(ref_loss))(f64(train), f64(params), f64(ad), f64(x))
    want = jax.tree.map(np.asarray, want)
  for q in ad:
    for f in ("a", "b", "lam"):
      assert np.linalg.norm(want[q][f]) > 0, (q, f)
      assert rel(getattr(_get(g, "layers/" + q), f), want[q][f]) < REL, (q, f)


def _get(tree, path):
  for n in path.split("/"):
    tree = tree[n]
  return tree


@pytest.mark.parametrize(
  "rule, want",
  [
    (dict(in_axes=0), ((1,), (0,), (2, 3))),  # the stacked axis is inferred, the declared inputs checked
    (dict(in_axes=0, stack_axes=(1,)), ((1,), (0,), (2, 3))),
    (dict(out_axes=(2, 3)), ((1,), (0,), (2, 3))),
    (
      dict(in_axes=2),
      r"layers/proj: the declared layout has input axes \(2,\) .* model contracts axes \(0,\) .*"
      r"Rule\(r, in_axes=\(0,\), stack_axes=\(1,\)\)",
    ),
    (
      dict(stack_axes=(2,)),
      r"layers/proj: the model sees this kernel of stored shape \(8, 4, 2, 3\) with shape "
      r"\(8, 2, 3\), which is not the stored shape without its first 1 stacked axes \(stack_axes=\(2,\)",
    ),
  ],
  ids=["in-declared", "in-and-stack-declared", "out-declared", "in-contradicted", "stack-contradicted"],
)
def test_linen_scan_like_checks_declared_parts(rule, want):
  model, x = Scanned(1), jnp.ones((3, 6))
  params = model.init(jax.random.key(0), x)["params"]
  rules = {"layers/proj": delora_jax.Rule(2, **rule)}
  if isinstance(want, str):
    with pytest.raises(ValueError, match=want):
      delora_jax.wrap(params, rules, like=(model, x))
    return
  k = delora_jax.wrap(params, rules, like=(model, x))["layers"]["proj"]
  assert (k.stack, k.in_axes, k.out_axes) == want


def test_linen_scan_identity_at_init():
  model, x = Scanned(1), jax.random.normal(jax.random.key(1), (3, 6))
  params = model.init(jax.random.key(0), x)["params"]
  tree = delora_jax.wrap(params, linen_rules(1, True, init="peft"))
  assert rel(delora_jax.apply(model, {"params": tree}, x, strict=True), model.apply({"params": params}, x)) < 1e-6


# ---------------------------------------------------------------- NNX, scanned as MaxText does

E, H, D, M, L = 8, 2, 3, 12, 5


class DenseGeneral(nnx.Module):
  """MaxText's projection: a Param kernel, read and cast, contracted with lax.dot_general."""

  def __init__(self, shape, n_in, rngs):
    self.kernel = nnx.Param(nnx.initializers.normal(0.3)(rngs.params(), shape))
    self.n_in = n_in

  def __call__(self, x):
    k = jnp.asarray(self.kernel.get_value(), x.dtype)
    dims = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    return lax.dot_general(x, k, (dims, ((), ())))


class Layer(nnx.Module):
  def __init__(self, rngs, head_dim=D):
    self.query = DenseGeneral((E, H, head_dim), 1, rngs)
    self.out = DenseGeneral((H, head_dim, E), 2, rngs)
    self.wi = DenseGeneral((E, M), 1, rngs)
    self.wo = DenseGeneral((M, E), 1, rngs)
    self.shift = nnx.Variable(jnp.full((E,), 0.1))  # non-Param state: stacked at axis 0

  def __call__(self, x):
    h = x + self.out(jnp.tanh(self.query(x))) + self.shift[...].reshape((1,) * (x.ndim - 1) + (E,))
    return h + self.wo(jax.nn.gelu(self.wi(h)))


class Decoder(nnx.Module):
  """MaxText 0.2.5's scanned decoder in small: layers made by nnx.vmap with the Params' layer
  axis at ``param_scan_axis`` (the rest at 0), called by splitting out the Params, moving that
  axis first (arrays with ndim > psa), and jax.lax.scan-ning a jax.checkpoint-ed body that
  nnx.merge-s one layer."""

  def __init__(self, psa, rngs, n_layers=L, head_dim=D):
    self.psa = psa

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=0, out_axes=nnx.StateAxes({nnx.Param: psa, ...: 0}))
    def create(rngs):
      return Layer(rngs, head_dim)

    self.layers = create(rngs)

  def __call__(self, x):
    graphdef, params, state = nnx.split(self.layers, nnx.Param, ...)
    psa = self.psa
    params = jax.tree.map(lambda a: jnp.moveaxis(a, psa, 0) if a.ndim > psa else a, params)

    def body(carry, xs):
      layer = nnx.merge(graphdef, *xs)
      return layer(carry), None

    return lax.scan(jax.checkpoint(body), x, (params, state))[0]


PROJ = {"query": 1, "out": 2, "wi": 1, "wo": 1}  # number of input axes


def nnx_rules(psa, declared, init="random"):
  if not declared:
    return {"layers/(query|out|wi|wo)/kernel": delora_jax.Rule(2, 3.0, init=init)}
  stack = 1 if psa == 0 else (psa,)
  return {
    "layers/query/kernel": delora_jax.Rule(2, 3.0, init=init, stack_axes=stack, in_axes=0 if psa else 1),
    "layers/out/kernel": delora_jax.Rule(2, 3.0, init=init, stack_axes=stack, out_axes=-1),
    "layers/(wi|wo)/kernel": delora_jax.Rule(2, 3.0, init=init, stack_axes=stack),
  }


def nnx_ref(model, psa, ad):
  """The original model with every kernel replaced by its reference merged kernel."""
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  for name, n_in in PROJ.items():
    key = ("layers", name, "kernel")
    d = ad[name]
    lam = d["lam"].reshape(-1) if psa else d["lam"]
    wn = d["w_norm"]  # a DeloraConst: layer axis first in NNX
    w = flat[key].get_value()
    flat[key] = flat[key].replace(ref_merged(w, psa, n_in, leading(d["a"], psa, 2), leading(d["b"], psa, 2), lam, wn))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def adapter_values(adapted):
  mods = delora_jax._nnx.modules(adapted)
  return {
    n: {f: getattr(mods[f"layers/{n}"].kernel_delora, f).get_value() for f in ("a", "b", "lam", "w_norm")} for n in PROJ
  }


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "like"])
@pytest.mark.parametrize("psa", [1, 0], ids=["param_scan_axis-1", "param_scan_axis-0"])
def test_nnx_maxtext_scan(psa, declared):
  model = Decoder(psa, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, E))
  adapted = delora_jax.nnx.wrap(model, nnx_rules(psa, declared), like=None if declared else (x,))
  ad = adapter_values(adapted)
  n_i = {"query": E, "out": H * D, "wi": E, "wo": M}
  n_o = {"query": H * D, "out": E, "wi": M, "wo": E}
  for n in PROJ:  # a, b, λ (Params) stacked at param_scan_axis; w_norm (not a Param) at 0
    a, b = (n_i[n], L, 2), (2, L, n_o[n])
    want = (a, b, (1, L), (L, n_i[n])) if psa == 1 else ((L, n_i[n], 2), (L, 2, n_o[n]), (L,), (L, n_i[n]))
    assert tuple(ad[n][f].shape for f in ("a", "b", "lam", "w_norm")) == want, n
  assert delora_jax.explain(adapted, x) == {
    "factorised": [f"layers/{n}/kernel" for n in ("out", "query", "wi", "wo")],
    "merged": [],
    "unused": [],
  }
  calls = nnx.jit(lambda adapted, merged, model, ad, x: (adapted(x), merged(x), nnx_ref(model, psa, ad)(x), model(x)))
  y, merged, ref, base = calls(adapted, delora_jax.nnx.merge(adapted), model, ad, x)
  assert rel(y, ref) < REL
  assert rel(y, merged) < REL
  assert rel(y, base) > 1e-3  # init="random": the adapters change the model

  grad = nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=nnx.DiffState(0, delora_jax.nnx.DeloraParam))
  g = nnx.jit(grad)(adapted, x)
  with jax.enable_x64(True):  # the reference in float64
    graphdef, state = nnx.split(model)
    model64 = nnx.merge(graphdef, f64(state))

    def ref_loss(tr, ad, x):
      full = {n: {**ad[n], **tr[n]} for n in PROJ}
      return jnp.sum(jnp.sin(nnx_ref(model64, psa, full)(x)))

    train = {n: {f: ad[n][f] for f in ("a", "b", "lam")} for n in PROJ}
    want = jax.tree.map(np.asarray, jax.jit(jax.grad(ref_loss))(f64(train), f64(ad), f64(x)))
  for n in PROJ:
    for f in ("a", "b", "lam"):
      got = getattr(_get(g, f"layers/{n}/kernel_delora"), f).get_value()
      assert np.linalg.norm(want[n][f]) > 0, (n, f)
      assert rel(got, want[n][f]) < REL, (n, f)


def test_nnx_maxtext_scan_identity_at_init_and_train_step(tmp_path):
  model = Decoder(1, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, E))
  adapted = delora_jax.nnx.wrap(model, nnx_rules(1, False, init="peft"), like=(x,))
  assert rel(adapted(x), model(x)) < 1e-6
  opt = nnx.Optimizer(adapted, delora_jax.optimizer(optax.adamw, learning_rate=1e-2), wrt=delora_jax.nnx.DeloraParam)

  @nnx.jit
  def step(m, opt):
    loss_fn = lambda m: jnp.mean((m(x) - 1.0) ** 2)  # noqa: E731
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, delora_jax.nnx.DeloraParam))(m)
    opt.update(m, grads)
    return loss

  losses = [float(step(adapted, opt)) for _ in range(4)]
  assert losses[-1] < losses[0]
  assert rel(adapted(x), delora_jax.nnx.merge(adapted)(x)) < REL
  d = delora_jax.diagnostics(adapted)["kernels"]["layers/wi/kernel"]
  assert d["lam"].shape == (L,) and float(d["bound_use"].max()) <= 1.0
  # Checkpoint round trip of the NNX model's adapters (w_norm stored layer-first there).
  delora_jax.save_adapters(tmp_path / "ck", adapted)
  fresh = delora_jax.nnx.wrap(model, nnx_rules(1, False, init="peft"), like=(x,), key=jax.random.key(5))
  back = delora_jax.load_adapters(tmp_path / "ck", fresh)
  np.testing.assert_array_equal(back(x), adapted(x))


def test_nnx_ambiguous_layer_axis_is_an_error():
  model = Decoder(1, nnx.Rngs(0), n_layers=3, head_dim=3)  # out (heads, L=3, head_dim=3, embed)
  x = jax.random.normal(jax.random.key(1), (2, 3, E))
  with pytest.raises(ValueError) as e:
    delora_jax.nnx.wrap(model, {"layers/out/kernel": 2}, like=(x,))
  msg = str(e.value)
  for part in ("layers/out/kernel", "stored shape (2, 3, 3, 8)", "with shape (2, 3, 8)", "ambiguous", "stack_axes=("):
    assert part in msg, (part, msg)
  # Declared, it is not ambiguous: the rest is inferred.
  adapted = delora_jax.nnx.wrap(model, {"layers/out/kernel": delora_jax.Rule(2, stack_axes=(1,))}, like=(x,))
  k = delora_jax._nnx.kernels(adapted)["layers/out/kernel"]
  assert (k.stack, k.in_axes, k.out_axes) == ((1,), (0, 2), (3,))


def test_nnx_declared_stack_axes_that_the_scan_contradicts():
  model = Decoder(1, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, E))
  rules = {"layers/wi/kernel": delora_jax.Rule(2, stack_axes=(2,), in_axes=0)}  # (embed, L, mlp): L is axis 1
  with pytest.raises(ValueError, match=r"layers/wi/kernel: `in_axes`|layers/wi/kernel: the model sees") as e:
    delora_jax.nnx.wrap(model, rules, like=(x,))
  msg = str(e.value)
  assert "(8, 5, 12)" in msg and "(8, 12)" in msg and "stack_axes=(" in msg, msg


class Rereads(nnx.Module):
  """A parent that gives its child's kernel another shape before calling it (as a framework
  that moved or reshaped parameters would): the layout the child sees is not the stored one."""

  def __init__(self, how):
    self.inner = DenseGeneral((8, 12), 1, nnx.Rngs(0))
    self.how = how

  def __call__(self, x):
    graphdef, state = nnx.split(self.inner)
    if self.how == "transposed":
      x = x.reshape(*x.shape[:-1], 8) @ jnp.ones((8, 12))
      inner = nnx.merge(graphdef, jax.tree.map(lambda a: a.T, state))
      return inner(x)
    if self.how == "more-axes":
      inner = nnx.merge(graphdef, jax.tree.map(lambda a: a.reshape(4, 2, 12), state))
      return inner(x.reshape(x.shape[0], 2, 4))
    inner = nnx.merge(graphdef, jax.tree.map(lambda a: a.T, state))  # "two-shapes": both
    return self.inner(x) + inner(x @ jnp.ones((8, 12))).sum()


@pytest.mark.parametrize(
  "how, match",
  [
    (
      "transposed",
      r"inner/kernel: the model sees this kernel of stored shape \(8, 12\) with shape \(12, 8\), which is not",
    ),
    (
      "more-axes",
      r"inner/kernel: the model uses this kernel of stored shape \(8, 12\) with more axes, shape \(4, 2, 12\)",
    ),
    ("two-shapes", r"inner/kernel: the model uses this kernel of stored shape \(8, 12\) with different shapes"),
  ],
)
def test_nnx_seen_shape_that_is_not_a_slice_is_an_error(how, match):
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match=match) as e:
    delora_jax.nnx.wrap(Rereads(how), {"inner/kernel": 2}, like=(x,))
  assert "Rule(r, " in str(e.value)


def test_readme_kernel_layouts_rules():
  import pathlib

  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  block = re.search(r"### Kernel layouts.*?```python\n(.*?)```", readme, re.S).group(1)
  ns = {"delora_jax": delora_jax}
  exec(block, ns)  # noqa: S102 (our README)
  query = ns["rules"]["decoder/layers/self_attention/query/kernel"]
  assert (query.stack_axes, query.in_axes) == ((1,), (0,))
  w = jnp.ones((6, 4, 2, 3))  # (embed, L, heads, head_dim)
  tree = delora_jax.wrap(
    {"decoder": {"layers": {"self_attention": {"query": {"kernel": w}}}}}, {".*query/kernel": query}
  )
  assert delora_jax.adapters(tree)["decoder/layers/self_attention/query/kernel"]["b"].shape == (8, 4, 6)
