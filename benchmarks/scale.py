#!/usr/bin/env python
"""Pod scale without a pod: AOT-compiled Llama-3 8B / 70B DeLoRA steps on simulated meshes.

The parameters are abstract (``jax.ShapeDtypeStruct`` with ``NamedSharding``s,
nothing allocated), the mesh is made of simulated CPU devices, and the donated
train step is only lowered and compiled. XLA's SPMD partitioner then gives the
per-device program: its memory (``memory_analysis()``) and the collectives it
runs (read from the HLO, ``hlo_collectives.py``), for DeLoRA, the harness's
LoRA (``bench.py``'s ``lora`` mode) and the frozen base on the same mesh.

With ``--quantize nf4|int8|int4`` (and ``--tile-size``) the seven projections' base kernels are
stored quantized (``Rule(quantize=...)`` on the abstract params): ``delora`` is then QDeLoRA,
``lora`` the harness's LoRA on the same quantized base (QLoRA), and ``delora_bf16`` the DeLoRA
step on the bf16 base to compare with; the frozen base's bytes are reported as compiled and at
their real widths (XLA:CPU stores a 4-bit entry in a byte, TPU and GPU two to a byte).

  python benchmarks/scale.py --config 8b --mesh 256,32x8 --out benchmarks/results/scale_cpu_8b.json
  python benchmarks/scale.py --config 70b --mesh 32x8 --quantize nf4 --tile-size 64 \
    --out benchmarks/results/scale_cpu_70b_nf4.json
  python benchmarks/scale.py --config tiny --mesh 8,4x2 --seq 36     # CI: tests/test_scale.py, 4x2 only

The device count is set from ``--mesh`` before jax is imported (a mesh of N
devices needs ``--xla_force_host_platform_device_count`` >= N).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

MODES = ("delora", "lora", "frozen")  # the default
ALL_MODES = (*MODES, "delora_bf16")
QUANTIZED_MODES = ("delora", "lora", "delora_bf16")  # the default with --quantize
SCHEMES = ("nf4", "int8", "int4")
CONFIGS = {  # Hugging Face Llama-3 shapes (rope_theta 500000, rms_norm_eps 1e-5)
  "8b": dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
  ),
  "70b": dict(
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
  ),
  # CI: sizes chosen so that no activation (tokens x features) has a kernel's shape.
  "tiny": dict(
    vocab_size=136,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
  ),
}


def parse_mesh(text: str) -> tuple[int, ...]:
  """``"256"`` -> ``(256,)`` (FSDP), ``"32x8"`` -> ``(32, 8)`` (FSDP x TP)."""
  try:
    shape = tuple(int(n) for n in text.lower().split("x"))
  except ValueError:
    shape = ()
  if not 1 <= len(shape) <= 2 or min(shape) < 1:
    raise argparse.ArgumentTypeError(
      f"--mesh: {text!r} is not a mesh shape; expected FSDP 'N' or FSDP x TP 'NxM', e.g. 256 or 32x8."
    )
  return shape


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="8b", choices=sorted(CONFIGS))
  p.add_argument(
    "--mesh", default="256,32x8", help="comma-separated mesh shapes: N = FSDP over N devices, NxM = FSDP N x TP M"
  )
  p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: the config's)")
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument(
    "--batch", type=int, default=None, help="global batch (default: the FSDP axis size, one sequence per FSDP shard)"
  )
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--lam", type=float, default=15.0)
  p.add_argument(
    "--modes",
    default=None,
    help=f"comma-separated subset of {ALL_MODES} (default: {','.join(MODES)}; with --quantize: "
    f"{','.join(QUANTIZED_MODES)})",
  )
  p.add_argument("--quantize", default=None, choices=SCHEMES, help="store the projections' base kernels quantized")
  p.add_argument("--tile-size", type=int, default=None, help="with --quantize: one scale per this many inputs")
  p.add_argument("--out", default=None, help="write the JSON results here")
  p.add_argument(
    "--dump",
    default=None,
    metavar="DIR",
    help="dump XLA's buffer assignment of each step here and report the temp heap's live peak and fragmentation",
  )
  p.add_argument(
    "--table",
    default=None,
    metavar="JSON",
    help="print the tables of an earlier run's JSON and exit (compiles nothing)",
  )
  args = p.parse_args(argv)
  try:
    args.meshes = [parse_mesh(m) for m in args.mesh.split(",") if m.strip()]
  except argparse.ArgumentTypeError as e:
    p.error(str(e))
  if args.modes is None:
    args.modes = ",".join(QUANTIZED_MODES if args.quantize else MODES)
  args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in args.modes if m not in ALL_MODES]
  if bad or not args.modes:
    p.error(f"--modes: unknown {bad}; expected a subset of {list(ALL_MODES)}")
  if args.tile_size is not None and not args.quantize:
    p.error(f"--tile-size {args.tile_size} needs --quantize (one of {list(SCHEMES)})")
  if args.quantize and "frozen" in args.modes:
    p.error("--modes: frozen (the bf16 frozen-base step) does not take --quantize; compare with delora_bf16")
  return args


def set_device_count(n: int) -> None:
  """Asks XLA for ``n`` simulated host devices; must run before jax is imported."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  _args = parse()
  if not _args.table:
    set_device_count(max(math.prod(m) for m in _args.meshes))

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import bench  # noqa: E402  (the harness's LoRA, loss and train step)
import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import hlo_collectives  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import delora_jax as dj  # noqa: E402
from delora_jax import _tree  # noqa: E402
from delora_jax._sharding import kernel_specs  # noqa: E402
from delora_jax.models import Llama, LlamaConfig  # noqa: E402
from delora_jax.models.llama import RMSNorm  # noqa: E402

