"""Tied weights: one kernel used by several layers (or one layer called twice) runs with its one adapter.

NNX: a Variable assigned to several modules (``b.kernel = a.kernel``), a submodule reachable by
two paths. Linen: a module called twice, ``nn.share_scope``. Everywhere the adapted output must
equal the merged model's (``w + ΔW`` written once into the shared weight), the adapter is one set
of ``a``, ``b``, ``lam`` (listed once, saved once), and a use that is not a contraction over the
kernel's input axes is merged and reported.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import delora_jax
from delora_jax.nnx import DeloraParam

REL = 1e-5  # float32, matmul precision "highest" (conftest)
V, D = 7, 4  # vocabulary and width of the tied embeddings


def rel(a, b):
  """Norm-based relative error of ``a`` against ``b`` (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def R(**kw):  # noqa: N802 (a Rule with the test defaults)
  return delora_jax.Rule(2, 3.0, init="random", **kw)


# ---------------------------------------------------------------- NNX models


class TwoLinears(nnx.Module):
  """Two Linear layers sharing one kernel Variable."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(D, D, rngs=rngs)
    self.l2 = nnx.Linear(D, D, rngs=rngs)
    self.l2.kernel = self.l1.kernel

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class OuterAndChild(nnx.Module):
  """An adapted layer whose own call runs a child that holds the same kernel."""

  def __init__(self, rngs):
    self.w = nnx.Param(nnx.initializers.normal(0.5)(rngs.params(), (D, D)))
    self.child = nnx.Linear(D, D, rngs=rngs)
    self.child.kernel = self.w

  def __call__(self, x):
    return self.child(jnp.tanh(x @ self.w[...]))


class SharedSubmodule(nnx.Module):
  """One Linear object reachable by two paths."""

  def __init__(self, rngs):
    self.first = nnx.Linear(D, D, rngs=rngs)
    self.second = self.first

  def __call__(self, x):
    return self.second(jnp.tanh(self.first(x)))


class TiedLM(nnx.Module):
  """nnx.Embed's table, also the kernel of a Linear (V -> D) on one-hot inputs, read back by
  ``attend`` and by ``h @ table.T`` in the parent's call (tied unembedding)."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.proj = nnx.Linear(V, D, use_bias=False, rngs=rngs)
    self.proj.kernel = self.embed.embedding

  def __call__(self, tok):
    h = jnp.tanh(self.proj(jax.nn.one_hot(tok, V)) + self.embed(tok))
    return self.embed.attend(h) + h @ self.embed.embedding[...].T


class OneHotProj(TiedLM):
  """TiedLM's tied table used by the Linear only (a contraction over its input axis)."""

  def __call__(self, tok):
    return self.proj(jax.nn.one_hot(tok, V))


class Transposed(nnx.Module):
  def __init__(self, w):
    self.w = w

  def __call__(self, h):
    return h @ self.w[...].T


class TiedAutoencoder(nnx.Module):
  """The decoder contracts the encoder's kernel over its output axis (inside its own call)."""

  def __init__(self, rngs):
    self.enc = nnx.Linear(6, 3, rngs=rngs)
    self.dec = Transposed(self.enc.kernel)

  def __call__(self, x):
    return self.dec(jnp.tanh(self.enc(x)))


_x = jax.random.normal(jax.random.key(2), (3, D))
_tok = jnp.array([[1, 2, 3], [4, 5, 6]])

# id: (model factory, input, rules, the adapted kernel's (state) path, the modules holding it,
#      whether every use is factorised)
CASES = {
  "shared_kernel_two_linears": (TwoLinears, _x, {"l1/kernel": R()}, "l1/kernel", ["l1", "l2"], True),
  "outer_and_child_share_a_kernel": (OuterAndChild, _x, {"child/kernel": R()}, "child/kernel", ["", "child"], True),
  "shared_submodule": (SharedSubmodule, _x, {"first/kernel": R()}, "first/kernel", ["first"], True),
  "tied_embed_linear_contracted_only": (
    OneHotProj,
    _tok,
    {"embed/embedding": R(in_axes=0)},
    "embed/embedding",
    ["embed", "proj"],
    True,
  ),
  "tied_embed_gather_attend_and_transpose": (
    TiedLM,
    _tok,
    {"embed/embedding": R(in_axes=0)},
    "embed/embedding",
    ["embed", "proj"],
    False,
  ),
  "tied_autoencoder_transposed_in_call": (
    TiedAutoencoder,
    jax.random.normal(jax.random.key(2), (3, 6)),
    {"dec/w": R()},  # the state path of a tied Variable is its first path ('dec' < 'enc')
    "dec/w",
    ["dec", "enc"],
    False,
  ),
}


def _module(model, prefix):
  for p in filter(None, prefix.split("/")):
    model = getattr(model, p)
  return model


def setup(name, **wrap_kw):
  make, x, rules, path, owners, factorised = CASES[name]
  model = make(nnx.Rngs(0))
  adapted = delora_jax.nnx.wrap(model, rules, key=jax.random.key(1), **wrap_kw)
  return model, adapted, x, path, owners, factorised


def _quiet(fn, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", delora_jax.FallbackWarning)
    return fn(*args)


# ---------------------------------------------------------------- NNX


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_every_holder_uses_the_one_adapter(name):
  model, adapted, x, path, owners, _ = setup(name)
  # One adapter, listed once under the kernel's state path, held by every module that holds the kernel.
  assert list(delora_jax.adapters(adapted)) == [path]
  assert sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(adapted, DeloraParam))) == [
    f"{path}_delora/{f}" for f in ("a", "b", "lam")
  ]
  kernel = vars(_module(adapted, path.rpartition("/")[0]))[path.rpartition("/")[2]]
  mods = [_module(adapted, p) for p in owners]
  held = [(attr, vars(m)[attr + "_delora"]) for m in mods for attr in vars(m) if vars(m)[attr] is kernel]
  assert len(held) == len(owners) and len({id(ad) for _, ad in held}) == 1
  assert rel(_quiet(adapted, x), model(x)) > 1e-3  # the adapter does something


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_adapted_equals_merged_and_uses_are_reported(name):
  _, adapted, x, path, _, factorised = setup(name)
  merged = delora_jax.nnx.merge(adapted)
  if factorised:
    with warnings.catch_warnings():
      warnings.simplefilter("error", delora_jax.FallbackWarning)
      got = adapted(x)
    assert delora_jax.explain(adapted, x) == {"factorised": [path], "merged": [], "unused": []}
  else:
    with pytest.warns(delora_jax.FallbackWarning, match=path):
      got = adapted(x)
    assert delora_jax.explain(adapted, x) == {"factorised": [], "merged": [path], "unused": []}
  assert rel(got, merged(x)) <= REL
  assert rel(nnx.jit(lambda m, x: _quiet(m, x))(adapted, x), got) <= REL


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_gradients_equal_through_merge(name):
  _, adapted, x, path, _, _ = setup(name)
  diff = nnx.DiffState(0, DeloraParam)
  g = nnx.grad(lambda m, x: jnp.sum(jnp.sin(_quiet(m, x))), argnums=diff)(adapted, x)
  want = nnx.grad(lambda m, x: jnp.sum(jnp.sin(delora_jax.nnx.merge(m)(x))), argnums=diff)(adapted, x)
  g, want = dict(nnx.to_flat_state(g)), dict(nnx.to_flat_state(want))
  assert sorted(g) == sorted(want) and len(g) == 3
  for p in want:
    assert np.linalg.norm(want[p].get_value()) > 0, p
    assert rel(g[p].get_value(), want[p].get_value()) <= REL, p


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_merge_writes_the_shared_kernel_once_and_unwrap_restores_it(name):
  model, adapted, x, path, owners, _ = setup(name)
  prefix, _, attr = path.rpartition("/")
  w = vars(_module(model, prefix))[attr].get_value()
  want = w + delora_jax.delta(adapted)[path]
  for plain, kernel in ((delora_jax.nnx.merge(adapted), want), (delora_jax.nnx.unwrap(adapted), w)):
    assert type(plain) is type(model)
    assert not delora_jax.nnx._nnx.kernels(plain)
    held = {id(v) for m in owners for v in vars(_module(plain, m)).values() if isinstance(v, nnx.Variable)}
    shared = vars(_module(plain, prefix))[attr]
    assert id(shared) in held  # still one Variable, shared by the same modules
    for m in owners:
      assert type(_module(plain, m)) is type(_module(model, m))
      assert not any(k.endswith("_delora") for k in vars(_module(plain, m)))
    np.testing.assert_allclose(shared.get_value(), kernel, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(vars(_module(delora_jax.nnx.unwrap(adapted), prefix))[attr].get_value(), w)


def test_save_and_load_adapters_of_a_tied_model(tmp_path):
  model, adapted, x, path, _, _ = setup("shared_kernel_two_linears")
  saved = delora_jax.save_adapters(tmp_path / "ckpt", adapted)
  target = delora_jax.nnx.wrap(model, CASES["shared_kernel_two_linears"][2], key=jax.random.key(9))
  got = delora_jax.load_adapters(saved, target)
  assert list(delora_jax.adapters(got)) == [path]
  np.testing.assert_array_equal(got(x), adapted(x))
  assert got.l1.kernel_delora is got.l2.kernel_delora and vars(got.l1)["kernel"] is vars(got.l2)["kernel"]


def test_training_moves_one_adapter_used_by_both_layers():
  _, adapted, x, _, _, _ = setup("shared_kernel_two_linears")
  y = jnp.sin(x)
  opt = nnx.Optimizer(adapted, delora_jax.optimizer(optax.adamw, learning_rate=1e-2), wrt=DeloraParam)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, DeloraParam))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(adapted, opt)) for _ in range(20)]
  assert losses[-1] < 0.8 * losses[0]
  assert adapted.l1.kernel_delora is adapted.l2.kernel_delora
  assert rel(adapted(x), delora_jax.nnx.merge(adapted)(x)) <= REL


