"""Hugging Face PEFT adapter folders: DeLoRA both ways, and LoRA out.

Writing needs only ``numpy``, ``json`` and ``safetensors`` (no torch, no peft).
Folders hold ``adapter_config.json`` and ``adapter_model.safetensors`` exactly as
``PeftModel.save_pretrained`` writes them, so ``PeftModel.from_pretrained(torch_model,
directory)`` loads them. ``module_names`` maps each adapted Flax kernel path to the
torch module it belongs to: a dict ``{path: name}`` or a callable ``path -> name``;
a stacked (scanned) kernel needs one name per slice (a sequence, or a template with
``{}`` for the slice index). Ready mappings: :func:`llama_module_names`,
:func:`bert_module_names`.
"""

from delora_jax.peft._export import export as export
from delora_jax.peft._export import export_lora as export_lora
from delora_jax.peft._extras import trainable as trainable
from delora_jax.peft._load import load as load
from delora_jax.peft._names import bert_module_names as bert_module_names
from delora_jax.peft._names import llama_module_names as llama_module_names
from delora_jax.peft._rules import rules as rules

__all__ = ["bert_module_names", "export", "export_lora", "llama_module_names", "load", "rules", "trainable"]
