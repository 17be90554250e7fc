"""Frozen-tree size of a quantized base (``Rule(quantize=...)``) vs the full-precision wrap.

    python benchmarks/quantized_bits.py [--dim 512] [--layers 4] [--rank 8] [--out results/quantized_bits.json]

Wraps a small MLP stack (``layers`` blocks of ``dim -> 4 dim -> dim`` Dense layers, every kernel adapted at
rank ``rank``) in float32 and bfloat16, full precision and int8 / int4 / nf4 (per channel, and with
``tile_size=32``), and counts the bits of the frozen half of :func:`delora_jax.split` (the base kernels or their
values and scales, ``w_norm``, the biases). Two counts: ``bits``, each array's size times its dtype's bit width
(what a TPU/GPU stores: XLA packs int4/uint4 two to a byte there), and ``cpu_bytes``, the bytes XLA:CPU
allocates (``on_device_size_in_bytes``; it stores a 4-bit entry in a whole byte). Prints a JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import delora_jax

SCHEMES = [(None, None), ("int8", None), ("int8", 32), ("int4", None), ("int4", 32), ("nf4", None), ("nf4", 32)]


class Stack(nn.Module):
  dim: int
  layers: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = x + nn.Dense(self.dim, name=f"down_{i}")(nn.gelu(nn.Dense(4 * self.dim, name=f"up_{i}")(x)))
    return x


def _bits(x) -> int:
  dt = jnp.dtype(x.dtype)
  width = jnp.iinfo(dt).bits if jnp.issubdtype(dt, jnp.integer) else jnp.finfo(dt).bits
  return int(np.prod(x.shape)) * int(width)


def measure(dim: int, layers: int, rank: int, dtype) -> list[dict]:
  model = Stack(dim, layers)
  params = model.init(jax.random.key(0), jnp.ones((1, dim)))["params"]
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  rows = []
  for quantize, tile in SCHEMES:
    tree = delora_jax.wrap(params, {".*kernel": delora_jax.Rule(rank, quantize=quantize, tile_size=tile)})
    frozen = jax.tree.leaves(delora_jax.split(tree)[1])
    rows.append(
      {
        "base": jnp.dtype(dtype).name,
        "quantize": quantize or "none",
        "tile_size": tile,
        "bits": sum(_bits(x) for x in frozen),
        "cpu_bytes": sum(x.addressable_data(0).on_device_size_in_bytes() for x in frozen),
      }
    )
  full = rows[0]
  for r in rows:
    r["bits_ratio"] = round(r["bits"] / full["bits"], 4)
    r["cpu_ratio"] = round(r["cpu_bytes"] / full["cpu_bytes"], 4)
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--out", default=None, help="write the JSON here too")
  args = ap.parse_args()
  rows = measure(args.dim, args.layers, args.rank, jnp.float32) + measure(
    args.dim, args.layers, args.rank, jnp.bfloat16
  )
  result = {"dim": args.dim, "layers": args.layers, "rank": args.rank, "rows": rows}
  print(json.dumps(result))
  print(f"\n{'base':9} {'quantize':9} {'tile':>5} {'frozen MiB':>11} {'x full':>7} {'CPU MiB':>8} {'x full':>7}")
  for r in rows:
    print(
      f"{r['base']:9} {r['quantize']:9} {r['tile_size'] or '-':>5} {r['bits'] / 8 / 2**20:11.3f} "
      f"{r['bits_ratio']:7.3f} {r['cpu_bytes'] / 2**20:8.3f} {r['cpu_ratio']:7.3f}"
    )
  if args.out:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), args.out), "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