# Where each parameter lies (scanned layers: leading layer axis unsplit). Kernels are FSDP-split
# along the hidden axis and tensor-parallel (Megatron) along heads / intermediate / vocab.
SPECS = (
  (r"embed_tokens/embedding", ("tp", "fsdp")),
  (r"layers/self_attn/[qkv]_proj/kernel", (None, "fsdp", "tp")),
  (r"layers/self_attn/o_proj/kernel", (None, "tp", "fsdp")),
  (r"layers/mlp/(gate|up)_proj/kernel", (None, "fsdp", "tp")),
  (r"layers/mlp/down_proj/kernel", (None, "tp", "fsdp")),
  (r"layers/.*/scale", (None, "fsdp")),
  (r"norm/scale", ("fsdp",)),
  (r"lm_head/kernel", ("fsdp", "tp")),
)


def make_mesh(shape: tuple[int, ...]) -> Mesh:
  n = math.prod(shape)
  if jax.device_count() < n:
    raise SystemExit(
      f"scale: mesh {shape} needs {n} devices, jax sees {jax.device_count()}; run "
      f"with XLA_FLAGS=--xla_force_host_platform_device_count={n} (the CLI sets it)."
    )
  names = ("fsdp", "tp")[: len(shape)]
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def spec_for(path: str, mesh: Mesh) -> P:
  for pattern, entries in SPECS:
    if re.fullmatch(pattern, path):
      return P(*(e if e in mesh.axis_names else None for e in entries))
  raise ValueError(f"scale: no sharding rule for parameter {path!r}; add one to SPECS.")


def llama(config: str, layers: int | None = None) -> Llama:
  shape = dict(CONFIGS[config], **({} if layers is None else {"num_hidden_layers": layers}))
  cfg = LlamaConfig(
    **shape, scan_layers=True, remat=True, attention="blocked", dtype="bfloat16", param_dtype="bfloat16"
  )
  return Llama(cfg)


