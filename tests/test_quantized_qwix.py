"""delora_jax's own quantization numerics (delora_jax/_quant.py) against qwix's, on the same weights.

qwix is what tunix and MaxText quantize with; it is not a dependency of delora_jax, so this file runs
only where qwix is installed (conftest.py MAIN_STACK_ONLY)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qwix._src.core import qarray

from delora_jax import _quant

QTYPE = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}


@pytest.mark.parametrize("tile", [None, 8], ids=["per_channel", "tile8"])
@pytest.mark.parametrize("scheme", list(QTYPE))
def test_values_and_scales_equal_qwix(scheme, tile):
  """Bit for bit: the same int values / nf4 indices, the same float32 scales, the same dequantized kernel."""
  w = jax.random.normal(jax.random.key(3), (32, 24)) * 0.2
  ours = _quant.quantize(w, scheme, (-2,), tile)
  theirs = qarray.quantize_api(w, QTYPE[scheme], channelwise_axes=(1,), tiled_axes={0: tile} if tile else None)
  assert ours.values.dtype == theirs.qvalue.dtype
  np.testing.assert_array_equal(np.asarray(ours.values, np.int32), np.asarray(theirs.qvalue, np.int32))
  np.testing.assert_array_equal(ours.scale, theirs.scale)
  np.testing.assert_array_equal(_quant.dequantize(ours), qarray.dequantize(theirs))
