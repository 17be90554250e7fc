"""The MaxText drop-in vs MaxText's own LoRA on a simulated 4-device FSDP mesh (Python >= 3.12, MaxText 0.2.5).

The tiny llama2 decoder of tests/test_maxtext.py (2 layers, embed 64, float32), scanned (MaxText's
default ``scan_layers=True, param_scan_axis=1``) and unrolled, its weights sharded from their logical
axes as MaxText shards them (``ici_fsdp_parallelism=4``, ``logical_axis_rules``), batch 4 split over
the mesh. DeLoRA: ``delora_jax.integrations.maxtext.apply_delora_to_model`` and
``delora_jax.optimizer(optax.adamw)``; LoRA: MaxText's ``lora_utils.apply_lora_to_model`` (qwix, its
adapters replicated) and ``optax.adamw``; rank 8 on the same 7 projections per layer (MaxText's default
module path), one train step in MaxText's split/merge style. XLA's figures of the compiled step:
``cost_analysis()`` flops, ``memory_analysis()`` temp bytes, and the bytes its collectives move per
step (benchmarks/hlo_collectives.py, loops counted by trip count). Targets: flops <= 1.02x, temp <=
1.05x, collective bytes <= 1.01x LoRA's. Prints a table and JSON:

  python benchmarks/maxtext_fsdp.py --out benchmarks/results/maxtext_fsdp_cpu.json
  python benchmarks/maxtext_fsdp.py --emb 1024 --out benchmarks/results/maxtext_fsdp_emb1024_cpu.json

At embed 64 and rank 8 a factor is 1/8 of its kernel, so the gathers of the sharded factors weigh
as much as a fair part of the weights'; at embed 1024 (1/128) they are small beside them.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from flax.linen import partitioning  # noqa: E402
from hlo_collectives import collectives  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import delora_jax  # noqa: E402
import delora_jax.nnx  # noqa: E402,F401
from delora_jax.integrations.maxtext import apply_delora_to_model  # noqa: E402

RANK, BATCH = 8, 4


def shard_like_maxtext(model, mesh, cfg):
  """Places every Variable as its logical axes resolve under the config's rules (what MaxText's
  from_pretrained gives a trainer)."""
  state = nnx.state(model)
  specs = nnx.get_partition_spec(state)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, cfg.logical_axis_rules)
  nnx.update(model, jax.device_put(state, shardings))


def figures(step, *args) -> dict:
  compiled = jax.jit(step).lower(*args).compile()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  coll = collectives(compiled.as_text())
  return {
    "flops": float(ca["flops"]),
    "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
    "collective_bytes": int(sum(v["bytes"] for v in coll["by_kind"].values())),
    "collectives": {k: v["count"] for k, v in coll["by_kind"].items()},
  }


def row(scan: bool, size: dict) -> dict:
  from maxtext.utils import lora_utils, maxtext_utils  # noqa: PLC0415

  from tests import test_maxtext as tm  # noqa: PLC0415

  out = {}
  for kind in ("delora", "delora_replicated", "lora"):
    model, _ = tm.build(scan, ici_fsdp_parallelism=4, **size)
    lora = {"enable_lora": True, "lora_rank": RANK, "lora_alpha": 2.0 * RANK}
    cfg = tm.config(scan, ici_fsdp_parallelism=4, lora=lora, **size)
    mesh = maxtext_utils.get_mesh_from_config(cfg)
    with jax.set_mesh(mesh), partitioning.axis_rules(cfg.logical_axis_rules):
      shard_like_maxtext(model, mesh, cfg)
      if kind.startswith("delora"):
        adapted = apply_delora_to_model(model, mesh, cfg, shard_adapters=kind == "delora")
        wrt, opt = delora_jax.nnx.DeloraParam, delora_jax.optimizer(optax.adamw, learning_rate=1e-3)
      else:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore", DeprecationWarning)
          adapted = lora_utils.apply_lora_to_model(model, mesh, cfg)
        wrt, opt = nnx.LoRAParam, optax.adamw(1e-3)
      # qwix's LoRA rebuilds the model with its base weights unsharded: place everything again from
      # the logical axes (DeLoRA's adapters carry theirs; MaxText's LoRA params say replicated).
      shard_like_maxtext(adapted, mesh, cfg)
      args = jax.device_put(tm.inputs(b=BATCH), NamedSharding(mesh, PartitionSpec("fsdp", None)))
      graphdef, train, rest = nnx.split(adapted, wrt, ...)

      def step(train, opt_state, rest, args, graphdef=graphdef, opt=opt):
        # The frozen weights and the batch are arguments (sharded), not constants folded into the step.
        def loss(train):
          logits = tm.call(tm.fresh(nnx.merge(graphdef, train, rest, copy=True)), args)
          return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], args[0][:, 1:]).mean()

        value, g = jax.value_and_grad(loss)(train)
        upd, opt_state = opt.update(g, opt_state, train)
        return optax.apply_updates(train, upd), opt_state, value

      fig = figures(step, train, opt.init(train), rest, args)
      fig["trainable"] = int(sum(x.size for x in jax.tree.leaves(train)))
      fig["trainable_bytes_per_device"] = int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(train)))
      out[kind] = fig
  for k in ("flops", "temp_bytes", "collective_bytes"):
    out[k.replace("_bytes", "") + "_ratio"] = out["delora"][k] / max(out["lora"][k], 1)
    out[k.replace("_bytes", "") + "_ratio_replicated"] = out["delora_replicated"][k] / max(out["lora"][k], 1)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="write the JSON here too")
  parser.add_argument("--emb", type=int, default=64, help="embed size (heads of 16, mlp 2x): 64 is the tests' model")
  opts = parser.parse_args()
  size = {"base_emb_dim": opts.emb, "base_num_query_heads": opts.emb // 16, "base_num_kv_heads": opts.emb // 16}
  size["base_mlp_dim"] = 2 * opts.emb
  with jax.numpy_rank_promotion("allow"), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # MaxText's flax metadata
    rows = {"scanned": row(True, size), "unrolled": row(False, size)}
  print(
    f"{'layers':<10}{'adapters':<12}{'flops':>8}{'temp':>8}{'coll. bytes':>13}  {'adapter bytes/device (LoRA)':>28}"
  )
  for name, r in rows.items():
    for mode, sfx in (("sharded", ""), ("replicated", "_replicated")):
      per = f"{r['delora' + sfx]['trainable_bytes_per_device']} ({r['lora']['trainable_bytes_per_device']})"
      print(
        f"{name:<10}{mode:<12}{r['flops_ratio' + sfx]:>8.4f}{r['temp_ratio' + sfx]:>8.4f}"
        f"{r['collective_ratio' + sfx]:>13.4f}  {per:>28}"
      )
  text = json.dumps(
    {"devices": 4, "mesh": "fsdp=4", "rank": RANK, "batch": BATCH, "size": size, "rows": rows}, indent=1
  )
  print(text)
  if opts.out:
    with open(opts.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
