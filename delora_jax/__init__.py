"""delora_jax: DeLoRA (Decoupled Low-rank Adaptation) for JAX and Flax.

Wrap a Flax parameter tree, train only the bounded low-rank adapters with optax
(every optimizer family but lbfgs), merge back into plain parameters. Numerically identical to
Hugging Face PEFT's ``DeloraConfig``.
"""

import importlib.metadata

from delora_jax import nnx as nnx
from delora_jax import peft as peft
from delora_jax._checkpoint import CheckpointError as CheckpointError
from delora_jax._checkpoint import adapter_save_args as adapter_save_args
from delora_jax._checkpoint import load_adapters as load_adapters
from delora_jax._checkpoint import save_adapters as save_adapters
from delora_jax._diagnostics import diagnostics as diagnostics
from delora_jax._kernel import DeloraKernel as DeloraKernel
from delora_jax._linen import apply as apply
from delora_jax._lora import to_lora as to_lora
from delora_jax._optim import optimizer as optimizer
from delora_jax._report import FallbackWarning as FallbackWarning
from delora_jax._report import explain as explain
from delora_jax._rule import Modules as Modules
from delora_jax._rule import Rule as Rule
from delora_jax._sharding import shardings as shardings
from delora_jax._split import combine as combine
from delora_jax._split import split as split
from delora_jax._split import trainable_mask as trainable_mask
from delora_jax._wrap import adapters as adapters
from delora_jax._wrap import delta as delta
from delora_jax._wrap import merge as merge
from delora_jax._wrap import unwrap as unwrap
from delora_jax._wrap import with_adapters as with_adapters
from delora_jax._wrap import wrap as wrap

try:
  __version__ = importlib.metadata.version("delora_jax")  # pyproject.toml's version, as installed
except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
  __version__ = "0+unknown"

__all__ = [
  "CheckpointError",
  "DeloraKernel",
  "FallbackWarning",
  "Modules",
  "Rule",
  "adapters",
  "apply",
  "combine",
  "delta",
  "diagnostics",
  "explain",
  "merge",
  "shardings",
  "optimizer",
  "split",
  "trainable_mask",
  "unwrap",
  "with_adapters",
  "wrap",
  "adapter_save_args",
  "load_adapters",
  "nnx",
  "peft",
  "save_adapters",
  "to_lora",
]
