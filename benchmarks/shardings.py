#!/usr/bin/env python
"""What the adapters' shardings cost, as compiled: ``delora_jax.shardings`` against the two plain rules.

A two-layer MLP (``in -> hidden -> out``, GELU, DeLoRA on both kernels, AdamW through
``delora_jax.optimizer``), its donated train step compiled for 8 simulated CPU devices on each
mesh below, with the adapters laid out three ways:

- ``own-side``: ``a`` and ``w_norm`` split as ``w``'s input axis, ``b`` as its output axis, nothing
  else (what qwix does for LoRA);
- ``other-side``: as ``own-side``, but the factor of an unsplit side takes the other side's mesh
  axes (``delora_jax.shardings`` before issue 21, on every mesh);
- ``derived``: ``delora_jax.shardings`` (``other-side`` where ``w`` is split over the whole mesh,
  ``own-side`` where it is replicated over a mesh axis).

Per device: collectives (count and bytes, ``hlo_collectives.py``), temp and argument bytes and the
total (arguments + outputs + temps - donated aliases) from ``memory_analysis()``, and the temp
heap's live peak (``scale.heap``: the most bytes live at once; temp minus it is packing gaps).

  python benchmarks/shardings.py --out benchmarks/results/shardings_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import flax.linen as nn  # noqa: E402
import hlo_collectives  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import scale  # noqa: E402  (heap: the temp heap's live peak from XLA's dump)
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import delora_jax as dj  # noqa: E402

# name: (mesh shape, axis names, batch spec, (first kernel's spec, second kernel's spec), what it is)
MESHES = {
  "fsdp": ((8,), ("data",), P("data"), (P("data", None), P(None, "data")), "FSDP, kernels split on the embed side"),
  "tp": ((2, 4), ("data", "model"), P("data"), (P(None, "model"), P("model", None)), "data 2 x Megatron TP 4"),
  "fsdp-x-tp": (
    (2, 4),
    ("data", "model"),
    P("data"),
    (P("data", "model"), P("model", "data")),
    "FSDP 2 x TP 4, kernels split on both sides",
  ),
  "hsdp": (
    (2, 4),
    ("replica", "data"),
    P(("replica", "data")),
    (P("data", None), P(None, "data")),
    "replicas 2 x FSDP 4 (batch over both)",
  ),
  "tp-no-dp": ((8,), ("model",), P(), (P(None, "model"), P("model", None)), "TP 8, batch replicated"),
}
VARIANTS = ("own-side", "other-side", "derived")


class MLP(nn.Module):
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.hidden)(x))  # Dense_0: created first
    return nn.Dense(self.out)(h)


def layout(tree, mesh: Mesh, kspecs, variant: str):
  """The adapted tree's shardings, with the factors laid out as ``variant`` says."""
  base = {k: {"kernel": NamedSharding(mesh, s), "bias": NamedSharding(mesh, P())} for k, s in zip(tree, kspecs)}
  sh = dj.shardings(tree, base)
  if variant == "derived":
    return sh
  for node, (i, o) in zip(sh.values(), kspecs):
    if variant == "other-side":
      i, o = (o if i is None else i), (i if o is None else o)
    specs = {"a": P(i, None), "b": P(None, o), "w_norm": P(i)}
    node["kernel"] = node["kernel"].replace(**{f: NamedSharding(mesh, s) for f, s in specs.items()})
  return sh


