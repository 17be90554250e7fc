"""Factorised apply: identity at init, factorised == merged, transforms, fallbacks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import delora_jax
from delora_jax import _ops
from tests import models
from tests.helpers import init_and_wrap, rel

ATOL = 2e-5


@pytest.fixture(params=["split", "joined"])
def form(request, monkeypatch):
  """Both matmul forms of the factorised dense layer. This process sees 8 devices, so
  `apply` picks the split form (x @ w + h @ v); "joined" forces the one-matmul CPU form
  ([x | h] @ [w; v]) that single-device CPU programs get."""
  monkeypatch.setattr(_ops, "join_on_cpu", lambda: request.param == "joined")
  return request.param


CASES = {
  "transformer": (lambda: models.Transformer(), (2, 5, 6), lambda: models.transformer_rules(False)),
  "transformer_scan": (lambda: models.Transformer(scan=True), (2, 5, 6), lambda: models.transformer_rules(True)),
  "conv": (
    lambda: models.ConvNet(),
    (2, 9, 9, 3),
    lambda: {r"conv\d/kernel": delora_jax.Rule(2, 4.0, init="random", out_axes=-1)},
  ),
}


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_identity_at_init_and_factorised_equals_merged(name, form):
  make, shape, rules = CASES[name]
  model, x = make(), jax.random.normal(jax.random.key(2), shape)
  base = model.apply({"params": model.init(jax.random.key(0), x)["params"]}, x)
  # init="peft": b = 0, so the adapted model is the base model: bitwise with the split
  # form; the joined form sums x @ w's terms in one matmul over in + r (the r extra terms
  # are exact zeros), whose blocking may round differently in the last bit.
  peft_rules = {p: r.__class__(**{**r.__dict__, "init": "peft"}) for p, r in rules().items()}
  params, tree = init_and_wrap(model, x, peft_rules)
  y0 = delora_jax.apply(model, {"params": tree}, x, strict=True)
  if form == "split" or name == "conv":
    np.testing.assert_array_equal(y0, base)
  else:
    np.testing.assert_allclose(y0, base, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(model.apply({"params": delora_jax.merge(tree)}, x), base)
  # init="random": a non-zero update; the factorised path equals the merged weights.
  params, tree = init_and_wrap(model, x, rules())
  report = delora_jax.explain(model, {"params": tree}, x)
  assert report["merged"] == [] and report["unused"] == []
  assert sorted(report["factorised"]) == sorted(delora_jax.adapters(tree))
  fact = delora_jax.apply(model, {"params": tree}, x, strict=True)
  merged = model.apply({"params": delora_jax.merge(tree)}, x)
  assert rel(fact, base) > 1e-3  # the adapters do something
  assert rel(fact, merged) < 1e-5


def test_scan_gives_each_layer_its_own_adapter():
  model, x = models.Transformer(scan=True), jnp.ones((1, 3, 6))
  _, tree = init_and_wrap(model, x, models.transformer_rules(True))
  ad = delora_jax.adapters(tree)["layers/attn/query/kernel"]
  assert ad["a"].shape == (2, 8, 2) and ad["b"].shape == (2, 2, 8) and ad["lam"].shape == (2,)
  assert ad["w_norm"].shape == (2, 8)
  assert not np.allclose(ad["a"][0], ad["a"][1])


def test_scan_equals_unrolled_layers():
  x = jax.random.normal(jax.random.key(3), (2, 4, 6))
  unrolled, scanned = models.Transformer(), models.Transformer(scan=True)
  p_un, t_un = init_and_wrap(unrolled, x, models.transformer_rules(False))
  stack = lambda *xs: jax.tree.map(lambda *l: jnp.stack(l), *xs)
  p_sc = {"embed": p_un["embed"], "head": p_un["head"], "layers": stack(p_un["layers_0"], p_un["layers_1"])}
  ad_un = delora_jax.adapters(t_un)
  t_sc = delora_jax.wrap(p_sc, models.transformer_rules(True))
  ad_sc = {}
  for path in delora_jax.adapters(t_sc):
    if path.startswith("layers/"):
      rest = path[len("layers/") :]
      ad_sc[path] = stack(ad_un[f"layers_0/{rest}"], ad_un[f"layers_1/{rest}"])
    else:
      ad_sc[path] = ad_un[path]
  t_sc = delora_jax.with_adapters(t_sc, ad_sc)
  y_un = delora_jax.apply(unrolled, {"params": t_un}, x, strict=True)
  y_sc = delora_jax.apply(scanned, {"params": t_sc}, x, strict=True)
  assert rel(y_sc, y_un) < 1e-5


def loss_fn(model):
  def loss(trainable, frozen, x):
    y = delora_jax.apply(model, {"params": delora_jax.combine(trainable, frozen)}, x, strict=True)
    return jnp.mean(y**2)

  return loss


@pytest.mark.parametrize("name", ["transformer", "transformer_scan", "conv"])
def test_gradients_factorised_equal_merged_and_skip_frozen(name, form):
  make, shape, rules = CASES[name]
  model, x = make(), jax.random.normal(jax.random.key(2), shape)
  _, tree = init_and_wrap(model, x, rules())
  trainable, frozen = delora_jax.split(tree)
  g_fact = jax.jit(jax.grad(loss_fn(model)))(trainable, frozen, x)

  def merged_loss(trainable):
    return jnp.mean(model.apply({"params": delora_jax.merge(delora_jax.combine(trainable, frozen))}, x) ** 2)

  g_merged = jax.jit(jax.grad(merged_loss))(trainable)
  # a and b: relative error. λ: dL/dλ = <G, ΔW> / λ (ΔW is linear in λ, G = dL/dW) sums terms of
  # total size ~ ||G|| ||ΔW|| / |λ| that cancel to a much smaller value, so its rounding error is
  # relative to that scale, not to |dL/dλ| (measured: <= 2e-6 of it, on jax 0.10 and 0.12).
  g_w = traverse_util.flatten_dict(
    jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)))(delora_jax.merge(tree)), sep="/"
  )
  dws, ks = delora_jax.delta(tree), delora_jax._tree.kernels(tree)
  gfs, gms = delora_jax._tree.kernels(g_fact), delora_jax._tree.kernels(g_merged)
  assert sorted(gfs) == sorted(gms) == sorted(ks)
  for p, k in ks.items():
    assert rel(gfs[p].a, gms[p].a) < 1e-4 and rel(gfs[p].b, gms[p].b) < 1e-4, p
    body = tuple(range(k.lam.ndim, k.w.ndim))  # per stacked layer (nn.scan): one λ each
    norm = lambda t, body=body: np.sqrt(np.sum(np.asarray(t, np.float64) ** 2, axis=body))
    scale = norm(g_w[p]) * norm(dws[p]) / np.abs(np.asarray(k.lam))
    assert np.all(np.abs(np.asarray(gfs[p].lam, np.float64) - gms[p].lam) < 1e-5 * scale), p
  # Differentiating the full tree: w and w_norm receive exactly zero gradient.
  g_full = jax.jit(jax.grad(lambda t: loss_fn(model)(*delora_jax.split(t), x)))(tree)
  for k in delora_jax._tree.kernels(g_full).values():
    assert not np.any(np.asarray(k.w)) and not np.any(np.asarray(k.w_norm))


def test_vmap_over_inputs_and_over_adapters(form):
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (4, 2, 5))
  _, tree = init_and_wrap(model, x[0], {"kernel": delora_jax.Rule(2, init="random")})
  f = lambda t, xi: delora_jax.apply(model, {"params": t}, xi, strict=True)
  np.testing.assert_allclose(jax.vmap(f, in_axes=(None, 0))(tree, x), f(tree, x), atol=ATOL)
  # An ensemble: adapters stacked on a leading axis, vmapped together with their kernels.
  plain = delora_jax.unwrap(tree)
  trees = [
    delora_jax.wrap(plain, {"kernel": delora_jax.Rule(2, init="random")}, key=jax.random.key(i)) for i in range(3)
  ]
  stacked = jax.tree.map(lambda *l: jnp.stack(l), *trees)
  ys = jax.vmap(f, in_axes=(0, None))(stacked, x[0])
  for i, t in enumerate(trees):
    np.testing.assert_allclose(ys[i], f(t, x[0]), atol=ATOL)
  merged = jax.vmap(delora_jax.merge)(stacked)
  np.testing.assert_allclose(merged["kernel"][1], delora_jax.merge(trees[1])["kernel"], atol=ATOL)


def test_remat_and_jit(form):
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.remat(nn.Dense)(4, name="d")(x)

  model, x = M(), jnp.ones((2, 3))
  _, tree = init_and_wrap(model, x, {"d/kernel": delora_jax.Rule(2, init="random")})
  y = jax.jit(lambda t: delora_jax.apply(model, {"params": t}, x, strict=True))(tree)
  np.testing.assert_allclose(y, model.apply({"params": delora_jax.merge(tree)}, x), atol=ATOL)
  trainable, frozen = delora_jax.split(tree)
  g = jax.grad(lambda t: jnp.sum(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x) ** 2))(trainable)
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(g))


def test_custom_module_contracting_its_kernel_is_factorised():
  """A module of the user's own doing `jnp.dot(x, kernel)` runs factorised, strict or not."""
  model, x = models.CustomDot(), jax.random.normal(jax.random.key(0), (3, 4))
  _, tree = init_and_wrap(model, x, {".*kernel": delora_jax.Rule(2, init="random")})
  assert delora_jax.explain(model, {"params": tree}, x) == {
    "factorised": ["dense/kernel", "kernel"],
    "merged": [],
    "unused": [],
  }
  got = delora_jax.apply(model, {"params": tree}, x, strict=True)
  want = model.apply({"params": delora_jax.merge(tree)}, x)
  assert rel(got, want) < 1e-5
  assert rel(got, model.apply({"params": delora_jax.unwrap(tree)}, x)) > 1e-3


