"""PEFT adapter folders both ways (real peft on CPU), LoRA export, to_lora, name mappings."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file

import delora_jax
from tests import torch_mlp as tm
from tests.helpers import assert_trees_equal, rel

RTOL = 1e-5
NAMES = {f"{n}/kernel": n for n in tm.NAMES}
RULES = {
  "lin1/kernel": delora_jax.Rule(2, lam=7.0, init="random"),
  "lin[02]/kernel": delora_jax.Rule(4, lam=3.0, init="random"),
}


def torch_base(seed=0):
  torch.manual_seed(seed)
  return tm.TorchMLP()


def jax_tree(seed=0, rules=RULES, key=1):
  """A 'trained' tree: random a, b and a different λ per module."""
  tree = delora_jax.wrap(tm.base_params(torch_base(seed)), rules, key=jax.random.key(key))
  ads = delora_jax.adapters(tree)
  for i, p in enumerate(sorted(ads)):
    ads[p]["lam"] = ads[p]["lam"] * 1.25 + i
  return delora_jax.with_adapters(tree, ads)


def jax_out(tree, x):
  return np.asarray(delora_jax.apply(tm.FlaxMLP(), {"params": tree}, x))


def torch_out(model, x):
  with torch.no_grad():
    return tm.t2n(model(torch.from_numpy(x)))


def x_batch(seed=0):
  return np.random.default_rng(seed).standard_normal((5, tm.SIZES[0]), np.float32)


def assert_adapters_equal(got, want):
  ga, wa = delora_jax.adapters(got), delora_jax.adapters(want)
  assert set(ga) == set(wa)
  for p in wa:
    for f in ("a", "b", "lam", "w_norm"):
      assert ga[p][f].dtype == wa[p][f].dtype
      np.testing.assert_array_equal(np.asarray(ga[p][f]), np.asarray(wa[p][f]), err_msg=f"{p}.{f}")


def test_jax_to_peft_outputs_and_files_match_peft(tmp_path):
  tree = jax_tree()
  out = delora_jax.peft.export(tree, tmp_path / "a", module_names=NAMES, rules=RULES)
  cfg = json.loads(pathlib.Path(out, "adapter_config.json").read_text())
  assert cfg["peft_type"] == "DELORA" and cfg["r"] == 4 and cfg["delora_lambda"] == 3.0
  assert cfg["rank_pattern"] == {"^lin1": 2} and cfg["lambda_pattern"] == {"^lin1": 7.0}
  assert cfg["target_modules"] == ["lin0", "lin1", "lin2"] and cfg["module_dropout"] == 0.0

  model = peft.PeftModel.from_pretrained(torch_base(), out)
  x = x_batch()
  assert rel(jax_out(tree, x), torch_out(model, x)) < RTOL
  lin1 = model.base_model.model.lin1
  assert float(lin1.delora_lambda["default"]) == float(tree["lin1"]["kernel"].lam)  # trained λ

  model.save_pretrained(tmp_path / "resaved")  # PEFT's own writer: same keys, same tensors
  ours = load_file(f"{out}/adapter_model.safetensors")
  theirs = load_file(tmp_path / "resaved/adapter_model.safetensors")
  assert sorted(ours) == sorted(theirs)
  for k in ours:
    assert ours[k].dtype == np.float32 and ours[k].shape == theirs[k].shape
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  back = delora_jax.peft.load(tmp_path / "resaved", jax_tree(key=9), module_names=NAMES)
  assert_adapters_equal(back, tree)


def test_peft_to_jax_after_torch_training(tmp_path):
  torch.manual_seed(0)
  cfg = peft.DeloraConfig(
    r=4,
    delora_lambda=3.0,
    target_modules=list(tm.NAMES),
    init_weights=False,
    rank_pattern={"lin1": 2},
    lambda_pattern={"lin1": 7.0},
  )
  model = peft.get_peft_model(tm.TorchMLP(), cfg)
  sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
  x = x_batch(1)
  torch.mean(model(torch.from_numpy(x)) ** 2).backward()
  sgd.step()
  model.save_pretrained(tmp_path / "p")

  target = delora_jax.wrap(tm.base_params(model.base_model.model), RULES)
  tree = delora_jax.peft.load(tmp_path / "p", target, module_names=NAMES)
  assert rel(jax_out(tree, x), torch_out(model, x)) < RTOL
  want = tm.peft_adapters(model)
  for p, fields in want.items():
    for f, w in fields.items():
      np.testing.assert_array_equal(np.asarray(delora_jax.adapters(tree)[p][f]), np.asarray(w))


NO_TORCH = """
import sys
sys.modules.update(torch=None, peft=None, transformers=None)  # any import of them now fails
import jax.numpy as jnp, delora_jax
tree = delora_jax.wrap({"lin0": {"kernel": jnp.ones((12, 32))}}, {"lin0/kernel": 4})
names = {"lin0/kernel": "lin0"}
delora_jax.peft.export(tree, sys.argv[1] + "/d", module_names=names)
delora_jax.peft.export_lora(tree, sys.argv[1] + "/l", module_names=names)
delora_jax.peft.load(sys.argv[1] + "/d", tree, module_names=names)
assert "torch" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
"""


def test_export_needs_neither_torch_nor_peft(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": str(root)}
  done = subprocess.run(
    [sys.executable, "-c", NO_TORCH, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_jax_peft_jax_round_trip_is_bitwise(tmp_path):
  tree = jax_tree()
  out = delora_jax.peft.export(tree, tmp_path / "rt", module_names=lambda p: p.split("/")[0])
  assert_adapters_equal(delora_jax.peft.load(out, jax_tree(key=5), module_names=NAMES), tree)


def test_export_lora_reproduces_outputs_in_peft(tmp_path):
  rules = {
    "lin1/kernel": delora_jax.Rule(2, lam=7.0, init="random"),
    "lin0/kernel": delora_jax.Rule(4, lam=3.0, init="random"),
    "lin2/kernel": delora_jax.Rule(3, lam=3.0, init="paper"),
  }
  tree = jax_tree(rules=rules)
  ads = delora_jax.adapters(tree)  # move the paper adapter off its (zero-update) start
  ads["lin2/kernel"]["b"] = ads["lin2/kernel"]["b"] * 1.5
  tree = delora_jax.with_adapters(tree, ads)
  out = delora_jax.peft.export_lora(tree, tmp_path / "lora", module_names=NAMES)
  cfg = json.loads(pathlib.Path(out, "adapter_config.json").read_text())
  assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == cfg["alpha_pattern"]
  assert {cfg["r"], *cfg["rank_pattern"].values()} == {4, 2, 6}  # paper: rank 2r
  model = peft.PeftModel.from_pretrained(torch_base(), out)
  x = x_batch(2)
  want = jax_out(tree, x)
  assert rel(want, tm.FlaxMLP().apply({"params": tm.base_params(torch_base())}, x)) > 1e-3
  assert rel(torch_out(model, x), want) < RTOL


def test_to_lora_is_the_exact_update():
  for kernel_shape, rule in [
    ((12, 32), delora_jax.Rule(4, init="random")),
    ((3, 12, 8), delora_jax.Rule(2, init="random", stack_axes=1)),
    ((12, 8), delora_jax.Rule(2, init="paper")),
  ]:
    w = jax.random.normal(jax.random.key(0), kernel_shape)
    tree = delora_jax.wrap({"k": w}, {"k": rule})
    f = delora_jax.to_lora(tree)["k"]
    r = rule.rank * (2 if rule.init == "paper" else 1)
    assert f["lora_a"].shape == (*kernel_shape[:-1], r) and f["lora_b"].shape[-2:] == (r, kernel_shape[-1])
    got = jnp.matmul(f["lora_a"], f["lora_b"], precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(delora_jax.delta(tree)["k"]))


class Stacked(torch.nn.Module):
  def __init__(self, w):
    super().__init__()
    self.layers = torch.nn.ModuleList(torch.nn.Linear(w.shape[1], w.shape[2], bias=False) for _ in w)
    with torch.no_grad():
      for lin, wi in zip(self.layers, w):
        lin.weight.copy_(torch.from_numpy(np.asarray(wi).T.copy()))

  def forward(self, x):
    return torch.stack([lin(x) for lin in self.layers])


def test_stacked_kernels_export_one_module_per_layer(tmp_path):
  w = jax.random.normal(jax.random.key(1), (3, 12, 16))
  tree = delora_jax.wrap(
    {"layers": {"proj": {"kernel": w}}}, {"layers/proj/kernel": delora_jax.Rule(4, init="random", stack_axes=1)}
  )
  out = delora_jax.peft.export(tree, tmp_path / "s", module_names={"layers/proj/kernel": "layers.{}"})
  model = peft.PeftModel.from_pretrained(Stacked(w), out)
  x = x_batch(3)
  merged = np.asarray(delora_jax.merge(tree)["layers"]["proj"]["kernel"])
  assert rel(torch_out(model, x), np.einsum("bi,lio->lbo", x, merged)) < RTOL
  listed = {"layers/proj/kernel": ["layers.0", "layers.1", "layers.2"]}
  again = delora_jax.peft.load(out, tree, module_names=listed)
  assert_adapters_equal(again, tree)


def test_nd_kernel_needs_flatten_nd_and_conv_is_refused(tmp_path):
  w = jax.random.normal(jax.random.key(2), (12, 4, 8))  # DenseGeneral (in, heads, head_dim)
  tree = delora_jax.wrap({"q": {"kernel": w}}, {"q/kernel": delora_jax.Rule(4, init="random", in_axes=0)})
  with pytest.raises(ValueError, match="is N-D .* pass flatten_nd=True"):
    delora_jax.peft.export(tree, tmp_path / "n", module_names={"q/kernel": "q"})
  out = delora_jax.peft.export(tree, tmp_path / "n", module_names={"q/kernel": "q"}, flatten_nd=True)
  lin = torch.nn.Linear(12, 32, bias=False)
  with torch.no_grad():
    lin.weight.copy_(torch.from_numpy(np.asarray(w).reshape(12, 32).T.copy()))
  model = peft.PeftModel.from_pretrained(torch.nn.Sequential(collections_od(q=lin)), out)
  x = x_batch(4)
  want = x @ np.asarray(delora_jax.merge(tree)["q"]["kernel"]).reshape(12, 32)
  assert rel(torch_out(model, x), want) < RTOL
  assert_adapters_equal(delora_jax.peft.load(out, tree, module_names={"q/kernel": "q"}, flatten_nd=True), tree)
  conv = delora_jax.wrap({"c": {"kernel": jnp.ones((3, 3, 4, 8))}}, {"c/kernel": delora_jax.Rule(2, out_axes=-1)})
  with pytest.raises(ValueError, match="Convolution kernels cannot"):
    delora_jax.peft.export(conv, tmp_path / "c", module_names={"c/kernel": "c"})


def collections_od(**mods):
  import collections

  return collections.OrderedDict(mods)


def test_llama_and_bert_mappings_name_real_hf_modules(tmp_path):
  from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  llama = LlamaForCausalLM(
    LlamaConfig(
      hidden_size=16,
      intermediate_size=24,
      num_hidden_layers=2,
      num_attention_heads=2,
      num_key_value_heads=1,
      vocab_size=32,
    )
  )
  params = {}
  for name, t in llama.state_dict().items():
    if name.endswith("proj.weight") or name == "lm_head.weight":
      parts = name[: -len(".weight")].removeprefix("model.").split(".")
      path = "/".join([f"layers_{parts[1]}", *parts[2:]] if parts[0] == "layers" else parts)
      params[path + "/kernel"] = jnp.asarray(tm.t2n(t).T)
  assert {delora_jax.peft.llama_module_names(p) for p in params} == {
    n for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear)
  }
  tree = delora_jax.wrap(params, {".*proj/kernel": delora_jax.Rule(2, init="random")})
  out = delora_jax.peft.export(tree, tmp_path / "llama", module_names=delora_jax.peft.llama_module_names)
  model = peft.PeftModel.from_pretrained(llama, out)
  q = model.base_model.model.model.layers[1].self_attn.q_proj
  np.testing.assert_allclose(
    tm.t2n(q.get_delta_weight("default")).T,
    np.asarray(delora_jax.delta(tree)["layers_1/self_attn/q_proj/kernel"]),
    rtol=1e-5,
    atol=1e-7,
  )
  assert delora_jax.peft.llama_module_names("layers/self_attn/o_proj/kernel") == "model.layers.{}.self_attn.o_proj"
  assert delora_jax.peft.llama_module_names("embed_tokens/embedding") is None

  bert = BertForSequenceClassification(
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12, vocab_size=20)
  )
  linear = {n for n, m in bert.named_modules() if isinstance(m, torch.nn.Linear)} - {"classifier"}
  paths = [
    "encoder/layer_0/attention/self/query/kernel",
    "encoder/layer_0/attention/self/key/kernel",
    "encoder/layer_0/attention/self/value/kernel",
    "encoder/layer_0/attention/output/dense/kernel",
    "encoder/layer_0/intermediate/dense/kernel",
    "encoder/layer_0/output/dense/kernel",
    "pooler/dense/kernel",
  ]
  names = delora_jax.peft.bert_module_names(prefix="bert.")
  assert {names(p) for p in paths} == linear
  assert names("encoder/layer/output/dense/kernel") == "bert.encoder.layer.{}.output.dense"
  assert names("embeddings/word_embeddings/embedding") is None
  with pytest.raises(TypeError, match="`prefix` must be a str"):
    delora_jax.peft.bert_module_names(prefix=3)


# ---- every error, and the caller's tree is untouched --------------------------------------


def stacked_tree():
  return delora_jax.wrap({"l": {"kernel": jnp.ones((3, 12, 8))}}, {"l/kernel": delora_jax.Rule(2, stack_axes=1)})


EXPORT_ERRORS = {
  "paper": (
    lambda: jax_tree(rules={".*kernel": delora_jax.Rule(2, init="paper")}),
    NAMES,
    {},
    ValueError,
    "init='paper'",
  ),
  "dict_missing": (jax_tree, {"lin0/kernel": "lin0"}, {}, ValueError, "has no entry"),
  "callable_none": (jax_tree, lambda p: None, {}, ValueError, "gives no torch module name"),
  "template_unstacked": (jax_tree, lambda p: "x.{}", {}, ValueError, "is not stacked"),
  "single_for_stacked": (stacked_tree, {"l/kernel": "l"}, {}, ValueError, "must give 3 names"),
  "wrong_count": (stacked_tree, {"l/kernel": ["a", "b"]}, {}, ValueError, "gave 2 names, expected 3"),
  "duplicate": (jax_tree, lambda p: "same", {}, ValueError, "distinct names"),
  "bad_type": (jax_tree, 3, {}, TypeError, "must be a callable"),
  "bad_value": (jax_tree, lambda p: 3, {}, TypeError, "must give a str"),
  "dropouts": (
    lambda: jax_tree(rules={"lin0/kernel": delora_jax.Rule(2, dropout=0.1), "lin[12]/kernel": 2}),
    NAMES,
    {},
    ValueError,
    "different dropout",
  ),
  "rules_miss": (jax_tree, NAMES, {"rules": {"lin0/kernel": 2}}, ValueError, "no pattern of `rules`"),
}


@pytest.mark.parametrize("case", list(EXPORT_ERRORS), ids=list(EXPORT_ERRORS))
def test_export_errors(tmp_path, case):
  make, names, kw, exc, msg = EXPORT_ERRORS[case]
  tree = make()
  with pytest.raises(exc, match=msg):
    delora_jax.peft.export(tree, tmp_path / "e", module_names=names, **kw)
  assert not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  tree = jax_tree()
  return delora_jax.peft.export(tree, tmp_path_factory.mktemp("x") / "ok", module_names=NAMES), tree


def _tamper(src, dst, *, config=None, tensors=None):
  dst.mkdir()
  cfg = json.loads(pathlib.Path(src, "adapter_config.json").read_text())
  ts = load_file(f"{src}/adapter_model.safetensors")
  if config:
    config(cfg)
  if tensors:
    tensors(ts)
  (dst / "adapter_config.json").write_text(json.dumps(cfg))
  save_file(ts, dst / "adapter_model.safetensors")
  return dst


K, K1 = "base_model.model.lin2.delora_", "base_model.model.lin1.delora_"
LOAD_ERRORS = {
  "peft_type": (dict(config=lambda c: c.update(peft_type="LORA")), "expected 'DELORA'"),
  "r_type": (dict(config=lambda c: c.update(r="4")), "adapter_config.json: `r` must be a positive integer; got '4'"),
  "extra_tensor": (
    dict(tensors=lambda t: t.update({"base_model.model.head.weight": np.ones(2, np.float32)})),
    "head.weight: no leaf of the target tree maps to this tensor",
  ),
  "missing_module": (
    dict(tensors=lambda t: [t.pop(K + f) for f in ("A", "B", "lambda", "w_norm")]),
    "absent from the file",
  ),
  "unexpected_module": (
    dict(tensors=lambda t: t.update({"base_model.model.lin9.delora_A": t[K + "A"]})),
    "lin9: in the file, not adapted",
  ),
  "rank": (
    dict(
      config=lambda c: c.update(rank_pattern={}),
      tensors=lambda t: t.update({K1 + "A": np.ones((4, 32), np.float32), K1 + "B": np.ones((24, 4), np.float32)}),
    ),
    "rank 4 in adapter_config.json, 2 in the target",
  ),
  "rank_vs_tensors": (
    dict(config=lambda c: c.update(rank_pattern={})),
    r"lin1: rank 4 in adapter_config.json \(`r` or its rank_pattern entry\), but delora_A \(2, 32\)",
  ),
  "shape": (dict(tensors=lambda t: t.update({K + "B": np.ones((5, 4), np.float32)})), "shape \\(5, 4\\)"),
  "missing_tensor": (dict(tensors=lambda t: t.pop(K + "B")), "tensors \\['delora_B'\\] missing"),
  "lam_nan": (
    dict(tensors=lambda t: t.update({K + "lambda": np.full(1, np.nan, np.float32)})),
    r"lin2.delora_lambda: 1 of 1 entries are NaN or inf",
  ),
  "not_targeted": (dict(config=lambda c: c.update(target_modules=["lin0", "lin1"])), "not selected by"),
  "other_base": (dict(tensors=lambda t: t.update({K + "w_norm": t[K + "w_norm"] * 1.1})), "base kernel differs"),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS), ids=list(LOAD_ERRORS))
def test_load_errors_leave_tree_untouched(exported, tmp_path, case):
  out, tree = exported
  kw, msg = LOAD_ERRORS[case]
  bad = _tamper(out, tmp_path / "bad", **kw)
  target = jax_tree(key=3)
  before = jax.tree_util.tree_map(np.asarray, target)
  with pytest.raises(ValueError, match=msg):
    delora_jax.peft.load(bad, target, module_names=NAMES)
  assert_trees_equal(target, before)


def test_load_file_errors(exported, tmp_path):
  out, tree = exported
  with pytest.raises(ValueError, match="does not exist"):
    delora_jax.peft.load(tmp_path, tree, module_names=NAMES)
  bad = _tamper(out, tmp_path / "garbled")
  (bad / "adapter_config.json").write_text("{nope")
  with pytest.raises(ValueError, match="unreadable"):
    delora_jax.peft.load(bad, tree, module_names=NAMES)
  paper = jax_tree(rules={".*kernel": delora_jax.Rule(2, init="paper")})
  with pytest.raises(ValueError, match="init='paper'.*Wrap the target"):
    delora_jax.peft.load(out, paper, module_names=NAMES)
  assert_adapters_equal(delora_jax.peft.load(out, jax_tree(key=4), module_names=NAMES, check_base=True), tree)


def test_docs_checkpoints_page_runs_with_its_peft_part(tmp_path, monkeypatch):
  """Every ```python block of docs/checkpoints.md, in order, in one namespace: the orbax part
  (also run on every stack by test_checkpoint.py) and the torch/PEFT part."""
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) == 8
  monkeypatch.chdir(tmp_path)
  ns = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/checkpoints.md[block {i}]", "exec"), ns)  # noqa: S102 (our docs)
  assert isinstance(ns["torch_model"], peft.PeftModel)