def test_layout_inference_sees_every_holder():
  model = TwoLinears(nnx.Rngs(0))
  adapted = delora_jax.nnx.wrap(model, {"l1/kernel": delora_jax.Rule(2, init="random")}, like=(_x,))
  assert delora_jax.adapters(adapted)["l1/kernel"]["a"].shape == (D, 2)
  assert rel(adapted(_x), delora_jax.nnx.merge(adapted)(_x)) <= REL
  # The autoencoder contracts its tied kernel over axis 0 (encoder) and axis 1 (decoder).
  with pytest.raises(ValueError, match=r"^dec/w: .*different axes in different places"):
    delora_jax.nnx.wrap(TiedAutoencoder(nnx.Rngs(0)), {"dec/w": 2}, like=(jnp.ones((1, 6)),))


def test_strict_refuses_the_merged_use_of_a_tied_kernel():
  _, adapted, x, _, _, _ = setup("tied_autoencoder_transposed_in_call", strict=True)
  with pytest.raises(TypeError, match=r"^dec/w: .*strict=True forbids"):
    adapted(x)


class InList(nnx.Module):
  def __init__(self, rngs):
    self.layer = nnx.Linear(D, D, rngs=rngs)
    self.z = nnx.data([self.layer.kernel])  # a plain list attribute (sorted after 'layer')

  def __call__(self, x):
    return self.layer(x) @ self.z[0][...]