# Modules using their kernel in a way no low-rank form computes: through a jitted jnp
# function (jnp.sum) and through the tracked kernel's own indexing (kernel[ids]).
UNFACTORISABLE = {"column_sums": models.CustomColumnSums, "gather": models.CustomGather}


@pytest.mark.parametrize("name", list(UNFACTORISABLE), ids=list(UNFACTORISABLE))
def test_custom_module_falls_back_to_merged_and_reports_it(name):
  model, x = UNFACTORISABLE[name](), jax.random.normal(jax.random.key(0), (3, 4))
  _, tree = init_and_wrap(model, x, {".*kernel": delora_jax.Rule(2, init="random")})
  want = model.apply({"params": delora_jax.merge(tree)}, x)
  with pytest.warns(delora_jax.FallbackWarning, match=r"\['kernel'\]"):
    got = delora_jax.apply(model, {"params": tree}, x)
  np.testing.assert_allclose(got, want, atol=ATOL)
  assert delora_jax.explain(model, {"params": tree}, x) == {
    "factorised": ["dense/kernel"],
    "merged": ["kernel"],
    "unused": [],
  }
  with pytest.raises(TypeError, match=r"kernel: this adapted kernel is used .*strict=True forbids"):
    delora_jax.apply(model, {"params": tree}, x, strict=True)


