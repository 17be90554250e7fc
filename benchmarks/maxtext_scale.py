"""MaxText at pod scale without a pod: the drop-in vs MaxText's own LoRA on Llama-3 8B / 70B (Python >= 3.12).

MaxText's own model code (``model_name=llama3-8b`` / ``llama3-70b``, its defaults: scanned layers at
``param_scan_axis=1``, ``remat_policy=full``), built abstractly (``create_nnx_abstract_model``: shapes and
the shardings MaxText derives from its logical axes, nothing allocated) on a simulated mesh of CPU devices
(``ici_fsdp_parallelism`` x ``ici_tensor_parallelism``). DeLoRA: ``apply_delora_to_model`` on the
abstract model (adapters sharded from the kernels' logical axes) and ``delora_jax.optimizer(adamw)``.
LoRA: MaxText's ``lora_utils.apply_lora_to_model`` (qwix) run under ``nnx.eval_shape`` (its hook
runs the model, so it needs a concrete or traced one), its adapters replicated as the hook places them
(``PartitionSpec()``), and ``optax.adamw``. Rank 16 on MaxText's default module path for llama3 (the
7 projections of every layer), bf16 weights and compute, one sequence of ``--seq`` tokens per FSDP shard.
One train step in MaxText's split/merge style is lowered and compiled; XLA's SPMD partitioner gives the
per-device program and ``memory_analysis()`` its memory per chip:

  python benchmarks/maxtext_scale.py --model llama3-8b --mesh 32x8 --out benchmarks/results/maxtext_scale_8b_cpu.json
  python benchmarks/maxtext_scale.py --model llama3-70b --mesh 32x8 --out benchmarks/results/maxtext_scale_70b_cpu.json

These are XLA:CPU's plans of the step, not TPU measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama3-8b", help="a MaxText model_name (configs/models/*.yml)")
  p.add_argument("--mesh", default="32x8", help="FSDPxTENSOR, e.g. 32x8 (256 simulated devices)")
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  try:
    a.fsdp, a.tensor = (int(n) for n in a.mesh.split("x"))
  except ValueError:
    p.error(f"--mesh must be FSDPxTENSOR such as 32x8; got {a.mesh!r}")
  return a


def main(argv=None) -> None:
  a = parse(argv)
  n = a.fsdp * a.tensor
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  warnings.simplefilter("ignore", DeprecationWarning)  # MaxText's and qwix's flax metadata

  import jax  # noqa: PLC0415
  import maxtext  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from flax.linen import partitioning  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  from maxtext.configs import pyconfig  # noqa: PLC0415
  from maxtext.utils import lora_utils, maxtext_utils, model_creation_utils, sharding  # noqa: PLC0415

  import delora_jax  # noqa: PLC0415
  import delora_jax.nnx  # noqa: PLC0415,F401
  from delora_jax.integrations.maxtext import apply_delora_to_model  # noqa: PLC0415

  base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
  cfg = pyconfig.initialize(
    ["maxtext_scale", base],
    model_name=a.model,
    hardware="cpu",
    skip_jax_distributed_system=True,
    ici_fsdp_parallelism=a.fsdp,
    ici_tensor_parallelism=a.tensor,
    per_device_batch_size=1.0 / a.tensor,  # one sequence per FSDP shard
    max_target_length=a.seq,
    dtype="bfloat16",
    weight_dtype="bfloat16",
    attention="dot_product",
    enable_checkpointing=False,
    run_name="maxtext_scale",
    lora={"enable_lora": True, "lora_rank": a.rank, "lora_alpha": 2.0 * a.rank},
  )
  mesh = maxtext_utils.get_mesh_from_config(cfg)
  batch = a.fsdp

  def placed(model):
    gd, st = nnx.split(model)
    shs = sharding.nnx_construct_named_sharding(st, mesh)
    return nnx.merge(gd, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), st, shs))

  def compiled(model, wrt, opt):
    graphdef, train, rest = nnx.split(model, wrt, ...)
    tok = jax.ShapeDtypeStruct((batch, a.seq), jax.numpy.int32, sharding=NamedSharding(mesh, P("fsdp", None)))

    def step(train, opt_state, rest, tok):
      def loss(train):
        m = nnx.merge(graphdef, train, rest, copy=True)
        pos = jax.numpy.broadcast_to(jax.numpy.arange(a.seq, dtype=jax.numpy.int32), tok.shape)
        logits = m(tok, pos, jax.numpy.ones_like(tok), enable_dropout=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]).mean()

      value, g = jax.value_and_grad(loss)(train)
      upd, opt_state = opt.update(g, opt_state, train)
      return optax.apply_updates(train, upd), opt_state, value

    t0 = time.perf_counter()
    c = jax.jit(step, donate_argnums=(0, 1)).lower(train, jax.eval_shape(opt.init, train), rest, tok).compile()
    mem = c.memory_analysis()

    def per_chip(tree) -> int:
      return sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(tree))

    return {
      "argument_bytes": int(mem.argument_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "total_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes)
      - int(mem.alias_size_in_bytes),
      "adapter_bytes_per_chip": int(per_chip(train)),
      "trainable_params": int(sum(x.size for x in jax.tree.leaves(train))),
      "compile_s": round(time.perf_counter() - t0, 1),
    }

  rows = {}
  with jax.set_mesh(mesh), partitioning.axis_rules(cfg.logical_axis_rules), jax.numpy_rank_promotion("allow"):
    create, abstract = model_creation_utils.create_nnx_abstract_model(cfg, mesh)
    adapted = apply_delora_to_model(abstract, mesh, cfg)
    rows["delora"] = compiled(
      adapted, delora_jax.nnx.DeloraParam, delora_jax.optimizer(optax.adamw, learning_rate=1e-4)
    )
    print("delora", rows["delora"], file=sys.stderr)
    lora = placed(nnx.eval_shape(lambda: lora_utils.apply_lora_to_model(create(), None, cfg)))
    rows["lora"] = compiled(lora, nnx.LoRAParam, optax.adamw(1e-4))
    print("lora", rows["lora"], file=sys.stderr)
  ratios = {k: rows["delora"][k] / max(rows["lora"][k], 1) for k in ("argument_bytes", "temp_bytes", "total_bytes")}
  doc = {
    "model": a.model,
    "mesh": {"fsdp": a.fsdp, "tensor": a.tensor, "devices": n},
    "seq": a.seq,
    "batch": batch,
    "rank": a.rank,
    "jax": jax.__version__,
    "rows": rows,
    "ratios": ratios,
  }
  text = json.dumps(doc, indent=1)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text + "\n")
  mib = 2.0**20
  print(f"\n| {a.model}, mesh {a.mesh} | args MiB | temp MiB | total MiB | adapters MiB/chip |")
  print("|---|---:|---:|---:|---:|")
  for k, r in rows.items():
    print(
      f"| {k} | {r['argument_bytes'] / mib:.1f} | {r['temp_bytes'] / mib:.1f} | {r['total_bytes'] / mib:.1f} "
      f"| {r['adapter_bytes_per_chip'] / mib:.2f} |"
    )


if __name__ == "__main__":
  main()
