"""PEFT's own DeLoRA test cases, ported: any DeloraConfig in and out, against real peft.

The torch side is PEFT's ``MLP`` of ``tests/test_custom_models.py`` (lin0 10->20, lin1
20->2). Each row is a DeloraConfig; PEFT adapts and saves the model, ``peft.load``
builds the JAX tree from plain params and the folder alone, and the two must agree on
outputs, gradients (adapters and trained extras), merge, three AdamW steps, and the
folder ``peft.export`` writes back must reproduce JAX's outputs in PEFT.
"""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file  # noqa: E402

import delora_jax  # noqa: E402
from tests.helpers import assert_trees_equal, rel

RTOL = 1e-5  # float32 (same tolerance as tests/test_peft_parity.py)
NAMES = lambda path: path.split("/")[0] if path.endswith("/kernel") else None  # noqa: E731


class TorchMLP(torch.nn.Module):  # PEFT's tests/test_custom_models.py MLP
  def __init__(self, head=False):
    super().__init__()
    self.lin0, self.lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)
    self.head = torch.nn.Linear(2, 3) if head else None

  def forward(self, x):
    y = torch.log_softmax(self.lin1(torch.relu(self.lin0(x.to(self.lin0.weight.dtype)))), -1)
    return self.head(y) if self.head is not None else y


class FlaxMLP(nn.Module):
  head: bool = False
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, name=name, dtype=self.dtype, param_dtype=self.dtype)  # noqa: E731
    h = dense(2, "lin1")(jax.nn.relu(dense(20, "lin0")(x.astype(self.dtype))))
    # torch's log_softmax on a bf16/fp16 input computes in float32 and rounds once: do the same.
    y = jax.nn.log_softmax(h.astype(jnp.float32), -1).astype(h.dtype)
    return dense(3, "head")(y) if self.head else y


def _jnp(t):
  return jnp.asarray(t.detach().float().numpy()).astype(str(t.dtype).removeprefix("torch."))


def params_of(model):
  """Flax params of a (not yet adapted) torch MLP: kernel = weight.T, in the model's dtype."""
  return {
    name: {"kernel": _jnp(mod.weight).T, "bias": _jnp(mod.bias)}
    for name, mod in model.named_children()
    if isinstance(mod, torch.nn.Linear)
  }


def data(seed, n=3):
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((8, 10), np.float32), rng.standard_normal((8, 3), np.float32)) for _ in range(n)]


def torch_loss(model, x, y):
  out = model(torch.from_numpy(x)).float()
  return torch.mean((out - torch.from_numpy(y[:, : out.shape[-1]])) ** 2)


# id: (DeloraConfig kwargs, torch model has a head, extra_trainable in JAX, adapted modules)
ROWS = {
  "regex": (dict(target_modules="lin0"), False, None, {"lin0"}),
  "list": (dict(target_modules=["lin0"]), False, None, {"lin0"}),
  "list_lin1_rank_above_min": (dict(target_modules=["lin1"]), False, None, {"lin1"}),
  "both": (dict(target_modules=["lin0", "lin1"]), False, None, {"lin0", "lin1"}),
  "dropout": (dict(target_modules=["lin0"], module_dropout=0.1), False, None, {"lin0"}),
  "all_linear": (dict(target_modules="all-linear"), False, None, {"lin0", "lin1"}),
  "exclude": (dict(target_modules="all-linear", exclude_modules=["lin1"]), False, None, {"lin0"}),
  "patterns": (
    dict(target_modules=["lin0", "lin1"], r=4, rank_pattern={"lin1": 2}, delora_lambda=5, lambda_pattern={"lin0": 3.0}),
    False,
    None,
    {"lin0", "lin1"},
  ),
  "bias_all": (dict(target_modules=["lin0"], bias="all"), False, ".*bias", {"lin0"}),
  "bias_delora_only": (dict(target_modules=["lin0"], bias="delora_only"), False, "lin0/bias", {"lin0"}),
  "modules_to_save": (
    dict(target_modules=["lin0", "lin1"], modules_to_save=["head"]),
    True,
    "head/.*",
    {"lin0", "lin1"},
  ),
}