def test_unused_kernels_are_reported():
  class TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x, which: int = 0):
      a, b = nn.Dense(2, name="a"), nn.Dense(2, name="b")
      return a(x) + b(x) if which == 0 else a(x)

  model, x = TwoHeads(), jnp.ones((1, 3))
  _, tree = init_and_wrap(model, x, {".*kernel": 2})
  assert delora_jax.explain(model, {"params": tree}, x, 1)["unused"] == ["b/kernel"]


def test_plain_model_apply_on_adapted_tree_raises():
  model, x = models.Transformer(), jnp.ones((1, 2, 6))
  _, tree = init_and_wrap(model, x, models.transformer_rules(False))
  with pytest.raises(TypeError, match="delora_jax.apply"):
    model.apply({"params": tree}, x)
  with pytest.raises(TypeError, match="delora_jax.apply"):
    jax.jit(lambda t: model.apply({"params": t}, x))(tree)


def test_adapter_dropout_follows_the_dropout_rng(form):
  model = nn.Dense(6)
  # One-hot rows: each row's dropped-out input is either 0 or 2x (p = 0.5).
  x = jnp.repeat(jnp.eye(10), 20, axis=0) * 1.5
  _, tree = init_and_wrap(model, x, {"kernel": delora_jax.Rule(3, init="random", dropout=0.5)})
  merged = model.apply({"params": delora_jax.merge(tree)}, x)
  # Without a dropout rng (inference) dropout is off.
  np.testing.assert_allclose(delora_jax.apply(model, {"params": tree}, x), merged, atol=ATOL)
  y = delora_jax.apply(model, {"params": tree}, x, rngs={"dropout": jax.random.key(7)})
  base = model.apply({"params": delora_jax.unwrap(tree)}, x)  # the base branch is not dropped
  d, full = np.asarray(y - base), np.asarray(x @ delora_jax.delta(tree)["kernel"])
  dropped = np.all(np.abs(d) < 1e-5, axis=1)
  kept = np.all(np.abs(d - 2 * full) < 1e-4, axis=1)
  assert np.all(dropped | kept)
  assert 0.3 < dropped.mean() < 0.7
  y2 = delora_jax.apply(model, {"params": tree}, x, rngs={"dropout": jax.random.key(8)})
  assert not np.allclose(y, y2)


