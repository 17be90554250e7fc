"""A Llama-style decoder in Flax Linen with Hugging Face parameter names.

RMSNorm, rotary attention with grouped key/value heads (HF ``rotate_half``
convention), SwiGLU MLP, causal mask. Layers are ``layers_{i}`` or, with
``scan_layers=True``, one ``nn.scan``-ned ``layers`` subtree whose leaves have a
leading layer axis (adapt those with ``Rule(r, stack_axes=1)``). All seven
projections are bias-free ``nn.Dense`` with 2-D ``(in, out)`` kernels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ATTENTION = ("softmax", "blocked", "xla", "cudnn", "auto")
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and execution options of :class:`Llama` (HF ``LlamaConfig`` names).

  ``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
  ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``rms_norm_eps`` and
  ``rope_theta`` are as in Hugging Face ``LlamaConfig`` (``head_dim=None`` means
  ``hidden_size // num_attention_heads``).

  Args:
    scan_layers: run the layers with ``nn.scan`` (params under ``layers/`` with
      a leading layer axis) instead of ``layers_0 ... layers_{L-1}``.
    remat: rematerialise each layer in the backward pass (``nn.remat``).
    remat_policy: a ``jax.checkpoint_policies`` name used when ``remat``.
    attention: ``"softmax"`` (explicit float32 softmax, any backend),
      ``"blocked"`` (float32, causal in query blocks that skip the masked key
      blocks, backward recomputes the probabilities from saved log-sum-exps),
      ``"xla"`` / ``"cudnn"`` (``jax.nn.dot_product_attention`` with that
      implementation) or ``"auto"`` (cuDNN on GPU for 16-bit dtypes, else
      ``"blocked"``).
    dtype: computation dtype; param_dtype: parameter dtype.

  Example:
    >>> from delora_jax.models import LlamaConfig
    >>> LlamaConfig.preset("small").hidden_size
    512
    >>> LlamaConfig.preset("tiny", scan_layers=True).scan_layers
    True
  """

  vocab_size: int = 32000
  hidden_size: int = 2048
  intermediate_size: int = 5632
  num_hidden_layers: int = 22
  num_attention_heads: int = 32
  num_key_value_heads: int = 4
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  scan_layers: bool = False
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention: str = "softmax"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"LlamaConfig: `num_attention_heads` ({self.num_attention_heads}) must be a multiple "
        f"of `num_key_value_heads` ({self.num_key_value_heads}); pick KV heads that divide it."
      )
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"LlamaConfig: `hidden_size` ({self.hidden_size}) is not divisible by "
        f"`num_attention_heads` ({self.num_attention_heads}); set `head_dim` explicitly."
      )
    if self.attention not in ATTENTION:
      raise ValueError(f"LlamaConfig: `attention` must be one of {ATTENTION}; got {self.attention!r}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"LlamaConfig: `remat_policy` must be one of {REMAT_POLICIES}; got {self.remat_policy!r}.")
    for name in ("dtype", "param_dtype"):
      object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)

  @property
  def head_size(self) -> int:
    """Per-head dimension: ``head_dim``, or ``hidden_size // num_attention_heads`` if unset."""
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
    """``"tiny"`` (tests), ``"small"`` (CPU benchmark) or ``"1b"`` (TinyLlama-1.1B shapes)."""
    if name not in PRESETS:
      raise ValueError(f"LlamaConfig.preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}.")
    return dataclasses.replace(cls(**PRESETS[name]), **overrides)

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> LlamaConfig:
    """The shapes of a Hugging Face ``transformers.LlamaConfig``."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim == hf_config.hidden_size // hf_config.num_attention_heads:
      head_dim = None  # the default, so configs compare equal to the presets
    fields = dict(
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_hidden_layers=hf_config.num_hidden_layers,
      num_attention_heads=hf_config.num_attention_heads,
      num_key_value_heads=hf_config.num_key_value_heads,
      head_dim=head_dim,
      rms_norm_eps=hf_config.rms_norm_eps,
      rope_theta=rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)),
    )
    return cls(**{**fields, **overrides})


PRESETS: dict[str, dict[str, Any]] = {
  "tiny": dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
  ),
  "small": dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
  ),
  "1b": dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
  ),
}

_INIT = nn.initializers.normal(0.02)  # HF initializer_range


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """HF default rotary ``cos``/``sin`` tables, ``(seq_len, head_dim)`` float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``x * cos + rotate_half(x) * sin`` for ``x`` of shape ``(B, T, heads, D)``."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal grouped-query attention with a float32 softmax; ``(B, T, heads, D)`` layout."""
  b, t, n, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, d).astype(jnp.float32)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) / math.sqrt(d)
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None, None]
  scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
  return out.reshape(b, t, n, d).astype(q.dtype)