def abstract_params(model: Llama, mesh: Mesh):
  """The base params as ShapeDtypeStructs carrying their NamedShardings (nothing allocated)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return _tree.map_leaves(
    lambda p, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec_for(p, mesh))), shapes
  )


def sharding_of(tree):
  return jax.tree.map(lambda s: s.sharding, tree)


def delora_rules(cfg, args, quantize: bool) -> dict:
  """``bench.py``'s DeLoRA rules (the seven projections), storing the base as ``--quantize`` and
  ``--tile-size`` say if ``quantize``."""
  rules = bench.delora_rules(cfg, args.rank, args.lam)
  if not (quantize and args.quantize):
    return rules
  return {p: dataclasses.replace(r, quantize=args.quantize, tile_size=args.tile_size) for p, r in rules.items()}


def quantized_base(params, cfg, args):
  """``params`` with the seven projections' kernels stored as QDeLoRA's abstract wrap stores them
  (``QArray``s of ShapeDtypeStructs whose values and scales carry the shardings
  ``delora_jax.shardings`` derives): QLoRA's frozen base is exactly QDeLoRA's."""
  tree = dj.wrap(params, delora_rules(cfg, args, True), key=jax.random.key(1))
  return _tree.map_kernels(lambda _, k: k.w, tree)


def lora_abstract(params, rank: int, mesh: Mesh):
  """The harness's LoRA factors for the seven projections, sharded by the rule DeLoRA's a and b
  follow (``delora_jax._sharding.kernel_specs``), so both compare on one layout."""
  plain = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), params)
  shapes = jax.eval_shape(lambda p, k: bench.lora_init(p, rank, k), plain, jax.random.key(1))

  def place(path, s):
    kernel_path = re.sub(r"lora_[ab]$", "kernel", path)
    w = params_flat[kernel_path]
    specs = kernel_specs(kernel_path, w.shape, w.sharding.spec, (-2,), (-1,), dict(mesh.shape))
    spec = specs["a"] if path.endswith("lora_a") else specs["b"]
    return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec))

  params_flat = dict(zip(*_tree.flatten(params)[:2]))
  return _tree.map_leaves(place, shapes)


def batch_sharded(mesh: Mesh):
  """An interceptor that keeps the residual stream split over the batch (``fsdp``) at every
  RMSNorm input, as pod training code does with sharding constraints. Without it XLA may
  let the activations follow the embedding table's split hidden axis instead: replicated
  tokens and activation all-reduces (in every mode; the frozen step escapes it only
  through its batch-split offset)."""
  sharding = NamedSharding(mesh, P("fsdp"))

  def intercept(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, RMSNorm):
      args = (jax.lax.with_sharding_constraint(args[0], sharding), *args[1:])
    return next_fun(*args, **kwargs)

  return intercept


def build(mode: str, model: Llama, params, tokens, args, mesh: Mesh):
  """``(loss_fn, trainable, frozen, tx)`` with abstract, sharded trainable and frozen trees."""
  loss_fn, trainable, frozen, tx = _build(mode, model, params, tokens, args, mesh)

  def constrained(*a):
    with nn.intercept_methods(batch_sharded(mesh)):
      return loss_fn(*a)

  return constrained, trainable, frozen, tx


def _build(mode: str, model: Llama, params, tokens, args, mesh: Mesh):
  cfg = model.config
  adamw = optax.adamw(bench.LR, weight_decay=bench.WEIGHT_DECAY)
  if mode == "frozen":  # bench.py's frozen base: gradient w.r.t. a zero embedding offset only

    def loss(t, f, x):
      emb = model.apply({"params": f}, x, method=Llama.embed)
      return bench.xent(model.apply({"params": f}, inputs_embeds=emb + t["embed_offset"]), x)

    delta = jax.ShapeDtypeStruct(
      (*tokens.shape, cfg.hidden_size), jnp.dtype(cfg.dtype), sharding=NamedSharding(mesh, P("fsdp"))
    )
    return loss, {"embed_offset": delta}, params, adamw
  if mode == "lora":

    def loss(t, f, x):
      with nn.intercept_methods(bench.lora_interceptor(1.0, True, "joined")):
        return bench.xent(model.apply({"params": bench.deep_merge(f, t)}, input_ids=x), x)

    frozen = quantized_base(params, cfg, args) if args.quantize else params
    return loss, lora_abstract(params, args.rank, mesh), frozen, adamw
  tree = dj.wrap(params, delora_rules(cfg, args, mode == "delora"), key=jax.random.key(1))
  trainable, frozen = dj.split(tree)
  tx = dj.optimizer(optax.adamw, learning_rate=bench.LR, weight_decay=bench.WEIGHT_DECAY)

  def loss(t, f, x):
    return bench.xent(dj.apply(model, {"params": dj.combine(t, f)}, x, strict=True), x)

  return loss, trainable, frozen, tx


def _param_of(path: str, shape, params: dict):
  """The parameter an optimizer-state leaf mirrors (its path ends with the parameter's), or None."""
  for p, leaf in params.items():
    if (path == p or path.endswith("/" + p)) and tuple(shape) == tuple(leaf.shape):
      return leaf
  return None


def state_shardings(opt_abstract, trainable, replicated):
  """The optimizer state's shardings: a leaf that mirrors a parameter (AdamW's moments) is
  split as that parameter is, everything else (step counts) is replicated."""
  params = dict(zip(*_tree.flatten(trainable, is_leaf=None)[:2]))
  paths, leaves, treedef = _tree.flatten(opt_abstract, is_leaf=None)
  out = []
  for path, leaf in zip(paths, leaves):
    p = _param_of(path, leaf.shape, params)
    out.append(replicated if p is None else p.sharding)
  return treedef.unflatten(out)


def opt_state_check(compiled, opt_abstract, trainable) -> dict:
  """Per-device and global optimizer-state bytes as compiled, and any moment of a split
  parameter that the compiled step holds replicated."""
  params = dict(zip(*_tree.flatten(trainable, is_leaf=None)[:2]))
  paths, leaves, _ = _tree.flatten(opt_abstract, is_leaf=None)
  shardings = jax.tree.leaves(compiled.input_shardings[0][0][1])
  per_device = total = 0
  replicated = []
  for path, leaf, sh in zip(paths, leaves, shardings):
    size = jnp.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * size
    per_device += math.prod(sh.shard_shape(leaf.shape)) * size
    p = _param_of(path, leaf.shape, params)
    if (
      p is not None and len(p.sharding.device_set) > 1 and not p.sharding.is_fully_replicated and sh.is_fully_replicated
    ):
      replicated.append(path)
  return dict(bytes_per_device=per_device, bytes_global=total, moments_replicated_not_split=replicated)


def heap(dump: Path) -> dict:
  """The temp heap of the step dumped to ``dump`` (``--dump``): ``extent`` (the bytes
  ``memory_analysis()`` reports as temp) and ``live_peak``, the most bytes live at one point of
  the schedule (overlapping buffers counted once; ``None`` where XLA writes no live ranges).
  Their difference is what the heap packing leaves unused (fragmentation), not any buffer of
  the program. Reads XLA:CPU's dump files."""
  ba = next(dump.glob("*jit_step*after_optimizations-buffer-assignment.txt"))
  values, temp, extent = [], False, 0
  for line in ba.read_text().splitlines():
    if line.startswith("allocation"):
      temp = "preallocated-temp" in line
      extent = int(re.search(r"size (\d+)", line).group(1)) if temp else extent
    elif temp and (m := re.match(r"\s*value: <\d+ (\S+?)(?:\{\})? @\d+> \(size=(\d+),offset=(\d+)\)", line)):
      values.append((m.group(1), int(m.group(2)), int(m.group(3))))
  ranges_file = ba.with_name(ba.name.replace("buffer-assignment", "live-range"))
  if not ranges_file.exists():  # older XLA (jax 0.8) writes no live ranges
    return dict(extent=extent, live_peak=None, values_without_range=len(values))
  text = ranges_file.read_text()
  ranges = {n: (int(a), int(b)) for n, a, b in re.findall(r"^\s+(\S+?)(?:\{\})?:(\d+)-(\d+)$", text, re.M)}
  live = [(*ranges[n], o, o + size) for n, size, o in values if n in ranges]
  peak = 0
  for t in sorted({start for start, *_ in live}):  # the live bytes only grow where a buffer starts
    total, end = 0, -1
    for lo, hi in sorted((lo, hi) for a, b, lo, hi in live if a <= t <= b):
      total += max(0, hi - max(lo, end))
      end = max(end, hi)
    peak = max(peak, total)
  return dict(extent=extent, live_peak=peak, values_without_range=len(values) - len(live))


def _bits(dtype) -> int:
  dt = jnp.dtype(dtype)
  if jnp.issubdtype(dt, jnp.integer):
    return jnp.iinfo(dt).bits
  return jnp.finfo(dt).bits if jnp.issubdtype(dt, jnp.floating) else 8 * dt.itemsize


def shard_bytes(leaves, shardings) -> dict:
  """Per-device bytes of abstract arrays under ``shardings``: ``packed``, each dtype at its own
  width (4-bit entries two to a byte, as TPU and GPU store them and as XLA's ``memory_analysis()``
  counts them, on CPU too), and ``cpu_runtime``, what the XLA:CPU runtime allocates (a whole byte
  per 4-bit entry: ``on_device_size_in_bytes``)."""
  packed = cpu = 0
  for leaf, sh in zip(jax.tree.leaves(leaves), jax.tree.leaves(shardings)):
    n = math.prod(sh.shard_shape(leaf.shape))
    cpu += n * jnp.dtype(leaf.dtype).itemsize
    packed += -(-n * _bits(leaf.dtype) // 8)
  return dict(packed=packed, cpu_runtime=cpu)


def compile_mode(mode: str, model: Llama, params, args, mesh: Mesh, batch: int) -> dict:
  tokens = jax.ShapeDtypeStruct((batch, args.seq), jnp.int32, sharding=NamedSharding(mesh, P("fsdp")))
  t0 = time.perf_counter()
  loss_fn, trainable, frozen, tx = build(mode, model, params, tokens, args, mesh)
  replicated = NamedSharding(mesh, P())
  opt_abstract = jax.eval_shape(tx.init, trainable)
  opt_sh = state_shardings(opt_abstract, trainable, replicated)
  train_sh = sharding_of(trainable)
  state_sh = (train_sh, opt_sh)
  step = jax.jit(
    bench.train_step(loss_fn, tx),
    donate_argnums=0,
    in_shardings=(state_sh, sharding_of(frozen), tokens.sharding),
    out_shardings=(state_sh, replicated),
  )
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    dump = Path(args.dump, "x".join(map(str, mesh.devices.shape)), mode) if args.dump else None
    options = dict(xla_dump_to=str(dump), xla_dump_hlo_module_re="jit_step") if dump else None
    compiled = step.lower((trainable, opt_abstract), frozen, tokens).compile(compiler_options=options)
  compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  mem = dict(
    argument=m.argument_size_in_bytes,
    output=m.output_size_in_bytes,
    temp=m.temp_size_in_bytes,
    alias=m.alias_size_in_bytes,
  )
  mem["total"] = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
  # The arguments from their shardings (memory_analysis() counts 4-bit entries packed), and the frozen
  # part (not donated: base kernels or their values and scales, w_norm, norms, embeddings) at both widths.
  mem["argument_from_shardings"] = shard_bytes(
    ((trainable, opt_abstract), frozen, tokens), compiled.input_shardings[0]
  )["packed"]
  base = shard_bytes(frozen, sharding_of(frozen))
  mem["frozen"], mem["frozen_cpu_runtime"] = base["packed"], base["cpu_runtime"]
  mem["total_cpu_runtime"] = mem["total"] - base["packed"] + base["cpu_runtime"]
  coll = hlo_collectives.collectives(compiled.as_text())
  n_train = int(sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)))
  if dump:
    mem["heap"] = heap(dump)
  return dict(
    mode=mode,
    memory_bytes=mem,
    collectives=coll["by_kind"],
    unknown_trip_loops=coll["unknown_trip_loops"],
    compile_s=compile_s,
    trainable_params=n_train,
    opt_state=opt_state_check(compiled, opt_abstract, trainable),
    _ops=coll["ops"],
  )


