"""Drop-ins for other libraries' training stacks (imported on demand: ``import delora_jax`` imports none).

- :mod:`delora_jax.integrations.maxtext`: DeLoRA in place of MaxText's LoRA hook.
"""