def peft_model(kw, head, seed=0, init_weights=False, dtype=torch.float32):
  """``(PEFT model, a copy of its base, the base's Flax params)``."""
  torch.manual_seed(seed)
  base = TorchMLP(head=head).to(dtype)
  copy, params = TorchMLP(head=head).to(dtype), params_of(base)
  copy.load_state_dict(base.state_dict())
  return peft.get_peft_model(base, peft.DeloraConfig(init_weights=init_weights, **kw)).eval(), copy, params


def peft_grads(model):
  out = {}
  for name, p in model.named_parameters():
    if p.requires_grad:
      out[name] = p.grad.detach().float().numpy().copy()
  return out


def jax_grads_as_torch(grads, frozen):
  """JAX gradients named like PEFT's parameters (torch orientation)."""
  tree = delora_jax.combine(grads, frozen)
  out = {}
  for path, ad in delora_jax.adapters(tree).items():
    m = path.split("/")[0]
    pre = f"base_model.model.{m}."
    out[pre + "delora_A.default"] = np.asarray(ad["a"]).T
    out[pre + "delora_B.default"] = np.asarray(ad["b"]).T
    out[pre + "delora_lambda.default"] = np.asarray(ad["lam"]).reshape(1)
  paths, leaves, _ = delora_jax._tree.flatten(grads)
  adapted = {p.split("/")[0] for p in delora_jax.adapters(tree)}
  for p, g in zip(paths, leaves):
    if g is None or isinstance(g, delora_jax.DeloraKernel):
      continue
    m, leaf = p.split("/")
    torch_leaf = "weight" if leaf == "kernel" else "bias"
    mid = ".base_layer" if m in adapted else (".modules_to_save.default" if m == "head" else "")
    g = np.asarray(g)
    out[f"base_model.model.{m}{mid}.{torch_leaf}"] = g.T if leaf == "kernel" else g
  return out


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_peft_config_rows(tmp_path, row):
  kw, head, extra, adapted = ROWS[row]
  pm, base, params = peft_model(kw, head)
  pm.save_pretrained(tmp_path / "p")
  model = FlaxMLP(head=head)

  # rules() from the config object agree with what PEFT adapted, and load needs only the folder.
  rules = delora_jax.peft.rules(pm.peft_config["default"], params, module_names=NAMES)
  assert {p.split("/")[0] for p in rules} == adapted
  for form in (tmp_path / "p" / "adapter_config.json", pm.peft_config["default"].to_dict()):
    assert delora_jax.peft.rules(form, params, module_names=NAMES) == rules
  want_extra = sorted(
    {
      n.removeprefix("base_model.model.").split(".")[0] + "/" + n.rpartition(".")[2]
      for n, t in pm.named_parameters()
      if t.requires_grad and "delora" not in n
    }
  )
  want_extra = [p.replace("/weight", "/kernel") for p in want_extra]
  assert delora_jax.peft.trainable(tmp_path / "p", params, module_names=NAMES) == sorted(want_extra)
  assert adapted == {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "delora_A")}
  tree = delora_jax.peft.load(tmp_path / "p", params, module_names=NAMES)
  for k in delora_jax._tree.kernels(tree).values():
    assert k.dropout == kw.get("module_dropout", 0.0)

  (x, y), *rest = data(1)
  with torch.no_grad():
    want = pm(torch.from_numpy(x)).numpy()
  assert rel(delora_jax.apply(model, {"params": tree}, x, strict=True), want) < RTOL
  assert rel(model.apply({"params": delora_jax.merge(tree)}, x), want) < RTOL

  # Gradients of everything PEFT trains (adapters, biases, modules_to_save).
  torch_loss(pm, x, y).backward()
  want_g = peft_grads(pm)
  trainable, frozen = delora_jax.split(tree, extra_trainable=extra)

  def loss(t, x, y):
    out = delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x, strict=True)
    return jnp.mean((out - y[:, : out.shape[-1]]) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  got_g = jax_grads_as_torch(value_and_grad(trainable, x, y)[1], frozen)
  assert sorted(got_g) == sorted(want_g)
  for name, w in want_g.items():
    assert rel(got_g[name], w) < RTOL, (name, rel(got_g[name], w))

  # Three AdamW steps on both sides (λ decayed as torch does, for parity).
  pm.zero_grad()
  topt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
  opt = delora_jax.optimizer(optax.adamw, learning_rate=1e-2, weight_decay=0.01, decay_lam=True, extra_trainable=extra)
  state = opt.init(trainable)
  for xs, ys in data(2):
    l, g = value_and_grad(trainable, xs, ys)
    upd, state = opt.update(g, state, trainable)
    trainable = optax.apply_updates(trainable, upd)
    topt.zero_grad()
    tl = torch_loss(pm, xs, ys)
    tl.backward()
    topt.step()
    np.testing.assert_allclose(float(l), float(tl.detach()), rtol=RTOL)
  tree = delora_jax.combine(trainable, frozen)
  with torch.no_grad():
    want = pm(torch.from_numpy(x)).numpy()
  assert rel(delora_jax.apply(model, {"params": tree}, x), want) < 1e-4

  # Back to PEFT: the trained adapters and extras, from the folder alone.
  out = delora_jax.peft.export(tree, tmp_path / "j", module_names=NAMES, extra_trainable=extra)
  cfg = json.loads(pathlib.Path(out, "adapter_config.json").read_text())
  assert cfg["bias"] == kw.get("bias", "none") and cfg["modules_to_save"] == kw.get("modules_to_save")
  back = peft.PeftModel.from_pretrained(base, out).eval()
  with torch.no_grad():
    got = back(torch.from_numpy(x)).numpy()
  assert rel(got, delora_jax.apply(model, {"params": tree}, x)) < RTOL
  again = delora_jax.peft.load(out, params, module_names=NAMES)
  assert_trees_equal(again, tree)


def test_default_init_and_multiple_adapters(tmp_path):
  """init_weights=True (b = 0: model unchanged) and PEFT's 'DeLoRA Different' two adapters."""
  torch.manual_seed(0)
  base = TorchMLP()
  params = params_of(base)
  pm = peft.get_peft_model(base, peft.DeloraConfig(target_modules=["lin0"], init_weights=False))
  pm.add_adapter("other", peft.DeloraConfig(target_modules=["lin1"], init_weights=False))
  pm.add_adapter("zero", peft.DeloraConfig(target_modules=["lin0", "lin1"]))
  pm.eval().save_pretrained(tmp_path / "multi")
  x = data(3)[0][0]
  for name, folder in (
    ("default", tmp_path / "multi"),
    ("other", tmp_path / "multi" / "other"),
    ("zero", tmp_path / "multi" / "zero"),
  ):
    pm.set_adapter(name)
    with torch.no_grad():
      want = pm(torch.from_numpy(x)).numpy()
    tree = delora_jax.peft.load(folder, params, module_names=NAMES)
    assert rel(delora_jax.apply(FlaxMLP(), {"params": tree}, x), want) < RTOL
  plain = FlaxMLP().apply({"params": params}, x)
  np.testing.assert_array_equal(np.asarray(delora_jax.apply(FlaxMLP(), {"params": tree}, x)), plain)
  fresh = delora_jax.wrap(
    params, delora_jax.peft.rules({"target_modules": ["lin0", "lin1"]}, params, module_names=NAMES)
  )
  assert {k.rank for k in delora_jax._tree.kernels(fresh).values()} == {8}  # r=8 > min(20, 2) for lin1


def test_default_targets_need_model_type():
  params = {"encoder": {"query": {"kernel": jnp.ones((4, 4))}, "key": {"kernel": jnp.ones((4, 4))}}}
  names = lambda p: p.replace("/kernel", "").replace("/", ".")  # noqa: E731
  got = delora_jax.peft.rules({"r": 2}, params, module_names=names, model_type="bert")
  assert list(got) == ["encoder/query/kernel"]
  with pytest.raises(ValueError, match="target_modules` is null.*pass model_type="):
    delora_jax.peft.rules({"r": 2}, params, module_names=names)


# ---- low-precision bases ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_bases(tmp_path, dtype):
  tdtype = getattr(torch, dtype)
  pm, _, params = peft_model(dict(target_modules=["lin0", "lin1"]), False, dtype=tdtype)
  pm.save_pretrained(tmp_path / "p")
  # A PEFT adapter saved from this base loads onto the very same base (norm rounded to dtype).
  tree = delora_jax.peft.load(tmp_path / "p", params, module_names=NAMES)
  x = data(4)[0][0]
  with torch.no_grad():
    want = pm(torch.from_numpy(x)).float().numpy()
  eps = float(jnp.finfo(dtype).eps)
  got = delora_jax.apply(FlaxMLP(dtype=dtype), {"params": tree}, x)
  assert got.dtype == jnp.dtype(dtype)
  assert rel(got, want) < 4 * eps  # a few roundings of the dtype
  # norm="base" gives PEFT's w_norm bit for bit; the float32 default differs by ~eps/2.
  rules = delora_jax.peft.rules(tmp_path / "p", params, module_names=NAMES, norm="base")
  ours = delora_jax.adapters(delora_jax.wrap(params, rules))
  rules32 = delora_jax.peft.rules(tmp_path / "p", params, module_names=NAMES)
  ours32 = delora_jax.adapters(delora_jax.wrap(params, rules32))
  for p, ad in delora_jax.adapters(tree).items():
    np.testing.assert_array_equal(np.asarray(ours[p]["w_norm"]), np.asarray(ad["w_norm"]))
    diff = rel(ours32[p]["w_norm"], ad["w_norm"])
    assert 0 < diff < eps, diff
  # Our own low-precision adapters (either norm) round-trip through a folder onto the same base.
  for t in (delora_jax.wrap(params, rules), delora_jax.wrap(params, rules32)):
    out = delora_jax.peft.export(t, tmp_path / f"own{id(t)}", module_names=NAMES)
    back = delora_jax.peft.load(out, params, module_names=NAMES)
    for p, ad in delora_jax.adapters(t).items():
      np.testing.assert_array_equal(np.asarray(delora_jax.adapters(back)[p]["w_norm"]), np.asarray(ad["w_norm"]))
  other = jax.tree.map(lambda w: w * 1.1, params)
  with pytest.raises(ValueError, match="base kernel differs"):
    delora_jax.peft.load(tmp_path / "p", other, module_names=NAMES)
  # merge: ΔW cast to the base dtype and added, as PEFT's merge does: bit for bit.
  merged = delora_jax.merge(tree)
  pm.merge_adapter()
  for n in ("lin0", "lin1"):
    w = pm.base_model.model.get_submodule(n).base_layer.weight.detach().float().numpy().T
    assert merged[n]["kernel"].dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(merged[n]["kernel"].astype(jnp.float32)), w)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_gradients_as_accurate_as_peft(tmp_path, dtype):
  """On a bf16/fp16 model with float32 adapters, the gradients of a, b and λ are as close to a
  float32 reference (PEFT on the same weights in float32) as PEFT's own.

  One gradient's rounding error is noise (on a given seed either side can be 3-10x the other,
  e.g. one λ gradient at 6e-2 against PEFT's 3e-3), so the comparison is over 4 seeds and every
  trained leaf: the mean of our relative errors must be within 1.5x the mean of PEFT's. The
  model mirrors torch's rounding where the two frameworks differ outside DeLoRA (log_softmax).
  """
  ours, theirs = [], []
  for seed in range(4):
    folder = tmp_path / str(seed)
    pm, base, params = peft_model(dict(target_modules=["lin0", "lin1"]), False, seed=seed, dtype=getattr(torch, dtype))
    pm.save_pretrained(folder)
    ref = peft.PeftModel.from_pretrained(base.float(), folder, is_trainable=True).eval()
    x, y = data(4)[0]
    torch_loss(pm, x, y).backward()
    torch_loss(ref, x, y).backward()
    want, exact = peft_grads(pm), peft_grads(ref)
    tree = delora_jax.peft.load(folder, params, module_names=NAMES)
    trainable, frozen = delora_jax.split(tree)

    def loss(t, frozen=frozen, x=x, y=y):
      out = delora_jax.apply(FlaxMLP(dtype=dtype), {"params": delora_jax.combine(t, frozen)}, x)
      return jnp.mean((out.astype(jnp.float32) - y[:, :2]) ** 2)

    got = jax_grads_as_torch(jax.grad(loss)(trainable), frozen)
    assert set(got) >= set(want)
    ours += [rel(got[k], exact[k]) for k in want]
    theirs += [rel(want[k], exact[k]) for k in want]
  assert np.mean(ours) <= 1.5 * np.mean(theirs), (np.mean(ours), np.mean(theirs))


