"""What `delora_jax.diagnostics` costs inside the main example's train step (XLA flops).

    python benchmarks/diagnostics_cost.py [--batch 64] [--out results/diagnostics_cost.json]

Builds the train step of ``examples/finetune.py`` (all-MiniLM-L6-v2, rank-8 DeLoRA on the
query/value kernels, AdamW, the default batch) twice, with and without the diagnostics
returned as metrics, and compares ``compiled.cost_analysis()`` flops and the compiled
memory. Prints a JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import _valence as V  # noqa: E402
import finetune  # noqa: E402

import delora_jax  # noqa: E402


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def measure(batch: int) -> dict:
  args = finetune.parse_args(["--batch", str(batch)])
  train_set, _ = V.splits(args.train_size, args.test_size, seed=args.seed)  # as the example
  model, params = V.load_encoder()
  rules = {args.targets: delora_jax.Rule(args.rank, lam=args.lam)}
  dim = model.apply({"params": params}, train_set.ids[:1], train_set.mask[:1]).shape[-1]
  head = {"kernel": jnp.zeros((dim, 1)), "bias": jnp.zeros((1,))}
  tree = {"bert": delora_jax.wrap(params, rules), "head": head}
  opt = delora_jax.optimizer(
    optax.adamw, learning_rate=args.lr, weight_decay=1e-4, lam_learning_rate=args.lam_lr, extra_trainable=finetune.HEAD
  )
  trainable, frozen = delora_jax.split(tree, extra_trainable=finetune.HEAD)
  batch_args = (train_set.ids[:batch], train_set.mask[:batch], train_set.y[:batch])
  out = {"batch": batch, "seq": int(train_set.ids.shape[1]), "kernels": len(delora_jax.adapters(tree["bert"]))}
  for name, diagnose in (("without", False), ("with", True)):
    step = finetune.make_train_step(model, opt, diagnose=diagnose)
    compiled = step.lower(trainable, opt.init(trainable), frozen, *batch_args).compile()
    mem = compiled.memory_analysis()
    out[name] = {"flops": _flops(compiled), "temp_bytes": int(mem.temp_size_in_bytes)}
  out["flops_ratio"] = out["with"]["flops"] / out["without"]["flops"]
  out["extra_flops_percent"] = 100.0 * (out["flops_ratio"] - 1.0)
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64, help="the example's default batch")
  p.add_argument("--out", default=None, help="write the JSON here")
  a = p.parse_args(argv)
  r = measure(a.batch)
  print(json.dumps(r))
  print("| step | flops | temp MiB |\n|---|---:|---:|")
  for name in ("without", "with"):
    print(f"| {name} diagnostics | {r[name]['flops']:.4g} | {r[name]['temp_bytes'] / 2**20:.1f} |")
  print(
    f"diagnostics cost {r['extra_flops_percent']:.3f} % of the step's flops "
    f"({r['kernels']} kernels, batch {r['batch']}, seq {r['seq']})"
  )
  if a.out:
    with open(a.out, "w", encoding="utf-8") as f:
      json.dump(r, f, indent=1)
  return r


if __name__ == "__main__":
  main()