# ------------------------------------------------------------- blocked attention
# Causal attention over query blocks: block i (queries [s_i, e_i)) sees keys [0, e_i)
# only, so the masked upper triangle of full blocks is never computed, and the
# backward recomputes probabilities from the saved log-sum-exps instead of keeping
# (T, T) scores, mask and probabilities per layer. On XLA:CPU those element-wise
# passes over (T, T) tensors, not the matmuls, dominated the attention time.
_BLOCK = 64


def _blocks(t: int) -> list[tuple[int, int]]:
  n = max(1, -(-t // _BLOCK))
  edges = [round(i * t / n) for i in range(n + 1)]
  return list(zip(edges[:-1], edges[1:]))


def _block_scores(q, k, start, end):
  """Masked scores of queries [start, end) against keys [0, end): ``(B, K, G, c, end)``."""
  s = jnp.einsum("bkgtd,bksd->bkgts", q[:, :, :, start:end], k[:, :, :end])
  row = start + np.arange(end - start)[:, None]
  return jnp.where(jnp.asarray(np.arange(end)[None, :] <= row), s, -jnp.inf)


def _blocked_fwd_impl(q, k, v):
  outs, lses = [], []
  for start, end in _blocks(q.shape[3]):
    s = _block_scores(q, k, start, end)
    lse = jax.nn.logsumexp(s, axis=-1)
    outs.append(jnp.einsum("bkgts,bksd->bkgtd", jnp.exp(s - lse[..., None]), v[:, :, :end]))
    lses.append(lse)
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@jax.custom_vjp
def _blocked(q, k, v):
  """``softmax(q k^T + causal mask) v`` for pre-scaled ``q (B, K, G, T, D)`` and
  ``k, v (B, K, T, D)``, float32."""
  return _blocked_fwd_impl(q, k, v)[0]


def _blocked_fwd(q, k, v):
  out, lse = _blocked_fwd_impl(q, k, v)
  return out, (q, k, v, out, lse)


def _blocked_bwd(res, d_out):
  q, k, v, out, lse = res
  delta = jnp.sum(d_out * out, axis=-1)  # rowsum(dP * P) = rowsum(dO * O)
  dq, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
  t = k.shape[2]
  for start, end in _blocks(q.shape[3]):
    p = jnp.exp(_block_scores(q, k, start, end) - lse[:, :, :, start:end, None])
    do = d_out[:, :, :, start:end]
    dp = jnp.einsum("bkgtd,bksd->bkgts", do, v[:, :, :end])
    ds = p * (dp - delta[:, :, :, start:end, None])
    dq.append(jnp.einsum("bkgts,bksd->bkgtd", ds, k[:, :, :end]))
    pad = ((0, 0), (0, 0), (0, t - end), (0, 0))
    dk = dk + jnp.pad(jnp.einsum("bkgts,bkgtd->bksd", ds, q[:, :, :, start:end]), pad)
    dv = dv + jnp.pad(jnp.einsum("bkgts,bkgtd->bksd", p, do), pad)
  return jnp.concatenate(dq, axis=3), dk, dv


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal grouped-query attention in query blocks (float32); ``(B, T, heads, D)`` layout.

  Equal to :func:`softmax_attention` up to float rounding, with fewer element-wise
  passes and no saved ``(T, T)`` tensors (see the comment above)."""
  b, t, n, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, d).astype(jnp.float32) / math.sqrt(d)
  out = _blocked(
    qg.transpose(0, 2, 3, 1, 4),
    k.astype(jnp.float32).transpose(0, 2, 1, 3),
    v.astype(jnp.float32).transpose(0, 2, 1, 3),
  )
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kind: str) -> jax.Array:
  """Dispatches on :attr:`LlamaConfig.attention`."""
  if kind == "auto":
    on_gpu = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    kind = "cudnn" if on_gpu else "blocked"
  if kind == "softmax":
    return softmax_attention(q, k, v)
  if kind == "blocked":
    return blocked_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=kind)  # type: ignore[call-overload]


class RMSNorm(nn.Module):
  """HF ``LlamaRMSNorm``: normalise in float32, cast back, scale by ``scale``."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,)) * y.astype(self.dtype)


def _dense(cfg: LlamaConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=_INIT, name=name)


def _norm(cfg: LlamaConfig, name: str) -> RMSNorm:
  return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)


class LlamaAttention(nn.Module):
  """Self-attention with rotary embeddings and grouped KV heads (``self_attn``)."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    c = self.config
    b, t, _ = x.shape
    n, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_size
    q = _dense(c, n * d, "q_proj")(x).reshape(b, t, n, d)
    k = _dense(c, kv * d, "k_proj")(x).reshape(b, t, kv, d)
    v = _dense(c, kv * d, "v_proj")(x).reshape(b, t, kv, d)
    out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, c.attention)
    return _dense(c, c.hidden_size, "o_proj")(out.reshape(b, t, n * d))


class LlamaMLP(nn.Module):
  """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    gate = _dense(c, c.intermediate_size, "gate_proj")(x)
    up = _dense(c, c.intermediate_size, "up_proj")(x)
    return _dense(c, c.hidden_size, "down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm block; returns ``(x, None)`` when ``scanned`` (the ``nn.scan`` body form)."""

  config: LlamaConfig
  scanned: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
    c = self.config
    x = x + LlamaAttention(c, name="self_attn")(_norm(c, "input_layernorm")(x), cos, sin)
    x = x + LlamaMLP(c, name="mlp")(_norm(c, "post_attention_layernorm")(x))
    return (x, None) if self.scanned else x


def _layer_class(c: LlamaConfig):
  cls = LlamaDecoderLayer
  if c.remat:
    policy = getattr(jax.checkpoint_policies, c.remat_policy)
    cls = nn.remat(cls, policy=policy, prevent_cse=not c.scan_layers)
  if c.scan_layers:
    cls = nn.scan(
      cls,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast),
      length=c.num_hidden_layers,
    )
  return cls


class Llama(nn.Module):
  """Llama-style causal LM; ``__call__`` returns logits ``(B, T, vocab)`` in ``dtype``.

  Param paths follow HF: ``embed_tokens/embedding``, ``layers_{i}/self_attn/q_proj/kernel``,
  ..., ``norm/scale``, ``lm_head/kernel``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from delora_jax.models import Llama, LlamaConfig
    >>> model = Llama(LlamaConfig.preset("tiny"))
    >>> tokens = jnp.zeros((1, 8), jnp.int32)
    >>> params = model.init(jax.random.key(0), tokens)["params"]
    >>> params["layers_1"]["self_attn"]["k_proj"]["kernel"].shape
    (64, 32)
    >>> model.apply({"params": params}, tokens).shape
    (1, 8, 128)
  """

  config: LlamaConfig

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
      c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype, embedding_init=_INIT
    )
    layer = _layer_class(c)
    if c.scan_layers:
      self.layers = layer(c, scanned=True)
    else:
      self.layers = [layer(c) for _ in range(c.num_hidden_layers)]
    self.norm = _norm(c, "norm")
    self.lm_head = _dense(c, c.vocab_size, "lm_head")

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings ``(B, T, hidden)`` (what ``inputs_embeds`` expects)."""
    return self.embed_tokens(input_ids)

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None) -> jax.Array:
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("Llama: pass exactly one of `input_ids` (B, T) ints or `inputs_embeds` (B, T, hidden).")
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.dtype)
    cos, sin = rope_tables(x.shape[1], self.config.head_size, self.config.rope_theta)
    if self.config.scan_layers:
      x, _ = self.layers(x, cos, sin)
    else:
      for layer in self.layers:
        x = layer(x, cos, sin)
    return self.lm_head(self.norm(x))