def kernel_shapes(params, mesh: Mesh, rank: int) -> set[tuple[int, ...]]:
  """Shapes in which a frozen kernel can be gathered: its per-layer ``(in, out)``, transposed
  or with the layer axis, any axis divided by a mesh axis size (a partial gather), leaving
  out shapes with an axis of at most ``2 * rank`` (those of the adapters' own buffers)."""
  sizes = sorted({1, *mesh.shape.values(), math.prod(mesh.shape.values())})
  out = set()
  for path, s in zip(*_tree.flatten(params)[:2]):
    if not re.search(r"kernel$|embedding$", path):
      continue
    *stack, n_in, n_out = s.shape
    for di in sizes:
      for do in sizes:
        m = (n_in // di, n_out // do)
        if n_in % di or n_out % do or min(m) <= 2 * rank:
          continue
        out |= {m, m[::-1]}
        out |= {(*stack, *m)} if stack else set()
  return out


def kernel_gathers(ops: list[dict], shapes: set) -> dict[str, int]:
  """``{"dtype[dims]": times per step}`` of the all-gathers whose result has a frozen kernel's
  shape: how often the step moves each kernel. (An all-reduce or reduce-scatter of that
  shape would be a dense kernel gradient, but tensor parallelism's activation reductions
  can have the same shape; a dense gradient shows up in the all-reduce bytes against LoRA.)"""
  out: dict[str, int] = {}
  for op in ops:
    if op["kind"] != "all-gather":
      continue
    for dt, dims in op["result"]:
      if dims in shapes:
        key = f"{dt}[{','.join(map(str, dims))}]"
        out[key] = out.get(key, 0) + op["times"]
  return out


def compare(res: dict, kshapes: set) -> dict:
  """The issue's figures for one mesh: ratios to LoRA and the frozen base, kernel moves."""
  moves = {m: kernel_gathers(r.pop("_ops"), kshapes) for m, r in res.items()}
  for m, r in res.items():
    r["kernel_gathers"] = moves[m]
  out = {}
  pairs = (
    ("delora", "lora"),
    ("delora", "frozen"),
    ("lora", "frozen"),
    ("delora", "delora_bf16"),
    ("lora", "delora_bf16"),
  )
  for a, b in pairs:
    if a in res and b in res:
      ra, rb = res[a], res[b]
      out[f"{a}/{b}"] = dict(
        memory=ra["memory_bytes"]["total"] / rb["memory_bytes"]["total"],
        **{
          f"{k}_bytes": _ratio(ra["collectives"][k]["bytes"], rb["collectives"][k]["bytes"])
          for k in hlo_collectives.KINDS
        },
        collective_bytes=_ratio(_total(ra), _total(rb)),
      )
      if all(r["memory_bytes"].get("heap", {}).get("live_peak") for r in (ra, rb)):  # --dump: temp as its live peak
        out[f"{a}/{b}"]["memory_live_peak"] = _live_total(ra) / _live_total(rb)
  checks = {}
  if "delora" in res and "lora" in res:
    r = out["delora/lora"]
    checks["memory_ratio_le_1.01"] = r["memory"] <= 1.01
    checks["collective_bytes_ratio_le_1.01"] = all(
      res["delora"]["collectives"][k]["bytes"] <= 1.01 * res["lora"]["collectives"][k]["bytes"]
      for k in hlo_collectives.KINDS
    )
  if "frozen" in res:
    for m in ("delora", "lora"):
      if m in res:
        extra = {k: (n, moves["frozen"].get(k, 0)) for k, n in moves[m].items() if n > moves["frozen"].get(k, 0)}
        checks[f"{m}_gathers_no_kernel_more_often_than_frozen"] = not extra
        if extra:
          checks[f"{m}_extra_kernel_gathers"] = extra
  if "delora" in res:
    checks["delora_opt_state_split_where_params_are"] = not res["delora"]["opt_state"]["moments_replicated_not_split"]
  return dict(ratios=out, checks=checks)


def _live_total(r: dict) -> int:
  """Total memory per device with the temp heap's live peak in place of its extent."""
  mem = r["memory_bytes"]
  return mem["total"] - mem["temp"] + mem["heap"]["live_peak"]


def _total(r: dict) -> int:
  return sum(v["bytes"] for v in r["collectives"].values())


def _ratio(a: float, b: float) -> float | None:
  return a / b if b else (1.0 if not a else None)


def table(data: dict) -> str:
  gib = 2.0**20
  kinds = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
  lines = [
    "| mesh | mode | args MiB | temp MiB | out MiB | total MiB | " + " | ".join(f"{k} MiB" for k in kinds) + " |",
    "|---|---|---:|---:|---:|---:|" + "---:|" * len(kinds),
  ]
  for mesh, entry in data["meshes"].items():
    for mode, r in entry["results"].items():
      mem, c = r["memory_bytes"], r["collectives"]
      lines.append(
        f"| {mesh} | {mode} | {mem['argument'] / gib:.1f} | {mem['temp'] / gib:.1f} | "
        f"{mem['output'] / gib:.1f} | {mem['total'] / gib:.1f} | "
        + " | ".join(f"{c[k]['bytes'] / gib:.1f}" for k in kinds)
        + " |"
      )
  lines += [
    "",
    "| mesh | delora/lora memory | (live peak) | delora/lora collective bytes | checks |",
    "|---|---:|---:|---:|---|",
  ]
  for mesh, entry in data["meshes"].items():
    if "delora/lora" not in entry["ratios"]:
      continue
    r = entry["ratios"]["delora/lora"]
    checks = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in entry["checks"].items() if isinstance(v, bool))
    live = f"{r['memory_live_peak']:.4f}" if "memory_live_peak" in r else "-"
    lines.append(
      f"| {mesh} | {r.get('memory', float('nan')):.4f} | {live} | {r.get('collective_bytes') or float('nan'):.4f} "
      f"| {checks} |"
    )
  if any("delora_bf16" in e["results"] for e in data["meshes"].values()):
    lines += ["", *quantized_table(data)]
  return "\n".join(lines)