def test_frozen_leaves_get_exactly_zero_update_full_tree_optimizer():
  model, x = models.Transformer(), jax.random.normal(jax.random.key(4), (2, 3, 6))
  _, tree = init_and_wrap(model, x, models.transformer_rules(False))
  opt = delora_jax.optimizer(optax.adamw, learning_rate=1e-2, weight_decay=0.1)
  state = opt.init(tree)

  def loss(t):
    return jnp.mean(delora_jax.apply(model, {"params": t}, x, strict=True) ** 2)

  new = tree
  for _ in range(3):
    g = jax.jit(jax.grad(loss))(new)
    upd, state = jax.jit(opt.update)(g, state, new)
    for path, u in zip(*delora_jax._tree.flatten(upd)[:2]):
      if isinstance(u, delora_jax.DeloraKernel):
        assert not np.any(np.asarray(u.w)) and not np.any(np.asarray(u.w_norm)), path
        assert np.any(np.asarray(u.a)) or np.any(np.asarray(u.b)), path
      else:
        assert not np.any(np.asarray(u)), path  # biases, embed: frozen
    new = optax.apply_updates(new, upd)
  np.testing.assert_array_equal(delora_jax.unwrap(new)["embed"]["kernel"], tree["embed"]["kernel"])
  for k_new, k_old in zip(delora_jax._tree.kernels(new).values(), delora_jax._tree.kernels(tree).values()):
    np.testing.assert_array_equal(k_new.w, k_old.w)
    np.testing.assert_array_equal(k_new.w_norm, k_old.w_norm)


