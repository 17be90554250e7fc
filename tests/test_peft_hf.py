"""PEFT's decoder and sequence-classification suites, ported: real HF models, real peft.

A tiny ``LlamaForCausalLM`` (decoder: ``all-linear`` leaves ``lm_head`` out; a scanned
JAX model takes PEFT's ``layers_to_transform=[0]``) and a tiny
``BertForSequenceClassification`` (``task_type="SEQ_CLS"``: PEFT itself puts the
classifier in ``modules_to_save``). Each: PEFT adapts and saves, ``peft.load`` builds
the JAX tree from plain params and the folder alone, outputs agree; the JAX tree is
then moved (as training would) and the folder ``peft.export`` writes reproduces it in
PEFT, classifier included.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import delora_jax  # noqa: E402
from delora_jax.models import Llama, LlamaConfig, bert, params_from_hf  # noqa: E402
from tests.helpers import HF_TINY

# The Flax ports match HF to 1e-4 of the largest logit (tests/test_llama.py); an adapter adds
# two small matmuls, so the same figure bounds the adapted comparison.
MODEL_RTOL = 1e-4


def max_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def moved(tree, seed=0):
  """The adapters as if trained: λ and b perturbed (live slices only)."""
  ads = delora_jax.adapters(tree)
  rng = np.random.default_rng(seed)
  for ad in ads.values():
    live = (np.asarray(ad["lam"]) != 0).astype(np.float32)
    ad["lam"] = ad["lam"] * 1.3
    noise = rng.standard_normal(ad["b"].shape).astype(np.float32) * 0.05
    ad["b"] = ad["b"] + jnp.asarray(noise * live.reshape(live.shape + (1, 1)))
  return delora_jax.with_adapters(tree, ads)


@pytest.mark.parametrize("scan", [False, True], ids=["all_linear", "scan_layer0"])
def test_llama_decoder(tmp_path, scan):
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_TINY)).eval()
  cfg = LlamaConfig.from_hf(hf.config, scan_layers=scan)
  params = params_from_hf({k: v.detach().numpy() for k, v in hf.state_dict().items()}, cfg)
  kw = dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]) if scan else dict(target_modules="all-linear")
  pm = peft.get_peft_model(hf, peft.DeloraConfig(r=4, init_weights=False, **kw)).eval()
  pm.save_pretrained(tmp_path / "p")
  adapted = {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "delora_A")}
  assert "lm_head" not in adapted and len(adapted) == (2 if scan else 14)
  names = delora_jax.peft.llama_module_names
  tree = delora_jax.peft.load(tmp_path / "p", params, module_names=names)
  if scan:
    assert delora_jax.peft.rules(tmp_path / "p", params, module_names=names) == {
      f"layers/self_attn/{p}_proj/kernel": delora_jax.Rule(4, init="random", stack_axes=1, slices=(0,)) for p in "qv"
    }
  ids = np.random.RandomState(0).randint(0, 128, (2, 16))
  with torch.no_grad():
    want = pm(input_ids=torch.tensor(ids)).logits.numpy()
  model = Llama(cfg)
  assert max_rel(delora_jax.apply(model, {"params": tree}, jnp.asarray(ids)), want) < MODEL_RTOL
  tree = moved(tree)
  out = delora_jax.peft.export(tree, tmp_path / "j", module_names=names)
  torch.manual_seed(0)
  fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_TINY)).eval()
  back = peft.PeftModel.from_pretrained(fresh, out).eval()
  with torch.no_grad():
    got = back(input_ids=torch.tensor(ids)).logits.numpy()
  jax_out = delora_jax.apply(model, {"params": tree}, jnp.asarray(ids))
  assert max_rel(got, jax_out) < MODEL_RTOL
  assert max_rel(got, want) > 10 * MODEL_RTOL  # the moved adapters change the model


class SeqCls(nn.Module):
  """BertForSequenceClassification in Flax: encoder, tanh pooler on [CLS], classifier."""

  config: bert.BertConfig
  labels: int

  @nn.compact
  def __call__(self, ids, mask):
    h = bert.BertModel(self.config, name="bert")(ids, mask)
    pooled = jnp.tanh(nn.Dense(self.config.hidden_size, name="pooler")(h[:, 0]))
    return nn.Dense(self.labels, name="classifier")(pooled)


def seq_cls_names(path):
  if path in ("classifier/kernel", "pooler/kernel"):
    return {"classifier/kernel": "classifier", "pooler/kernel": "bert.pooler.dense"}[path]
  return delora_jax.peft.bert_module_names("bert.")(path.removeprefix("bert/")) if path.startswith("bert/") else None


def test_bert_sequence_classification(tmp_path):
  hf_cfg = transformers.BertConfig(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=40, num_labels=3
  )
  torch.manual_seed(0)
  hf = transformers.BertForSequenceClassification(hf_cfg).eval()
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  params = {
    "bert": bert.params_from_hf(sd, prefix="bert."),
    "pooler": {
      "kernel": jnp.asarray(sd["bert.pooler.dense.weight"].T),
      "bias": jnp.asarray(sd["bert.pooler.dense.bias"]),
    },
    "classifier": {"kernel": jnp.asarray(sd["classifier.weight"].T), "bias": jnp.asarray(sd["classifier.bias"])},
  }
  pm = peft.get_peft_model(
    hf, peft.DeloraConfig(task_type="SEQ_CLS", r=2, init_weights=False, target_modules=["query", "value"])
  ).eval()
  with torch.no_grad():  # PEFT trains the classifier copy; move it as training would
    pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(1.5)
  pm.save_pretrained(tmp_path / "p")
  model = SeqCls(bert.BertConfig.from_hf(hf_cfg.to_dict()), 3)
  tree = delora_jax.peft.load(tmp_path / "p", params, module_names=seq_cls_names)
  np.testing.assert_array_equal(np.asarray(tree["classifier"]["kernel"]), sd["classifier.weight"].T * np.float32(1.5))
  rng = np.random.RandomState(1)
  ids, mask = rng.randint(0, 40, (3, 7)), np.ones((3, 7), np.int64)
  with torch.no_grad():
    want = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert max_rel(delora_jax.apply(model, {"params": tree}, jnp.asarray(ids), jnp.asarray(mask)), want) < MODEL_RTOL
  tree = moved(tree)
  tree["classifier"]["bias"] = tree["classifier"]["bias"] + 0.25
  out = delora_jax.peft.export(tree, tmp_path / "j", module_names=seq_cls_names, extra_trainable="classifier/.*")
  torch.manual_seed(0)
  fresh = transformers.BertForSequenceClassification(hf_cfg).eval()
  back = peft.PeftModel.from_pretrained(fresh, out).eval()
  with torch.no_grad():
    got = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert max_rel(got, delora_jax.apply(model, {"params": tree}, jnp.asarray(ids), jnp.asarray(mask))) < MODEL_RTOL