def quantized_table(data: dict) -> list[str]:
  """Per-chip memory of each mode (``--quantize``): ``memory_analysis()``'s, which counts 4-bit
  entries packed two to a byte as TPU and GPU store them, and with the frozen arguments at the
  byte per 4-bit entry the XLA:CPU runtime allocates."""
  mib = 2.0**20
  q, tile = data["meta"].get("quantize"), data["meta"].get("tile_size")
  lines = [
    f"Base stored {q}{f', tile {tile}' if tile else ', per channel'} (delora = QDeLoRA, lora = QLoRA on the same "
    "base, delora_bf16 = DeLoRA on the bf16 base). Per chip, MiB; 'packed' = memory_analysis() (4-bit two to a "
    "byte, as TPU/GPU store it), 'CPU runtime' = a byte per 4-bit entry of the frozen arguments:",
    "",
    "| mesh | mode | frozen (packed) | frozen (CPU runtime) | args | temp | total (packed) | total (CPU runtime) "
    "| total / delora_bf16 |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for mesh, entry in data["meshes"].items():
    ref = entry["results"].get("delora_bf16", {}).get("memory_bytes", {}).get("total")
    for mode, r in entry["results"].items():
      m = r["memory_bytes"]
      if "frozen" not in m:
        continue
      ratio = f"{m['total'] / ref:.4f}" if ref else "-"
      lines.append(
        f"| {mesh} | {mode} | {m['frozen'] / mib:.1f} | {m['frozen_cpu_runtime'] / mib:.1f} | "
        f"{m['argument'] / mib:.1f} | {m['temp'] / mib:.1f} | {m['total'] / mib:.1f} | "
        f"{m['total_cpu_runtime'] / mib:.1f} | {ratio} |"
      )
  return lines


def run(argv=None) -> dict:
  """Compiles every mode on every mesh; returns (and with ``--out`` writes) the figures."""
  args = parse(argv)
  if args.table:
    data = json.loads(Path(args.table).read_text())
    print(table(data))
    return data
  model = llama(args.config, args.layers)
  meta = dict(
    config=args.config,
    model=dataclasses.asdict(model.config),
    seq=args.seq,
    rank=args.rank,
    lam=args.lam,
    modes=args.modes,
    quantize=args.quantize,
    tile_size=args.tile_size,
    jax=jax.__version__,
    flax=flax.__version__,
    python=platform.python_version(),
    backend=jax.default_backend(),
    devices=jax.device_count(),
    command="python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
  )
  data = dict(meta=meta, meshes={})
  for shape in args.meshes:
    mesh = make_mesh(shape)
    batch = args.batch or shape[0]
    params = abstract_params(model, mesh)
    res = {}
    for mode in args.modes:
      res[mode] = compile_mode(mode, model, params, args, mesh, batch)
      print(json.dumps({k: v for k, v in res[mode].items() if k != "_ops"}), flush=True)
    name = "x".join(map(str, shape))
    data["meshes"][name] = dict(
      mesh=dict(mesh.shape), batch=batch, results=res, **compare(res, kernel_shapes(params, mesh, args.rank))
    )
  print("\n" + table(data), flush=True)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1))
  return data


if __name__ == "__main__":
  run()