@pytest.mark.parametrize("name", list(UNFACTORISABLE), ids=list(UNFACTORISABLE))
def test_strict_and_report_do_not_depend_on_earlier_calls(name):
  """jnp functions are jitted and cache traces: a lenient call must not let a later
  strict call through, nor hide the fallback from explain()."""
  model, x = UNFACTORISABLE[name](), jnp.ones((2, 4))
  _, tree = init_and_wrap(model, x, {"kernel": 2})
  for _ in range(2):
    with pytest.warns(delora_jax.FallbackWarning):
      delora_jax.apply(model, {"params": tree}, x)
    assert delora_jax.explain(model, {"params": tree}, x)["merged"] == ["kernel"]
    with pytest.raises(TypeError, match="strict=True forbids"):
      delora_jax.apply(model, {"params": tree}, x, strict=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_library_code_is_clean_under_strict_dtype_promotion(dtype, form):
  model = models.Transformer()
  x = jax.random.normal(jax.random.key(0), (1, 3, 6)).astype(dtype)
  params = jax.tree.map(lambda p: p.astype(dtype), model.init(jax.random.key(1), x)["params"])
  with jax.numpy_dtype_promotion("strict"):
    tree = delora_jax.wrap(params, models.transformer_rules(False))
    trainable, frozen = delora_jax.split(tree)
    g = jax.jit(
      jax.grad(
        lambda t: jnp.sum(
          delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x, strict=True).astype(jnp.float32)
        )
      )
    )(trainable)
    merged = delora_jax.merge(tree)
  assert all(np.all(np.isfinite(np.asarray(l, np.float32))) for l in jax.tree.leaves(g))
  assert merged["layers_0"]["attn"]["query"]["kernel"].dtype == jnp.dtype(dtype)


def _kernel_shaped_results(hlo: str, shape: tuple[int, int]) -> list[str]:
  """HLO instructions (not parameters or plumbing) whose result has ``shape`` in any layout."""
  dims = ",".join(map(str, shape)), ",".join(map(str, shape[::-1]))
  plumbing = ("parameter(", "get-tuple-element(", "tuple(", "bitcast(", "copy(")
  return [
    l.strip()
    for l in hlo.splitlines()
    if any(f"f32[{d}]" in l.split("=", 1)[-1].split("(")[0] for d in dims)
    and " = " in l
    and not any(p in l for p in plumbing)
  ]