# ---- scanned models: some slices adapted -----------------------------------------------


class TorchStack(torch.nn.Module):
  def __init__(self, w):
    super().__init__()
    self.layers = torch.nn.ModuleList()
    for wi in w:
      block = torch.nn.Module()
      block.proj = torch.nn.Linear(w.shape[1], w.shape[2], bias=False)
      with torch.no_grad():
        block.proj.weight.copy_(torch.from_numpy(np.asarray(wi).T.copy()))
      self.layers.append(block)

  def forward(self, x):
    return torch.stack([blk.proj(x) for blk in self.layers])


class Proj(nn.Module):
  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.zeros, (3, 12, 8))
    return jnp.einsum("bi,lio->lbo", x, k)


class _Layers(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Proj(name="proj")(x)


class FlaxStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _Layers(name="layers")(x)


STACK_NAMES = {"layers/proj/kernel": "layers.{}.proj"}


def test_scanned_kernel_with_some_layers_adapted(tmp_path):
  w = np.asarray(jax.random.normal(jax.random.key(0), (3, 12, 8)))
  torch.manual_seed(0)
  pm = peft.get_peft_model(
    TorchStack(w),
    peft.DeloraConfig(
      target_modules=["proj"], layers_to_transform=[0, 2], layers_pattern="layers", r=2, init_weights=False
    ),
  ).eval()
  pm.save_pretrained(tmp_path / "p")
  params = {"layers": {"proj": {"kernel": jnp.asarray(w)}}}
  rules = delora_jax.peft.rules(tmp_path / "p", params, module_names=STACK_NAMES)
  assert rules == {"layers/proj/kernel": delora_jax.Rule(2, init="random", stack_axes=1, slices=(0, 2))}
  tree = delora_jax.peft.load(tmp_path / "p", params, module_names=STACK_NAMES)
  rng = np.random.default_rng(5)
  x, y = rng.standard_normal((6, 12), np.float32), rng.standard_normal((6, 8), np.float32)
  with torch.no_grad():
    want = pm(torch.from_numpy(x)).numpy()
  assert rel(delora_jax.apply(FlaxStack(), {"params": tree}, x, strict=True), want) < RTOL
  merged = np.asarray(delora_jax.merge(tree)["layers"]["proj"]["kernel"])
  np.testing.assert_array_equal(merged[1], w[1])  # the layer PEFT leaves alone: bit for bit

  def loss(t, frozen):
    out = delora_jax.apply(FlaxStack(), {"params": delora_jax.combine(t, frozen)}, x, strict=True)
    return jnp.mean((out - y[None]) ** 2)

  trainable, frozen = delora_jax.split(tree)
  torch.mean((pm(torch.from_numpy(x)) - torch.from_numpy(y[None])) ** 2).backward()
  grad = jax.jit(jax.grad(loss))
  g = grad(trainable, frozen)["layers"]["proj"]["kernel"]
  for i, grad_a in ((0, g.a[0]), (2, g.a[2])):
    want_a = pm.base_model.model.layers[i].proj.delora_A["default"].grad.numpy().T
    assert rel(grad_a, want_a) < RTOL
  assert not np.any(np.asarray(g.a[1])) and not np.any(np.asarray(g.b[1])) and float(g.lam[1]) == 0.0
  opt = delora_jax.optimizer(optax.adamw, learning_rate=1e-2, weight_decay=0.1)
  state = opt.init(trainable)
  for _ in range(3):
    upd, state = opt.update(grad(trainable, frozen), state, trainable)
    trainable = optax.apply_updates(trainable, upd)
  tree = delora_jax.combine(trainable, frozen)
  np.testing.assert_array_equal(np.asarray(delora_jax.merge(tree)["layers"]["proj"]["kernel"])[1], w[1])
  out = delora_jax.peft.export(tree, tmp_path / "j", module_names=STACK_NAMES)
  assert sorted({k.split(".")[3] for k in load_file(f"{out}/adapter_model.safetensors")}) == ["0", "2"]
  back = peft.PeftModel.from_pretrained(TorchStack(w), out).eval()
  with torch.no_grad():
    got = back(torch.from_numpy(x)).numpy()
  assert rel(got, delora_jax.apply(FlaxStack(), {"params": tree}, x)) < RTOL
  made = delora_jax.wrap(params, rules)  # wrap with the Rule directly: slice 1 is all zeros
  assert not np.any(np.asarray(made["layers"]["proj"]["kernel"].w_norm[1]))


# ---- bad input --------------------------------------------------------------------------


def _folder(tmp_path, config=None, tensors=None):
  pm, _, params = peft_model(dict(target_modules=["lin0"]), False)
  src = tmp_path / "src"
  pm.save_pretrained(src)
  cfg = json.loads((src / "adapter_config.json").read_text())
  ts = load_file(src / "adapter_model.safetensors")
  if config:
    config(cfg)
  if tensors:
    tensors(ts)
  dst = tmp_path / "bad"
  dst.mkdir()
  (dst / "adapter_config.json").write_text(json.dumps(cfg))
  save_file(ts, dst / "adapter_model.safetensors")
  return dst, params


BAD = {
  "rank_pattern_list": (
    dict(config=lambda c: c.update(rank_pattern=["lin0", 2])),
    r"adapter_config.json: `rank_pattern` must be an object .* Write e.g.",
  ),
  "bad_regex": (
    dict(config=lambda c: c.update(target_modules="lin(0")),
    r"adapter_config.json: `target_modules` holds 'lin\(0', which is not a valid regular",
  ),
  "bad_pattern_regex": (
    dict(config=lambda c: c.update(rank_pattern={"lin[": 2})),
    r"adapter_config.json: `rank_pattern\['lin\['\]` holds",
  ),
  "r_word": (
    dict(config=lambda c: c.update(r="two")),
    r"adapter_config.json: `r` must be a positive integer; got 'two'",
  ),
  "r_zero": (dict(config=lambda c: c.update(r=0)), r"`r` must be a positive integer; got 0"),
  "lambda_nan": (dict(config=lambda c: c.update(delora_lambda=float("nan"))), r"`delora_lambda` must be a finite"),
  "dropout": (dict(config=lambda c: c.update(module_dropout=1.5)), r"`module_dropout` must be a probability"),
  "bias": (dict(config=lambda c: c.update(bias="lora_only")), r"`bias` must be one of"),
  "init": (dict(config=lambda c: c.update(init_weights="pissa")), r"`init_weights` must be true or false"),
  "layers": (dict(config=lambda c: c.update(layers_to_transform="0")), r"`layers_to_transform` must be"),
  "layers_with_regex": (
    dict(config=lambda c: c.update(target_modules="lin0", layers_to_transform=[0])),
    "cannot be used with a regex",
  ),
  "pattern_without_layers": (dict(config=lambda c: c.update(layers_pattern="layers")), "`layers_pattern` is set"),
  "unknown_key": (
    dict(config=lambda c: c.update(use_dora=True, fan_in_fan_out=False)),
    r"keys delora_jax does not support: \['fan_in_fan_out', 'use_dora'\].*whether ignoring",
  ),
  "tensor_shape": (
    dict(tensors=lambda t: t.update({"base_model.model.lin0.delora_A": np.ones((8, 3), np.float32)})),
    r"lin0.delora_A: shape \(8, 3\) in the file",
  ),
  "rank_vs_config": (
    dict(config=lambda c: c.update(r=4)),
    r"lin0: rank 4 in adapter_config.json \(`r` or its rank_pattern entry\), but delora_A \(8, 10\), delora_B",
  ),
  "head_not_in_tree": (
    dict(tensors=lambda t: t.update({"base_model.model.head.weight": np.ones((3, 2), np.float32)})),
    r"base_model.model.head.weight: no leaf of the target tree maps",
  ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_folders_are_refused_and_nothing_loads(tmp_path, case):
  kw, msg = BAD[case]
  folder, params = _folder(tmp_path, **kw)
  before = jax.tree.map(np.asarray, params)
  with pytest.raises(ValueError, match=msg):
    delora_jax.peft.load(folder, params, module_names=NAMES)
  assert_trees_equal(params, before)
  cfg = json.loads((folder / "adapter_config.json").read_text())
  if "tensors" not in kw and case != "rank_vs_config":  # rules() gives the same verdict
    with pytest.raises(ValueError, match=msg):
      delora_jax.peft.rules(folder, params, module_names=NAMES)
  assert json.loads((folder / "adapter_config.json").read_text()) == cfg


def test_rules_bad_arguments():
  params = {"lin0": {"kernel": jnp.ones((10, 20))}}
  with pytest.raises(TypeError, match="`config` must be a PEFT adapter folder"):
    delora_jax.peft.rules(3, params, module_names=NAMES)
  with pytest.raises(ValueError, match="does not exist"):
    delora_jax.peft.rules("/nonexistent/folder", params, module_names=NAMES)
  with pytest.raises(ValueError, match="selects none of the torch modules"):
    delora_jax.peft.rules({"target_modules": ["q"]}, params, module_names=NAMES)
  with pytest.raises(ValueError, match="peft_type 'LORA'"):
    delora_jax.peft.rules({"peft_type": "LORA"}, params, module_names=NAMES)
  stacked = {"l": {"kernel": jnp.ones((2, 4, 4))}}
  with pytest.raises(ValueError, match="different ranks"):
    delora_jax.peft.rules(
      {"target_modules": ["l"], "rank_pattern": {"x.1.l": 2}, "r": 3},
      stacked,
      module_names={"l/kernel": ["x.0.l", "x.1.l"]},
    )
  tree = delora_jax.wrap({"h": {"kernel": jnp.ones((4, 4)), "w": jnp.ones(4)}}, {"h/kernel": 2})
  with pytest.raises(ValueError, match="h/w: this extra_trainable leaf cannot be written"):
    delora_jax.peft.export(tree, "/tmp/never", module_names=NAMES, extra_trainable="h/w")
  with pytest.raises(ValueError, match="matches no plain leaf"):
    delora_jax.peft.export(tree, "/tmp/never", module_names=NAMES, extra_trainable="nothing")


def test_rule_slices_and_norm_errors():
  with pytest.raises(ValueError, match="stack_axes=0"):
    delora_jax.Rule(2, slices=(0,))
  with pytest.raises(TypeError, match="`slices` must be None or a sequence"):
    delora_jax.Rule(2, stack_axes=1, slices="0")
  with pytest.raises(ValueError, match="at least one slice"):
    delora_jax.Rule(2, stack_axes=1, slices=())
  with pytest.raises(ValueError, match="`norm` must be one of"):
    delora_jax.Rule(2, norm="bf16")
  with pytest.raises(ValueError, match=r"l/kernel: Rule slices \(0, 5\) name slice 5.*has 3 stacked"):
    delora_jax.wrap(
      {"l": {"kernel": jnp.ones((3, 4, 4))}}, {"l/kernel": delora_jax.Rule(2, stack_axes=1, slices=(0, 5))}
    )


def test_from_peft_doc_runs():
  """Every ```python block of docs/from_peft.md runs, in order, in one namespace."""
  import re  # noqa: PLC0415

  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "from_peft.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) == 4
  ns = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/from_peft.md[block {i}]", "exec"), ns)  # noqa: S102


def test_load_takes_the_folders_module_dropout(tmp_path):
  pm, _, params = peft_model(dict(target_modules=["lin0"], module_dropout=0.25), False)
  pm.save_pretrained(tmp_path / "p")
  target = delora_jax.wrap(params, {"lin0/kernel": delora_jax.Rule(8, init="random", dropout=0.0)})
  loaded = delora_jax.peft.load(tmp_path / "p", target, module_names=NAMES)
  assert loaded["lin0"]["kernel"].dropout == 0.25 and target["lin0"]["kernel"].dropout == 0.0
  out = delora_jax.peft.export(loaded, tmp_path / "j", module_names=NAMES)
  assert json.loads(pathlib.Path(out, "adapter_config.json").read_text())["module_dropout"] == 0.25


def _json_folder(tmp_path, text):
  (tmp_path / "adapter_config.json").write_text(text)
  return tmp_path


MORE_BAD = {
  "unreadable_json": (lambda t: _json_folder(t, "{nope"), NAMES, ValueError, r"adapter_config.json' is unreadable"),
  "json_list": (lambda t: _json_folder(t, "[1, 2]"), NAMES, ValueError, "holds a list, expected a JSON object"),
  "targets_type": (
    lambda t: {"target_modules": 3},
    NAMES,
    ValueError,
    "`target_modules` must be null, a regex string or a list",
  ),
  "modules_to_save_str": (
    lambda t: {"target_modules": ["lin0"], "modules_to_save": "head"},
    NAMES,
    ValueError,
    "`modules_to_save` must be null or a list",
  ),
  "rank_value": (
    lambda t: {"target_modules": ["lin0"], "rank_pattern": {"lin0": "x"}},
    NAMES,
    ValueError,
    r"`rank_pattern\['lin0'\]` must be a positive integer; got 'x'",
  ),
  "names_type": (lambda t: {"target_modules": ["lin0"]}, 3, TypeError, "`module_names` must be a callable"),
  "names_value": (lambda t: {"target_modules": ["lin0"]}, lambda p: 3, TypeError, "must give a str or a sequence"),
  "names_count": (
    lambda t: {"target_modules": ["lin0"]},
    lambda p: ["a", "b", "c"],
    ValueError,
    "gave 3 names, but no leading axes",
  ),
}


@pytest.mark.parametrize("case", list(MORE_BAD), ids=list(MORE_BAD))
def test_more_bad_configs(tmp_path, case):
  make, names, exc, msg = MORE_BAD[case]
  params = {"lin0": {"kernel": jnp.ones((10, 20)), "bias": jnp.zeros(20)}}
  with pytest.raises(exc, match=msg):
    delora_jax.peft.rules(make(tmp_path), params, module_names=names)


def test_more_bad_exports_and_loads(tmp_path):
  tree = delora_jax.wrap(
    {
      "lin0": {"kernel": jnp.ones((10, 20)), "scale": jnp.ones(20)},
      "stk": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.zeros((2, 4))},
    },
    {"lin0/kernel": 2, "stk/kernel": delora_jax.Rule(2, stack_axes=1)},
  )
  names = {"lin0/kernel": "lin0", "stk/kernel": "stk.{}"}
  with pytest.raises(ValueError, match="lin0/scale: PEFT cannot save a trained non-bias leaf of an adapted"):
    delora_jax.peft.export(tree, tmp_path / "a", module_names=names, extra_trainable="lin0/scale")
  with pytest.raises(ValueError, match="stk/bias: .* is stacked"):
    delora_jax.peft.export(tree, tmp_path / "b", module_names=names, extra_trainable="stk/bias")
  with pytest.raises(ValueError, match="`module_names` gives no torch module for 'x/kernel'"):
    delora_jax.peft.export(
      {**tree, "x": {"bias": jnp.zeros(3)}}, tmp_path / "c", module_names=names, extra_trainable="x/bias"
    )
  # A head tensor of the wrong shape, and a null target_modules without model_type, on load.
  pm, _, params = peft_model(dict(target_modules=["lin0"], modules_to_save=["head"]), True)
  pm.save_pretrained(tmp_path / "p")
  small = {**params, "head": {"kernel": jnp.ones((2, 4)), "bias": jnp.zeros(4)}}
  with pytest.raises(ValueError, match=r"head.weight: shape \(3, 2\) in the file, the tree's head/kernel needs"):
    delora_jax.peft.load(tmp_path / "p", small, module_names=NAMES)
  cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
  (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": None}))
  target = delora_jax.wrap(params, {"lin0/kernel": delora_jax.Rule(8, init="random")})
  with pytest.raises(ValueError, match="target_modules` is null.*model_type"):
    delora_jax.peft.load(tmp_path / "p", target, module_names=NAMES)
  (tmp_path / "p" / "adapter_config.json").write_text("[]")
  with pytest.raises(ValueError, match="peft.load: .*adapter_config.json' holds a list, expected a JSON object"):
    delora_jax.peft.load(tmp_path / "p", params, module_names=NAMES)


def test_rank_above_min_keeps_the_bound():
  """PEFT's r=8 on a 20 -> 2 layer: the update has rank 2 and ||diag(1/w_norm) ΔW||_F <= |λ|."""
  w = jax.random.normal(jax.random.key(3), (20, 2))
  tree = delora_jax.wrap({"lin1": {"kernel": w}}, {"lin1/kernel": delora_jax.Rule(8, lam=4.0, init="random")})
  k = tree["lin1"]["kernel"]
  assert k.a.shape == (20, 8) and k.b.shape == (8, 2)
  d = np.asarray(delora_jax.delta(tree)["lin1/kernel"], np.float64)
  assert np.linalg.matrix_rank(d) == 2
  bound = np.linalg.norm(d / np.asarray(k.w_norm, np.float64)[:, None])
  assert bound <= 4.0 * (1 + 1e-6)
  assert float(delora_jax.diagnostics(tree)["summary"]["bound_use"]["max"]) <= 1 + 1e-6
