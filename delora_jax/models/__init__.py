"""Reference Flax models with Hugging Face parameter names, for tests, examples and benchmarks."""

from delora_jax.models._llama_hf import params_from_hf as params_from_hf
from delora_jax.models._llama_hf import params_to_hf as params_to_hf
from delora_jax.models.llama import Llama as Llama
from delora_jax.models.llama import LlamaConfig as LlamaConfig

__all__ = ["Llama", "LlamaConfig", "params_from_hf", "params_to_hf"]