def measure(mesh_name: str, variant: str, args) -> dict:
  shape, names, batch_spec, kspecs, _ = MESHES[mesh_name]
  mesh = Mesh(np.array(jax.devices()[: math.prod(shape)]).reshape(shape), names)
  n_in, n_hidden, n_out = args.widths
  model = MLP(n_hidden, n_out)
  x = jax.ShapeDtypeStruct((args.batch, n_in), jnp.float32, sharding=NamedSharding(mesh, batch_spec))
  y = jax.ShapeDtypeStruct((args.batch, n_out), jnp.float32, sharding=x.sharding)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, n_in)))["params"]
  tree = jax.eval_shape(lambda p: dj.wrap(p, {".*kernel": dj.Rule(args.rank)}), params)
  t_sh, f_sh = dj.split(layout(tree, mesh, kspecs, variant))
  trainable, frozen = dj.split(tree)
  opt = dj.optimizer(optax.adamw, learning_rate=1e-4)
  state = jax.eval_shape(opt.init, trainable)
  rep = NamedSharding(mesh, P())
  by_shape = {s.shape: h for s, h in zip(jax.tree.leaves(trainable), jax.tree.leaves(t_sh))}  # all differ
  s_sh = jax.tree.map(lambda s: by_shape.get(s.shape, rep), state)  # AdamW's moments as their adapters

  def step(t, s, f, x, y):
    def loss(t):
      return jnp.mean((dj.apply(model, {"params": dj.combine(t, f)}, x) - y) ** 2)

    value, g = jax.value_and_grad(loss)(t)
    u, s = opt.update(g, s, t)
    return optax.apply_updates(t, u), s, value

  fn = jax.jit(
    step,
    in_shardings=(t_sh, s_sh, f_sh, x.sharding, x.sharding),
    out_shardings=(t_sh, s_sh, rep),
    donate_argnums=(0, 1),
  )
  with warnings.catch_warnings(), tempfile.TemporaryDirectory() as dump:
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    options = dict(xla_dump_to=dump, xla_dump_hlo_module_re="jit_step")
    compiled = fn.lower(trainable, state, frozen, x, y).compile(compiler_options=options)
    live_peak = scale.heap(Path(dump))["live_peak"]
  kinds = hlo_collectives.collectives(compiled.as_text())["by_kind"]
  m = compiled.memory_analysis()
  return dict(
    collectives=sum(k["count"] for k in kinds.values()),
    collectives_by_kind={k: v["count"] for k, v in kinds.items() if v["count"]},
    collective_bytes=sum(k["bytes"] for k in kinds.values()),
    temp=m.temp_size_in_bytes,
    temp_live_peak=live_peak,
    argument=m.argument_size_in_bytes,
    total=m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes,
    first_a=str(t_sh["Dense_0"]["kernel"].a.spec),
    first_b=str(t_sh["Dense_0"]["kernel"].b.spec),
    second_a=str(t_sh["Dense_1"]["kernel"].a.spec),
    second_b=str(t_sh["Dense_1"]["kernel"].b.spec),
  )


def table(data: dict) -> str:
  kib = 1024
  lines = [
    "| mesh | layout | `a`, `b` of kernel 1 | `a`, `b` of kernel 2 | collectives | KiB moved | temp KiB (live peak) "
    "| total KiB |",
    "|---|---|---|---|---:|---:|---:|---:|",
  ]
  for mesh, rows in data["meshes"].items():
    for variant, r in rows.items():
      lines.append(
        f"| {mesh} | {variant} | `{r['first_a']}`, `{r['first_b']}` | `{r['second_a']}`, `{r['second_b']}` "
        f"| {r['collectives']} | {r['collective_bytes'] / kib:.0f} | {r['temp'] / kib:.0f} "
        f"({r['temp_live_peak'] / kib:.0f}) | {r['total'] / kib:.0f} |"
      )
  return "\n".join(lines)


def run(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--widths", default="256,1024,256", help="in,hidden,out of the MLP")
  p.add_argument("--batch", type=int, default=4096, help="global batch (abstract: nothing is allocated)")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--meshes", default=",".join(MESHES), help=f"comma-separated subset of {list(MESHES)}")
  p.add_argument("--out", default=None, help="write the JSON results here")
  args = p.parse_args(argv)
  args.widths = tuple(int(n) for n in args.widths.split(","))
  data = dict(
    meta=dict(
      widths=args.widths,
      batch=args.batch,
      rank=args.rank,
      jax=jax.__version__,
      python=platform.python_version(),
      backend=jax.default_backend(),
      command="python benchmarks/shardings.py " + " ".join(argv if argv is not None else sys.argv[1:]),
      meshes={
        k: dict(shape=v[0], axes=v[1], batch=str(v[2]), kernels=[str(s) for s in v[3]], what=v[4])
        for k, v in MESHES.items()
      },
    ),
    meshes={},
  )
  for name in args.meshes.split(","):
    data["meshes"][name] = {v: measure(name, v, args) for v in VARIANTS}
    print(json.dumps({name: data["meshes"][name]}), flush=True)
  print("\n" + table(data), flush=True)
  if args.out:
    Path(args.out).write_text(json.dumps(data, indent=1))
  return data


if __name__ == "__main__":
  run()
