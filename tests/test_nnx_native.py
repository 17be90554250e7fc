"""Flax NNX: delora_jax.nnx.wrap adapts the model itself; calls run factorised.

The invariants every layer kind keeps (identity at init, adapted == merged, gradients,
explain, one trace per jit, frozen leaves) are in tests/test_invariants.py. Here: the
reference independent of the library (the merged kernel ``w + ΔW`` rebuilt from
METHOD.md with the adapter's ``a``, ``b``, ``lam`` and run through the original,
unadapted model), the adapted model's state, training, fallbacks and errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import delora_jax
from delora_jax.nnx import DeloraParam
from tests.helpers import REL, R, assert_trees_equal, rel
from tests.models import Holder, LaxDot, TunixEinsum


def _rngs():
  return nnx.Rngs(0)


# id: (model factory, input shape, rules, adapted path, its declared input axes)
CASES = {
  "linear": (lambda: Holder(nnx.Linear(4, 5, rngs=_rngs())), (2, 3, 4), {"layer/kernel": R()}, "layer/kernel", (0,)),
  "linear_root": (lambda: nnx.Linear(4, 5, rngs=_rngs()), (2, 3, 4), {"kernel": R()}, "kernel", (0,)),
  "linear_general": (
    lambda: Holder(nnx.LinearGeneral((2, 3), (4, 2), axis=(-2, -1), rngs=_rngs())),
    (5, 2, 3),
    {"layer/kernel": R(in_axes=(0, 1))},
    "layer/kernel",
    (0, 1),
  ),
  "einsum": (
    lambda: Holder(nnx.Einsum("btd,dhk->bthk", (4, 2, 3), (2, 3), rngs=_rngs())),
    (2, 3, 4),
    {"layer/kernel": R(in_axes=0)},
    "layer/kernel",
    (0,),
  ),
  "conv": (
    lambda: Holder(nnx.Conv(3, 4, (3, 3), rngs=_rngs())),
    (2, 5, 5, 3),
    {"layer/kernel": R(out_axes=-1)},
    "layer/kernel",
    (0, 1, 2),
  ),
  "tunix_einsum": (
    lambda: Holder(TunixEinsum("BTNH,NHD->BTD", (2, 3, 4), rngs=_rngs())),
    (2, 3, 2, 3),
    {"layer/w": R(out_axes=-1)},
    "layer/w",
    (0, 1),
  ),
  "custom_lax_dot_general": (
    lambda: Holder(LaxDot((4, 5), rngs=_rngs())),
    (2, 3, 4),
    {"layer/kernel": R()},
    "layer/kernel",
    (0,),
  ),
}


def setup(name, key=1, **wrap_kw):
  make, shape, rules, path, in_axes = CASES[name]
  model = make()
  x = jax.random.normal(jax.random.key(2), shape)
  adapted = delora_jax.nnx.wrap(model, rules, key=jax.random.key(key), **wrap_kw)
  return model, adapted, x, rules, path, in_axes


def _get(obj, path):
  for p in path.split("/"):
    obj = getattr(obj, p)
  return obj


def ref_merged_kernel(w, a, b, lam, in_axes):
  """``w + ΔW`` from METHOD.md: the kernel viewed as (in, out) with ``in_axes`` first."""
  outs = [p for p in range(w.ndim) if p not in in_axes]
  perm = list(in_axes) + outs
  n_in = int(np.prod([w.shape[p] for p in in_axes]))
  wm = jnp.transpose(w, perm).reshape(n_in, -1)
  w_norm = jnp.sqrt(jnp.sum(wm * wm, axis=1))
  na = jnp.maximum(jnp.sqrt(jnp.sum(a * a, axis=0)), 1e-4)
  nb = jnp.maximum(jnp.sqrt(jnp.sum(b * b, axis=1)), 1e-4)
  s = lam / a.shape[1] / (na * nb)
  m = wm + jnp.matmul(w_norm[:, None] * a * s[None, :], b, precision="highest")
  return jnp.transpose(m.reshape([w.shape[p] for p in perm]), np.argsort(perm))


def _path(keys):
  names = (getattr(k, "key", getattr(k, "name", None)) for k in keys)
  return "/".join(str(n) for n in names if n not in (None, "value"))


def ref_call(model, path, in_axes, ad, x):
  """The original model with its kernel at ``path`` replaced by the reference w + ΔW."""
  graphdef, state = nnx.split(model)
  state = jax.tree_util.tree_map_with_path(
    lambda p, v: ref_merged_kernel(v, ad["a"], ad["b"], ad["lam"], in_axes) if _path(p) == path else v, state
  )
  return nnx.merge(graphdef, state)(x)  # a fresh model: `model` itself is never touched


def flat(state):
  """``{"a/b/c": array}`` of an nnx.State (Variables unwrapped)."""
  return {
    "/".join(map(str, p)): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
    for p, v in nnx.to_flat_state(state)
  }


# ---------------------------------------------------------------- per layer kind


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_outputs_and_gradients_equal_the_method_md_reference(name):
  model, adapted, x, _, path, in_axes = setup(name)
  ad = delora_jax.adapters(adapted)[path]
  w = _get(model, path).get_value()
  # One compilation for both calls (the tests are compile-bound on CPU).
  calls = nnx.jit(lambda adapted, model, ad, x: (adapted(x), ref_call(model, path, in_axes, ad, x)))
  got, ref = calls(adapted, model, ad, x)
  assert rel(got, ref) <= REL
  # w_norm is the norm of each input row of the (in, out) view, computed at wrap time.
  n_in = int(np.prod([w.shape[p] for p in in_axes]))
  outs = [p for p in range(w.ndim) if p not in in_axes]
  wm = np.transpose(np.asarray(w, np.float64), list(in_axes) + outs).reshape(n_in, -1)
  np.testing.assert_allclose(ad["w_norm"], np.linalg.norm(wm, axis=1), rtol=1e-6)

  ct = jax.random.normal(jax.random.key(3), got.shape)
  grad = nnx.grad(lambda m, x, ct: jnp.sum(m(x) * ct), argnums=nnx.DiffState(0, DeloraParam))
  g = flat(nnx.jit(grad)(adapted, x, ct))
  prefix = path + "_delora/"
  assert sorted(g) == [prefix + f for f in ("a", "b", "lam")]
  # The reference gradient in float64: λ's is one sum over every output, with enough
  # cancellation that two float32 computations of it differ by ~1e-5 relative.
  with jax.enable_x64(True):
    f64 = lambda v: jnp.asarray(np.asarray(v, np.float64))  # noqa: E731
    graphdef, state = nnx.split(model)
    model64 = nnx.merge(graphdef, jax.tree.map(f64, state))
    train = {f: f64(ad[f]) for f in ("a", "b", "lam")}
    want = jax.jit(jax.grad(lambda t, x, ct: jnp.sum(ref_call(model64, path, in_axes, t, x) * ct)))(
      train, f64(x), f64(ct)
    )
    want = {f: np.asarray(v) for f, v in want.items()}
  for f in ("a", "b", "lam"):
    assert np.linalg.norm(want[f]) > 0, f
    assert rel(g[prefix + f], want[f]) <= REL, f


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_adapters_equal_those_of_the_state_path(name):
  model, adapted, _, rules, path, _ = setup(name, key=7)
  via_state = delora_jax.adapters(delora_jax.wrap(nnx.state(model), rules, key=jax.random.key(7)))
  via_model = delora_jax.adapters(adapted)
  assert list(via_model) == list(via_state) == [path]
  assert sorted(via_model[path]) == sorted(via_state[path]) == ["a", "b", "lam", "w_norm"]
  for f, arr in via_state[path].items():
    assert via_model[path][f].dtype == arr.dtype, f
    np.testing.assert_array_equal(via_model[path][f], arr, err_msg=f)


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_lora_param_state_unwrap_and_merge(name):
  model, adapted, x, _, path, in_axes = setup(name)
  before = flat(nnx.state(model))
  prefix = path + "_delora/"
  # Only the adapter's trainable factors are LoRAParams (what tunix's PeftTrainer trains).
  assert sorted(flat(nnx.state(adapted, nnx.LoRAParam))) == [prefix + f for f in ("a", "b", "lam")]
  assert sorted(flat(nnx.state(adapted, DeloraParam))) == [prefix + f for f in ("a", "b", "lam")]
  # The kernel stays where it was; the adapter sits beside it.
  assert set(before) < set(flat(nnx.state(adapted)))
  owner = _get(model, path.rpartition("/")[0]) if "/" in path else model

  unwrapped = delora_jax.nnx.unwrap(adapted)
  u_owner = _get(unwrapped, path.rpartition("/")[0]) if "/" in path else unwrapped
  assert type(unwrapped) is type(model) and type(u_owner) is type(owner)
  assert_trees_equal(flat(nnx.state(unwrapped)), before)

  merged = delora_jax.nnx.merge(adapted)
  m_owner = _get(merged, path.rpartition("/")[0]) if "/" in path else merged
  assert type(merged) is type(model) and type(m_owner) is type(owner)
  m = flat(nnx.state(merged))
  assert sorted(m) == sorted(before)
  ad = delora_jax.adapters(adapted)[path]
  want = ref_merged_kernel(_get(model, path).get_value(), ad["a"], ad["b"], ad["lam"], in_axes)
  np.testing.assert_allclose(m[path], want, rtol=1e-6, atol=1e-6)
  assert rel(m[path], before[path]) > 1e-3
  for p in before:
    if p != path:
      np.testing.assert_array_equal(m[p], before[p], err_msg=p)


# ---------------------------------------------------------------- training


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 16, rngs=rngs)
    self.out = TunixEinsum("bh,ho->bo", (16, 2), rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


MLP_RULES = {"hidden/kernel": delora_jax.Rule(2, 1.0), "out/w": delora_jax.Rule(2, 1.0)}


def _data():
  x = jax.random.normal(jax.random.key(1), (32, 5))
  return x, jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=-1)


@nnx.jit
def _step(model, opt, x, y):
  def loss_fn(m):
    return jnp.mean((m(x) - y) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, DeloraParam))(model)
  opt.update(model, grads)
  return loss


def _train(adapted, steps, **opt_kw):
  opt = nnx.Optimizer(adapted, delora_jax.optimizer(optax.adamw, **opt_kw), wrt=DeloraParam)
  x, y = _data()
  return [float(_step(adapted, opt, x, y)) for _ in range(steps)]


def _lams(adapted):
  return {p: np.asarray(ad["lam"]) for p, ad in delora_jax.adapters(adapted).items()}


def test_optimizer_trains_and_leaves_the_original_model_unchanged():
  model = MLP(nnx.Rngs(0))
  before = flat(nnx.state(model))
  adapted = delora_jax.nnx.wrap(model, MLP_RULES)
  frozen = {p: v for p, v in flat(nnx.state(adapted)).items() if "_delora/" not in p}
  losses = _train(adapted, 40, learning_rate=1e-2, weight_decay=0.1)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
  # The original model: same Variables, bit for bit, and its own classes.
  assert_trees_equal(flat(nnx.state(model)), before)
  assert type(model.hidden) is nnx.Linear and type(model.out) is TunixEinsum
  # Inside the adapted model only the adapters moved.
  now = flat(nnx.state(adapted))
  for p, v in frozen.items():
    np.testing.assert_array_equal(now[p], v, err_msg=p)


def test_lam_is_not_weight_decayed():
  """From init="peft" (b = 0) λ's gradient is exactly 0, so one AdamW step changes λ
  only through weight decay: it must stay bitwise equal, unless decay_lam=True."""
  for decay_lam in (False, True):
    adapted = delora_jax.nnx.wrap(MLP(nnx.Rngs(0)), MLP_RULES)
    lam0 = _lams(adapted)
    _train(adapted, 1, learning_rate=1e-2, weight_decay=0.1, decay_lam=decay_lam)
    for p, lam in _lams(adapted).items():
      if decay_lam:
        np.testing.assert_allclose(lam, lam0[p] * (1 - 1e-2 * 0.1), rtol=1e-6, err_msg=p)
      else:
        np.testing.assert_array_equal(lam, lam0[p], err_msg=p)


def test_lam_learning_rate_zero_keeps_lam_exactly():
  rules = {p: delora_jax.Rule(2, 1.0, init="random") for p in MLP_RULES}
  adapted = delora_jax.nnx.wrap(MLP(nnx.Rngs(0)), rules)
  lam0, ad0 = _lams(adapted), delora_jax.adapters(adapted)
  losses = _train(adapted, 20, learning_rate=1e-2, weight_decay=0.1, lam_learning_rate=0.0)
  assert losses[-1] < losses[0]
  for p, lam in _lams(adapted).items():
    np.testing.assert_array_equal(lam, lam0[p], err_msg=p)
    assert not np.allclose(delora_jax.adapters(adapted)[p]["a"], ad0[p]["a"]), p


# ---------------------------------------------------------------- kernels read outside __call__


class TiedEmbedder(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(nnx.initializers.normal(0.5)(rngs.params(), (4, 6)))

  def __call__(self, x):  # (..., 4) -> (..., 6)
    return x @ self.w[...]

  def attend(self, x):  # (..., 6) -> (..., 4): the same kernel, the other way round
    return x @ self.w[...].T


class Tied(nnx.Module):
  def __init__(self, rngs):
    self.emb = TiedEmbedder(rngs)

  def __call__(self, x):
    return self.emb.attend(jnp.tanh(self.emb(x)))


def test_kernel_read_outside_call_is_merged_and_reported():
  model = Tied(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (3, 4))
  rules = {"emb/w": R()}
  adapted = delora_jax.nnx.wrap(model, rules)
  ad = delora_jax.adapters(adapted)["emb/w"]
  w = ref_merged_kernel(model.emb.w.get_value(), ad["a"], ad["b"], ad["lam"], (0,))
  want = jnp.tanh(x @ w) @ w.T
  with pytest.warns(delora_jax.FallbackWarning, match="emb/w"):
    got = adapted(x)
  assert rel(got, want) <= REL
  assert delora_jax.explain(adapted, x)["merged"] == ["emb/w"]
  strict = delora_jax.nnx.wrap(model, rules, strict=True)
  with pytest.raises(TypeError, match=r"emb/w: .*strict=True forbids"):
    strict(x)


# ---------------------------------------------------------------- errors


def _linear():
  return nnx.Linear(4, 5, rngs=nnx.Rngs(0))


def _apply_adapted():
  delora_jax.apply(delora_jax.nnx.wrap(_linear(), {"kernel": 2}), {"params": {}}, jnp.ones((1, 4)))


def _merge_adapted():
  delora_jax.merge(delora_jax.nnx.wrap(_linear(), {"kernel": 2}))


def _update_with_wrapped_state(model):
  def run():
    nnx.update(model, delora_jax.wrap(nnx.state(model), {"kernel|w": 2}))
    model(jnp.ones((1, 4)))

  return run


def _wrap_twice():
  delora_jax.nnx.wrap(delora_jax.nnx.wrap(_linear(), {"kernel": 2}), {"kernel": 2})


def _dropout_without_rngs():
  delora_jax.nnx.wrap(Holder(_linear()), {"layer/kernel": delora_jax.Rule(2, dropout=0.1)})


ERRORS = {
  "apply_on_adapted_nnx": (_apply_adapted, TypeError, r"nnx"),
  "merge_on_adapted_nnx": (_merge_adapted, TypeError, r"delora_jax\.nnx\.merge"),
  "wrapped_state_in_linear": (_update_with_wrapped_state(_linear()), TypeError, r"delora_jax\.nnx\.wrap"),
  "wrapped_state_in_custom": (
    _update_with_wrapped_state(TunixEinsum("bi,io->bo", (4, 5), rngs=nnx.Rngs(0))),
    TypeError,
    r"delora_jax\.nnx\.wrap",
  ),
  "wrap_twice": (_wrap_twice, ValueError, r"already adapted"),
  "dropout_without_rngs": (_dropout_without_rngs, ValueError, r"^layer/kernel: .*dropout.*rngs"),
}


@pytest.mark.parametrize("name", list(ERRORS), ids=list(ERRORS))
def test_errors(name):
  fn, exc, match = ERRORS[name]
  with pytest.raises(exc, match=match):
    fn()


def test_dropout_with_rngs_is_active_in_train_and_off_in_eval():
  """The positive side of the dropout error: with rngs the branch input is dropped."""
  x = jax.random.normal(jax.random.key(2), (8, 4))
  model = Holder(_linear())
  rules = {"layer/kernel": delora_jax.Rule(2, 3.0, init="random", dropout=0.5)}
  adapted = delora_jax.nnx.wrap(model, rules, rngs=nnx.Rngs(dropout=0))
  merged = delora_jax.nnx.merge(adapted)(x)
  assert rel(adapted(x), merged) > 1e-3
  adapted.eval()
  assert rel(adapted(x), merged) <= REL


def test_save_and_load_adapters_of_an_adapted_nnx_model(tmp_path):
  model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
  rules = {".*kernel": delora_jax.Rule(2, init="random")}
  adapted = delora_jax.nnx.wrap(model, rules, key=jax.random.key(0))
  opt = delora_jax.optimizer(optax.adam, learning_rate=1e-3)
  state = opt.init(nnx.state(adapted, delora_jax.nnx.DeloraParam))
  path = delora_jax.save_adapters(tmp_path / "ckpt", adapted, opt_state=state)
  target = delora_jax.nnx.wrap(model, rules, key=jax.random.key(9))
  x = jax.random.normal(jax.random.key(2), (4, 6))
  before = np.asarray(target(x))
  got, got_state = delora_jax.load_adapters(path, target, opt_state=state)
  np.testing.assert_array_equal(got(x), adapted(x))
  np.testing.assert_array_equal(target(x), before)  # the target model is not modified
  for p, ad in delora_jax.adapters(adapted).items():
    for f, v in ad.items():
      np.testing.assert_array_equal(delora_jax.adapters(got)[p][f], v, err_msg=f"{p}/{f}")
  assert jax.tree.structure(got_state) == jax.tree.structure(state)
  with pytest.raises(ValueError, match=r"layers/0/kernel: rank 2 in the checkpoint, 3 in the target"):
    delora_jax.load_adapters(path, delora_jax.nnx.wrap(model, {".*kernel": 3}))


def test_adapter_dropout_in_nnx_follows_rngs_and_eval():
  model = nnx.Linear(10, 6, rngs=nnx.Rngs(0))
  adapted = delora_jax.nnx.wrap(
    model, {"kernel": delora_jax.Rule(3, init="random", dropout=0.5)}, rngs=nnx.Rngs(dropout=1)
  )
  # One-hot rows: each row's dropped-out branch input is either 0 or 2x (p = 0.5).
  x = jnp.repeat(jnp.eye(10), 20, axis=0) * 1.5
  merged = delora_jax.nnx.merge(adapted)(x)
  y1, y2 = adapted(x), adapted(x)
  d = np.asarray(y1 - model(x))  # the base branch is never dropped
  full = np.asarray(x @ delora_jax.delta(adapted)["kernel"])
  dropped = np.all(np.abs(d) < 1e-5, axis=1)
  kept = np.all(np.abs(d - 2 * full) < 1e-4, axis=1)
  assert np.all(dropped | kept)
  assert 0.3 < dropped.mean() < 0.7
  assert not np.allclose(y1, y2)  # a new key each call
  adapted.eval()  # deterministic: no adapter dropout
  np.testing.assert_allclose(adapted(x), merged, rtol=1e-5, atol=1e-5)