def test_factorised_step_forms_no_dense_update_or_kernel_gradient(form):
  """Neither ΔW (in, out) nor a frozen kernel's gradient x^T dy appears in the compiled step."""
  n_in, n_out = 24, 40
  model = nn.Sequential([nn.Dense(n_out), jnp.tanh, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (512, n_in))
  params = model.init(jax.random.key(1), x)["params"]
  tree = delora_jax.wrap(params, {"layers_0/kernel": delora_jax.Rule(3, init="random")})
  trainable, frozen = delora_jax.split(tree)
  opt = delora_jax.optimizer(optax.adam, learning_rate=1e-3)

  def make_step(forward):
    def step(trainable, state, frozen, x):
      loss, g = jax.value_and_grad(lambda t: jnp.mean(forward(delora_jax.combine(t, frozen), x) ** 2))(trainable)
      upd, state = opt.update(g, state, trainable)
      return optax.apply_updates(trainable, upd), state, loss

    return jax.jit(step, donate_argnums=(0, 1))

  args = (trainable, opt.init(trainable), frozen, x)
  fact = make_step(lambda t, x: delora_jax.apply(model, {"params": t}, x, strict=True))
  merged = make_step(lambda t, x: model.apply({"params": delora_jax.merge(t)}, x))
  fact_hlo = fact.lower(*args).compile().as_text()
  merged_hlo = merged.lower(*args).compile().as_text()
  assert _kernel_shaped_results(merged_hlo, (n_in, n_out))  # the control does form them
  assert _kernel_shaped_results(fact_hlo, (n_in, n_out)) == []
  # The joined form's one matmul over [x | h] and [w; v] (in + r rows) is really in use.
  joined = [l for l in fact_hlo.splitlines() if f"f32[{n_in + 3},{n_out}]" in l and " = " in l]
  assert bool(joined) == (form == "joined")


@pytest.mark.parametrize("dropout", [False, True], ids=["xd=x", "xd!=x"])
def test_lowrank_vjp_equals_autodiff_of_the_plain_formula(form, dropout):
  """The custom VJP of the fused layer against autodiff of x @ w + ((xd @ u) @ v)."""
  ks = jax.random.split(jax.random.key(5), 5)
  x = jax.random.normal(ks[0], (7, 6))
  xd = jax.random.normal(ks[1], (7, 6)) if dropout else x
  w, u, v = (jax.random.normal(k, s) for k, s in zip(ks[2:], [(6, 5), (6, 3), (3, 5)]))
  dy = jax.random.normal(jax.random.key(6), (7, 5))

  def ref(x, xd, u, v):
    return x @ jax.lax.stop_gradient(w) + (xd @ u) @ v

  def got(x, xd, u, v):
    return _ops.lowrank(x, xd, w, u, v, None)

  y_ref, vjp_ref = jax.vjp(ref, x, xd, u, v)
  y_got, vjp_got = jax.jit(lambda *a: jax.vjp(got, *a))(x, xd, u, v)
  np.testing.assert_allclose(y_got, y_ref, rtol=1e-5, atol=1e-6)
  for g, r in zip(vjp_got(dy), vjp_ref(dy)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  # No gradient reaches the frozen weight.
  gw = jax.grad(lambda w: jnp.sum(_ops.lowrank(x, xd, w, u, v, None)))(w)
  assert not np.any(np.asarray(gw))


_FORM_PROBE = r"""
import jax, jax.numpy as jnp, flax.linen as nn, delora_jax
model = nn.Dense(40)
x = jnp.ones((64, 24))
tree = delora_jax.wrap(model.init(jax.random.key(0), x)["params"], {"kernel": delora_jax.Rule(3)})
trainable, frozen = delora_jax.split(tree)
loss = lambda t: jnp.sum(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x, strict=True))
hlo = jax.jit(jax.value_and_grad(loss)).lower(trainable).compile().as_text()
print("JOINED" if "f32[27,40]" in hlo else "SPLIT", jax.device_count())
"""


@pytest.mark.parametrize("devices, want", [(1, "JOINED 1"), (2, "SPLIT 2")])
def test_single_device_cpu_programs_use_the_joined_matmul(devices, want):
  """The matmul form is chosen per process: one CPU device gets the joined form, a
  process with several devices (meshes, pmap) keeps the split one everywhere."""
  import os
  import subprocess
  import sys

  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _FORM_PROBE], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split("\n")[-2] == want


def _scaled_factors(tree, scale):
  """``tree`` with every ``a`` and ``b`` multiplied by ``scale`` (unseen by the model)."""
  return jax.tree.map(
    lambda k: k.replace(a=k.a * scale, b=k.b * scale) if delora_jax._kernel.is_kernel(k) else k,
    tree,
    is_leaf=delora_jax._kernel.is_kernel,
  )


def test_contraction_factors_fold_the_scales_into_v_with_the_same_product():
  from delora_jax import _kernel  # noqa: PLC0415

  tree = delora_jax.wrap(
    {"kernel": jax.random.normal(jax.random.key(0), (12, 9))}, {"kernel": delora_jax.Rule(4, 3.0, init="random")}
  )
  k = tree["kernel"]
  u, v = _kernel.contraction_factors(k, jnp.float32, jnp.bfloat16)
  np.testing.assert_array_equal(u, k.w_norm[:, None] * k.a)  # no per-column scale on a's side
  u0, v0 = _kernel.factors(k)
  np.testing.assert_allclose(u @ v, u0 @ v0, rtol=1e-5, atol=1e-6 * float(jnp.abs(u0 @ v0).max()))


@pytest.mark.parametrize(
  "case",
  ["float16 factors", "float16 compute", "float16 base", "paper init"],
)
def test_contraction_factors_keep_the_bounded_halves_where_float16_or_a_residual(case):
  from delora_jax import _kernel  # noqa: PLC0415

  extra = {"dtype": "float16"} if case == "float16 factors" else {}
  rule = delora_jax.Rule(4, 3.0, init="paper" if case == "paper init" else "random", **extra)
  k = delora_jax.wrap({"kernel": jax.random.normal(jax.random.key(0), (12, 9))}, {"kernel": rule})["kernel"]
  dtypes = {"float16 compute": (jnp.float32, jnp.float16), "float16 base": (jnp.float16,)}.get(case, (jnp.float32,))
  for got, want in zip(_kernel.contraction_factors(k, *dtypes), _kernel.factors(k)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("module", ["Dense", "Conv f16 base", "Conv f32 base"])
def test_float16_compute_with_huge_float32_factors_stays_finite(module):
  """The folded factors are for float32 ranges: a float16 compute dtype (Dense's fused path) or a
  float16 base (the generic path) keeps the bounded halves, and the generic path rebalances folded
  factors (a float32 base) before a float16 contraction, so factors near the optimizer's limit
  still give finite, right outputs and gradients."""
  if module == "Dense":
    model, params_dtype = nn.Dense(16, dtype=jnp.float16), jnp.float32
  else:  # a convolution: the generic evaluator
    model = nn.Conv(16, (3,), dtype=jnp.float16)
    params_dtype = jnp.float16 if "f16" in module else jnp.float32
  x = jax.random.normal(jax.random.key(1), (3, 4, 8)).astype(jnp.float16)
  params = jax.tree.map(lambda p: p.astype(params_dtype), model.init(jax.random.key(0), x)["params"])
  rule = delora_jax.Rule(4, 3.0, init="random", dtype="float32")
  tree = delora_jax.wrap(params, {"kernel": rule}, like=(model, x))
  big = _scaled_factors(tree, 1e9)  # column norms ~1e9: w_norm * a alone would overflow float16
  got = delora_jax.apply(model, {"params": big}, x, strict=True)
  want = delora_jax.apply(model, {"params": tree}, x, strict=True)
  assert bool(jnp.all(jnp.isfinite(got)))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)

  def grads(t):
    trainable, frozen = delora_jax.split(t)

    def loss(tr):
      y = delora_jax.apply(model, {"params": delora_jax.combine(tr, frozen)}, x, strict=True)
      return jnp.sum(y.astype(jnp.float32) ** 2)

    return jax.grad(loss)(trainable)["kernel"]

  g_big, g = grads(big), grads(tree)
  # The model sees a and b through their normalised columns and rows: scaled by 1e9, their gradients
  # are 1e9 times smaller, λ's the same.
  for got_g, want_g in ((g_big.a * 1e9, g.a), (g_big.b * 1e9, g.b), (g_big.lam, g.lam)):
    np.testing.assert_allclose(got_g, want_g, rtol=2e-2, atol=2e-2 * float(jnp.abs(want_g).max()))


def test_folded_factors_give_exact_gradients_with_both_factors_near_the_limit():
  """float32 factors at the optimizer's limit (1e12 each): the scale's gradient terms, with the
  norms' product near 1e24, stay exact (a quotient by the product squares it past float32)."""
  model = nn.Dense(7)
  x = jax.random.normal(jax.random.key(1), (5, 6))
  params = model.init(jax.random.key(0), x)["params"]
  tree = delora_jax.wrap(params, {"kernel": delora_jax.Rule(3, 2.0, init="random")})

  def grads(t):
    trainable, frozen = delora_jax.split(t)

    def loss(tr):
      return jnp.sum(delora_jax.apply(model, {"params": delora_jax.combine(tr, frozen)}, x, strict=True) ** 2)

    return jax.grad(loss)(trainable)["kernel"]

  scale = 3e11  # column norms of a and row norms of b near 1e12
  g_big, g = grads(_scaled_factors(tree, scale)), grads(tree)
  for got_g, want_g in ((g_big.a * scale, g.a), (g_big.b * scale, g.b), (g_big.lam, g.lam)):
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6 * float(jnp.abs(want_g).max()))
