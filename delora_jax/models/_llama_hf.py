"""Conversion between Hugging Face ``LlamaForCausalLM`` state dicts and :mod:`delora_jax.models.llama` params."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from delora_jax.models.llama import LlamaConfig

# (flax path inside one layer, HF suffix inside `model.layers.{i}.`, torch Linear weight?)
_LAYER_PARAMS = (
  (("input_layernorm", "scale"), "input_layernorm.weight", False),
  (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", True),
  (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", True),
  (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", True),
  (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True),
  (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", False),
  (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", True),
  (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", True),
  (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", True),
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_shapes(c: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax shapes of one layer's leaves."""
  h, i, d = c.hidden_size, c.intermediate_size, c.head_size
  q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
  return {
    ("input_layernorm", "scale"): (h,),
    ("post_attention_layernorm", "scale"): (h,),
    ("self_attn", "q_proj", "kernel"): (h, q),
    ("self_attn", "k_proj", "kernel"): (h, kv),
    ("self_attn", "v_proj", "kernel"): (h, kv),
    ("self_attn", "o_proj", "kernel"): (q, h),
    ("mlp", "gate_proj", "kernel"): (h, i),
    ("mlp", "up_proj", "kernel"): (h, i),
    ("mlp", "down_proj", "kernel"): (i, h),
  }


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def params_from_hf(state_dict: Any, config: LlamaConfig) -> dict[str, Any]:
  """Converts a HF ``LlamaForCausalLM`` state dict into :class:`Llama` params.

  Linear weights ``(out, in)`` become kernels ``(in, out)``; with
  ``config.scan_layers`` the per-layer leaves are stacked on a leading axis
  under ``layers/``. Leaves are cast to ``config.param_dtype``.

  Args:
    state_dict: ``{name: array}`` with HF names (``model.embed_tokens.weight``,
      ``model.layers.{i}.self_attn.q_proj.weight``, ..., ``lm_head.weight``);
      numpy arrays or anything ``np.asarray`` reads (CPU float32 torch tensors).
    config: the matching :class:`LlamaConfig` (e.g. ``LlamaConfig.from_hf``).

  Raises:
    ValueError: a missing or unexpected key, or a shape that does not match
      ``config``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from delora_jax.models import Llama, LlamaConfig, params_from_hf, params_to_hf
    >>> c = LlamaConfig.preset("tiny")
    >>> params = Llama(c).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> sd = params_to_hf(params, c)
    >>> sd["model.layers.0.mlp.down_proj.weight"].shape
    (64, 176)
    >>> back = params_from_hf(sd, c)
    >>> bool(jnp.array_equal(back["layers_1"]["self_attn"]["q_proj"]["kernel"],
    ...                      params["layers_1"]["self_attn"]["q_proj"]["kernel"]))
    True
  """
  dtype, used = jnp.dtype(config.param_dtype), set()

  def take(key: str, shape: tuple[int, ...], linear: bool) -> Any:
    hf_shape = shape[::-1] if linear else shape
    if key not in state_dict:
      raise ValueError(
        f"params_from_hf: `state_dict` has no {key!r} (expected shape {hf_shape}). Pass the "
        "state dict of a HF LlamaForCausalLM whose shapes match `config`."
      )
    arr = np.asarray(state_dict[key])
    if arr.shape != hf_shape:
      raise ValueError(
        f"params_from_hf: {key!r} has shape {arr.shape}, expected {hf_shape} from `config`. "
        "Build the config from the checkpoint, e.g. LlamaConfig.from_hf(hf_model.config)."
      )
    used.add(key)
    return arr.T if linear else arr

  h, v, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
  params: dict[str, Any] = {}
  _set(params, ("embed_tokens", "embedding"), take("model.embed_tokens.weight", (v, h), False))
  for path, suffix, linear in _LAYER_PARAMS:
    shape = _layer_shapes(config)[path]
    per_layer = [take(f"model.layers.{i}.{suffix}", shape, linear) for i in range(n_layers)]
    if config.scan_layers:
      _set(params, ("layers", *path), np.stack(per_layer))
    else:
      for i, arr in enumerate(per_layer):
        _set(params, (f"layers_{i}", *path), arr)
  _set(params, ("norm", "scale"), take("model.norm.weight", (h,), False))
  _set(params, ("lm_head", "kernel"), take("lm_head.weight", (h, v), True))
  unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise ValueError(
      f"params_from_hf: `state_dict` has keys this model has no place for: {unexpected[:6]}"
      f"{' ...' if len(unexpected) > 6 else ''}. Biases, tied embeddings and extra layers are "
      "not supported; check that `config.num_hidden_layers` matches the checkpoint."
    )
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def params_to_hf(params: Any, config: LlamaConfig) -> dict[str, np.ndarray]:
  """The inverse of :func:`params_from_hf`: ``{HF name: numpy array}`` (torch layout).

  Use it to hand merged weights (``delora_jax.merge(tree)``) back to
  ``transformers`` (``model.load_state_dict({k: torch.from_numpy(v) ...})``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from delora_jax.models import Llama, LlamaConfig, params_to_hf
    >>> c = LlamaConfig.preset("tiny", scan_layers=True)
    >>> params = Llama(c).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> params_to_hf(params, c)["model.layers.1.self_attn.k_proj.weight"].shape
    (32, 64)
  """

  def get(path: tuple[str, ...]) -> np.ndarray:
    node = params
    for name in path:
      node = node[name]
    return np.asarray(node)

  out = {"model.embed_tokens.weight": get(("embed_tokens", "embedding"))}
  for i in range(config.num_hidden_layers):
    for path, suffix, linear in _LAYER_PARAMS:
      arr = get(("layers", *path))[i] if config.scan_layers else get((f"layers_{i}", *path))
      out[f"model.layers.{i}.{suffix}"] = arr.T if linear else arr
  out["model.norm.weight"] = get(("norm", "scale"))
  out["lm_head.weight"] = get(("lm_head", "kernel")).T
  return out
