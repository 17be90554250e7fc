"""`apply`: run a Linen model whose params are an adapted tree."""

from __future__ import annotations

from typing import Any, Mapping

from delora_jax import _tree
from delora_jax._wrap import merge


def apply(model: Any, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
  """Drop-in for ``model.apply(variables, *args, **kwargs)`` with adapted params.

  ``variables["params"]`` is a tree from :func:`delora_jax.wrap` (or
  ``combine(trainable, frozen)``); other collections pass through.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, delora_jax
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tree = delora_jax.wrap(params, {"kernel": 2})
    >>> bool(jnp.allclose(delora_jax.apply(model, {"params": tree}, x),
    ...                   model.apply({"params": params}, x)))
    True
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError("apply: `variables` must be a dict with a 'params' collection, as for "
                    "model.apply; got " + (f"keys {sorted(variables)}" if isinstance(variables, Mapping)
                                          else type(variables).__name__) + ".")
  _tree.require_adapted(variables["params"], "apply")
  return model.apply({**variables, "params": merge(variables["params"])}, *args, **kwargs)