class InNnxList(InList):
  def __init__(self, rngs):
    self.layer = nnx.Linear(D, D, rngs=rngs)
    self.z = nnx.List([self.layer.kernel])


ERRORS = {
  "held_in_a_plain_list": (InList, r"^layer/kernel: this kernel's Variable is held at 'layer/kernel', 'z/0'"),
  "held_in_an_nnx_list": (InNnxList, r"^layer/kernel: this kernel is held by a List \(at 'z(/0)?'\), which has no"),
}


@pytest.mark.parametrize("name", list(ERRORS), ids=list(ERRORS))
def test_errors(name):
  make, match = ERRORS[name]
  with pytest.raises(TypeError, match=match):
    delora_jax.nnx.wrap(make(nnx.Rngs(0)), {"layer/kernel": 2})


# ---------------------------------------------------------------- Linen


class DenseTwice(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(D)
    return dense(jnp.tanh(dense(x)))


class Wrapper(nn.Module):
  """gemma.peft's pattern: the wrapped layer's params at the wrapper's level (nn.share_scope)."""

  def setup(self):
    self.wrapped = nn.Dense(D)
    nn.share_scope(self, self.wrapped)

  def __call__(self, x):
    return self.wrapped(jnp.tanh(self.wrapped(x)))


class Reader(nn.Module):
  """Reads the kernel of the scope it shares."""

  transpose: bool = False

  def __call__(self, h):
    w = self.get_variable("params", "kernel")
    return h @ (w.T if self.transpose else w)


class SharedScopeTied(nn.Module):
  """A Dense and a reader sharing the parent's scope: the reader uses the Dense's kernel."""

  transpose: bool = False

  def setup(self):
    self.enc = nn.Dense(D)
    nn.share_scope(self, self.enc)
    self.dec = Reader(self.transpose)
    nn.share_scope(self, self.dec)

  def __call__(self, x):
    return self.dec(jnp.tanh(self.enc(x)))


LINEN = {
  "dense_called_twice": (DenseTwice(), "Dense_0/kernel"),
  "share_scope_wrapper_called_twice": (Wrapper(), "kernel"),
  "share_scope_tied_reader": (SharedScopeTied(), "kernel"),
}


@pytest.mark.parametrize("name", list(LINEN), ids=list(LINEN))
def test_linen_reused_kernel_equals_merged(name):
  model, path = LINEN[name]
  params = model.init(jax.random.key(0), _x)["params"]
  tree = delora_jax.wrap(params, {path: R()}, key=jax.random.key(1))
  got = delora_jax.apply(model, {"params": tree}, _x)
  assert rel(got, model.apply({"params": params}, _x)) > 1e-3
  assert rel(got, model.apply({"params": delora_jax.merge(tree)}, _x)) <= REL
  assert delora_jax.explain(model, {"params": tree}, _x) == {"factorised": [path], "merged": [], "unused": []}
  loss = lambda t, merged: jnp.sum(  # noqa: E731
    jnp.sin(model.apply({"params": delora_jax.merge(t)}, _x) if merged else delora_jax.apply(model, {"params": t}, _x))
  )
  g, want = (delora_jax.adapters(jax.grad(loss)(tree, m))[path] for m in (False, True))
  for f in ("a", "b", "lam"):
    assert rel(g[f], want[f]) <= REL, f


def test_linen_shared_scope_transposed_use_is_merged():
  """The Dense contracts the shared kernel over its inputs (factorised), the reader over its
  outputs: that use is merged and reported, as for NNX tied weights; strict=True refuses it."""
  model = SharedScopeTied(transpose=True)
  params = model.init(jax.random.key(0), _x)["params"]
  tree = delora_jax.wrap(params, {"kernel": R()}, key=jax.random.key(1))
  with pytest.raises(ValueError, match=r"^kernel: the model contracts this kernel over its axes \(1,\)"):
    delora_jax.apply(model, {"params": tree}, _x, strict=True)
  assert delora_jax.explain(model, {"params": tree}, _x) == {"factorised": [], "merged": ["kernel"], "unused": []}
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    got = delora_jax.apply(model, {"params": tree}, _x)
  assert [w.category for w in seen] == [delora_jax.FallbackWarning]
  assert rel(got, model.apply({"params": delora_jax.merge(tree)}, _x)) <= REL
