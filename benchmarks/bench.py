#!/usr/bin/env python
"""Train-step benchmark on a Llama decoder: DeLoRA (factorised, merged) vs LoRA, full, frozen.

One process runs every mode's jitted AdamW step (next-token cross-entropy,
train state donated) and reports XLA's flops and compiled memory, the
trainable parameter count and the measured step time. See README.md.

  python benchmarks/bench.py                                  # CPU: small config, fp32
  python benchmarks/bench.py --config 1b --dtype bfloat16 --batch 4 --seq 1024 --scan   # GPU
  python benchmarks/bench.py --peft                           # + PEFT's CPU anchor, same call
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

import delora_jax  # noqa: E402
from delora_jax import _ops, _quant  # noqa: E402
from delora_jax.models import Llama, LlamaConfig  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("full", "frozen", "lora", "lora_plain", "delora_merged", "delora")
LR, WEIGHT_DECAY = 1e-4, 0.01  # torch.optim.AdamW's default decay, as in the PEFT anchors
PEER_CPU = "peer_peft_cpu.py"  # PEFT's CPU anchor, next to this file


def xent(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next-token cross-entropy (HF's shifted labels), float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), tokens[:, 1:]).mean()


# ------------------------------------------------------------------ LoRA baselines
# Factorised LoRA on the same seven projections: an interceptor adds
# ((x @ lora_a) @ lora_b) * alpha/r to each target nn.Dense. lora_a/lora_b sit
# next to the kernel in the params tree (so nn.scan slices them per layer);
# only they are differentiated. Two forms:
#   "joined" (mode lora): the same low-rank matmul primitive delora_jax.apply runs
#     (delora_jax._ops.lowrank: one custom-JVP op; on a single-device CPU one matmul
#     over [x | x@A] and [W; B]), so delora/lora isolates what DeLoRA's normalisation costs;
#   "plain" (mode lora_plain): the textbook y = x @ W + (x @ A) @ B, autodiff backward.
# A kernel stored quantized (a delora_jax._quant.QArray: scale.py --quantize) makes either form
# QLoRA: x contracted with the quantized base as delora_jax.apply does it (delora_jax._ops.qdense:
# int8 per channel on the int values, the output scaled; otherwise dequantized to the compute dtype,
# as qwix's weight-only QLoRA), plus the plain LoRA branch.
# Same compute dtype and accumulation as delora_jax in both.


def lora_init(params, rank: int, key: jax.Array, dtype=jnp.float32):
  """``{..., proj: {lora_a (*S, in, r) Kaiming-uniform, lora_b (*S, r, out) zeros}}``."""
  out = {}
  for i, (path, w) in enumerate(sorted(flax.traverse_util.flatten_dict(params).items())):
    if path[-1] == "kernel" and len(path) > 1 and path[-2] in TARGETS:
      *stack, n_in, n_out = w.shape
      bound = 1.0 / math.sqrt(n_in)
      out[path[:-1] + ("lora_a",)] = jax.random.uniform(
        jax.random.fold_in(key, i), (*stack, n_in, rank), dtype, -bound, bound
      )
      out[path[:-1] + ("lora_b",)] = jnp.zeros((*stack, rank, n_out), dtype)
  return flax.traverse_util.unflatten_dict(out)


def deep_merge(a: dict, b: dict) -> dict:
  """Union of two nested dicts with disjoint leaves."""
  out = dict(a)
  for k, v in b.items():
    out[k] = deep_merge(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def lora_interceptor(scaling: float, flatten: bool = True, form: str = "plain"):
  def intercept(next_fun, args, kwargs, context):
    mod = context.module
    if (
      context.method_name != "__call__"
      or not isinstance(mod, nn.Dense)
      or mod.scope is None
      or mod.name not in TARGETS
      or not mod.has_variable("params", "lora_a")
    ):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    a, b = mod.get_variable("params", "lora_a"), mod.get_variable("params", "lora_b")
    if scaling != 1.0:
      a = a * scaling  # folded into the (in, r) factor, as delora_jax folds its scales
    cdt = jnp.dtype(mod.dtype) if mod.dtype is not None else jnp.result_type(x, a)
    # Flatten the leading axes (base and branch): with (B, T, in) operands XLA:CPU lays out
    # the branch's weight-gradient dots with transposed activation copies, about 25% of the
    # small config's step time (README); a reshape costs nothing on any backend.
    x2 = x.reshape(-1, x.shape[-1]) if flatten or form == "joined" else x
    kernel = mod.get_variable("params", "kernel")
    if _quant.is_quantized(kernel):  # QLoRA: the base contracted as delora_jax.apply's quantized Dense does
      x2 = x2.astype(cdt)
      y = _ops.qdense(x2, x2, kernel, a, b, None, mod.precision, 1, (kernel.shape[-1],), mod.name)
      return y.reshape(*x.shape[:-1], y.shape[-1])
    if form == "joined":
      w = lax.stop_gradient(kernel).astype(cdt)
      y = _ops.lowrank(x2.astype(cdt), x2.astype(cdt), w, a, b, mod.precision)
      return y.reshape(*x.shape[:-1], y.shape[-1])
    y = next_fun(x2)
    acc = jnp.promote_types(cdt, jnp.float32)
    contract = lambda lhs: (((lhs.ndim - 1,), (0,)), ((), ()))  # noqa: E731
    h = lax.dot_general(x2.astype(cdt), a.astype(cdt), contract(x2), preferred_element_type=acc)
    d = lax.dot_general(h.astype(cdt), b.astype(cdt), contract(h), preferred_element_type=acc)
    return (y + d.astype(y.dtype)).reshape(*x.shape[:-1], y.shape[-1])

  return intercept


# ------------------------------------------------------------------ the modes


def delora_rules(cfg: LlamaConfig, rank: int, lam: float):
  if cfg.scan_layers:
    return {r"layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel": delora_jax.Rule(rank, lam, stack_axes=1)}
  return {r"layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel": delora_jax.Rule(rank, lam)}


def build_mode(mode: str, model: Llama, params, tokens, rank: int, lam: float, lora_flatten: bool = True):
  """``(loss_fn(trainable, frozen, tokens), trainable, frozen, tx, info)`` for ``mode``."""
  adamw = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  run = lambda p, **kw: model.apply({"params": p}, **kw)  # noqa: E731
  if mode == "full":
    loss = lambda t, f, x: xent(run(t, input_ids=x), x)  # noqa: E731
    return loss, jax.tree.map(jnp.copy, params), None, adamw, {}
  if mode == "frozen":

    def loss(delta, f, x):  # gradient w.r.t. the embedding output only
      emb = model.apply({"params": f}, x, method=Llama.embed)
      return xent(run(f, inputs_embeds=emb + delta), x)

    b, t = tokens.shape
    delta = jnp.zeros((b, t, model.config.hidden_size), model.config.dtype)
    return loss, delta, params, adamw, {"trainable_params": 0, "differentiated": delta.size}
  if mode in ("lora", "lora_plain"):
    form = "joined" if mode == "lora" else "plain"

    def loss(t, f, x):  # alpha = r, scaling 1
      with nn.intercept_methods(lora_interceptor(1.0, lora_flatten, form)):
        return xent(run(deep_merge(f, t), input_ids=x), x)

    return loss, lora_init(params, rank, jax.random.key(1)), params, adamw, {}
  tree = delora_jax.wrap(params, delora_rules(model.config, rank, lam), key=jax.random.key(1))
  trainable, frozen = delora_jax.split(tree)
  tx = delora_jax.optimizer(optax.adamw, learning_rate=LR, weight_decay=WEIGHT_DECAY)
  if mode == "delora_merged":

    def loss(t, f, x):
      return xent(run(delora_jax.merge(delora_jax.combine(t, f)), input_ids=x), x)

    return loss, trainable, frozen, tx, {}
  if mode == "delora":

    def loss(t, f, x):
      return xent(delora_jax.apply(model, {"params": delora_jax.combine(t, f)}, x), x)

    info = {}
    if hasattr(delora_jax, "explain"):
      paths = delora_jax.explain(model, {"params": tree}, tokens)
      info = {"delora_paths": {k: len(v) for k, v in paths.items()}}
    return loss, trainable, frozen, tx, info
  raise ValueError(f"--modes: unknown mode {mode!r}; expected some of {MODES}.")


def train_step(loss_fn, tx):
  def step(state, frozen, tokens):
    trainable, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return (optax.apply_updates(trainable, updates), opt_state), loss

  return step


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def compile_mode(mode: str, model: Llama, params, tokens, args) -> dict:
  """Builds and compiles one mode's step; XLA's flops and memory of the compiled program."""
  loss_fn, trainable, frozen, tx, info = build_mode(
    mode, model, params, tokens, args.rank, args.lam, lora_flatten=not args.lora_3d
  )
  state = (trainable, tx.init(trainable))
  t0 = time.perf_counter()
  compiled = jax.jit(train_step(loss_fn, tx), donate_argnums=0).lower(state, frozen, tokens).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  m = compiled.memory_analysis()
  mem = dict(
    argument=m.argument_size_in_bytes,
    output=m.output_size_in_bytes,
    temp=m.temp_size_in_bytes,
    alias=m.alias_size_in_bytes,
  )
  mem["total"] = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
  stats = dict(
    mode=mode,
    flops=float(cost.get("flops", -1.0)),
    bytes_accessed=float(cost.get("bytes accessed", -1.0)),
    memory_bytes=mem,
    compile_s=compile_s,
    **{"trainable_params": count(trainable), **info},
  )
  return dict(stats=stats, compiled=compiled, state=state, frozen=frozen, times=[], losses=[])


def run_steps(run: dict, tokens, n: int, timed: bool) -> None:
  for _ in range(n):
    t = time.perf_counter()
    run["state"], loss = run["compiled"](run["state"], run["frozen"], tokens)
    jax.block_until_ready((run["state"], loss))
    if timed:
      run["times"].append(time.perf_counter() - t)
    run["losses"].append(float(loss))


def time_modes(runs: list[dict], tokens, steps: int, warmup: int) -> None:
  """Warm-up, then ``steps`` rounds of one step per mode, interleaved, so that load from
  other processes spreads over all modes alike."""
  for run in runs:
    run_steps(run, tokens, warmup, timed=False)
  for _ in range(steps):
    for run in runs:
      run_steps(run, tokens, 1, timed=True)
  for run in runs:
    times, step_s = run["times"], statistics.median(run["times"])
    run["stats"].update(
      step_s_median=step_s,
      step_s_min=min(times),
      step_s_all=times,
      tokens_per_s=tokens.size / step_s,
      first_loss=run["losses"][0],
      last_loss=run["losses"][-1],
    )
    run["state"] = None  # free the donated buffers' successors


# ------------------------------------------------------------------ reporting

RATIOS = (
  ("delora", "lora"),
  ("delora", "lora_plain"),
  ("delora", "frozen"),
  ("delora_merged", "lora"),
  ("delora", "delora_merged"),
  ("lora", "frozen"),
  ("lora_plain", "frozen"),
  ("full", "frozen"),
)


def ratios(res: dict) -> dict:
  out = {}
  for a, b in RATIOS:
    if a in res and b in res:
      ra, rb = res[a], res[b]
      out[f"{a}/{b}"] = dict(
        flops=ra["flops"] / rb["flops"],
        memory=ra["memory_bytes"]["total"] / rb["memory_bytes"]["total"],
        time=ra["step_s_median"] / rb["step_s_median"],
      )
  return out


def table(res: dict, rat: dict) -> str:
  mib = 2.0**20
  lines = [
    "| mode | trainable | GFLOP/step | memory MiB (total) | temp MiB | step ms (median) | tokens/s |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in res.values():
    lines.append(
      f"| {r['mode']} | {r['trainable_params']:,} | {r['flops'] / 1e9:.2f} | "
      f"{r['memory_bytes']['total'] / mib:.1f} | {r['memory_bytes']['temp'] / mib:.1f} | "
      f"{r['step_s_median'] * 1e3:.1f} | {r['tokens_per_s']:.0f} |"
    )
  lines += ["", "| ratio | flops | memory | time |", "|---|---:|---:|---:|"]
  lines += [f"| {k} | {v['flops']:.4f} | {v['memory']:.4f} | {v['time']:.3f} |" for k, v in rat.items()]
  return "\n".join(lines)


def peer_path(name: str) -> Path:
  return Path(__file__).resolve().parent / name


def run_peft_cpu(ours: dict) -> dict:
  """Runs PEFT's CPU anchor (small config, fp32) right after ours; compares step times.

  The anchor runs every mode twice; with other jobs on the machine the minimum over
  runs is the robust figure (load only adds time), so ratios are given on minima and
  on medians.
  """
  peer = peer_path(PEER_CPU)
  print(f"\n# PEFT anchor: {sys.executable} {peer}", flush=True)
  runs: dict[str, list[float]] = {}
  with subprocess.Popen([sys.executable, str(peer)], stdout=subprocess.PIPE, text=True) as proc:
    for line in proc.stdout:
      print("  peft: " + line.rstrip(), flush=True)
      rec = json.loads(line) if line.startswith("{") else {}
      if "mode" in rec:
        runs.setdefault(rec["mode"], []).append(rec["step_s_median"])
  if proc.returncode:
    raise SystemExit(f"bench --peft: {peer} failed with exit status {proc.returncode}.")
  out = dict(peft_runs_s=runs)
  for stat, ours_key, agg in (("min", "step_s_min", min), ("median", "step_s_median", statistics.median)):
    peft = {m: agg(v) for m, v in runs.items()}
    out[f"peft_step_s_{stat}"] = peft
    out[f"ours_over_peft_{stat}"] = {m: r[ours_key] / peft[m] for m, r in ours.items() if m in peft}
  out["delora_jax_delora_over_peft_delora"] = {
    stat: out[f"ours_over_peft_{stat}"].get("delora", math.nan) for stat in ("min", "median")
  }
  return out


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="small", choices=["tiny", "small", "1b"])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--lam", type=float, default=15.0)
  p.add_argument(
    "--steps", type=int, default=6, help="timed steps per mode, interleaved across modes (median reported)"
  )
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
  p.add_argument("--scan", action="store_true", help="nn.scan over layers")
  p.add_argument("--remat", action="store_true", help="rematerialise each layer")
  p.add_argument(
    "--dtype",
    default="float32",
    choices=["float32", "bfloat16"],
    help="compute and base-param dtype (adapters stay float32)",
  )
  p.add_argument("--attention", default="auto", choices=["auto", "softmax", "blocked", "xla", "cudnn"])
  p.add_argument(
    "--lora-3d", action="store_true", help="lora_plain on (B, T, in) operands instead of flattened 2-D (slow on CPU)"
  )
  p.add_argument("--out", default=None, help="write the JSON results here")
  p.add_argument("--peft", action="store_true", help="also run PEFT's CPU anchor, benchmarks/peer_peft_cpu.py")
  args = p.parse_args(argv)
  args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in args.modes if m not in MODES]
  if bad:
    p.error(f"--modes: unknown {bad}; expected a subset of {list(MODES)}")
  peft_shape = dict(config="small", batch=8, seq=256, rank=16, dtype="float32")
  got = {k: getattr(args, k) for k in peft_shape}
  if args.peft and got != peft_shape:
    p.error(f"--peft: the PEFT CPU anchor runs {peft_shape}; got {got}. Compare like with like.")
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  cfg = LlamaConfig.preset(
    args.config,
    scan_layers=args.scan,
    remat=args.remat,
    dtype=args.dtype,
    param_dtype=args.dtype,
    attention=args.attention,
  )
  model = Llama(cfg)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens[:1])["params"]
  meta = dict(
    config=args.config,
    model=dataclasses.asdict(cfg),
    batch=args.batch,
    seq=args.seq,
    rank=args.rank,
    lam=args.lam,
    steps=args.steps,
    warmup=args.warmup,
    scan=args.scan,
    remat=args.remat,
    dtype=args.dtype,
    lora_3d=args.lora_3d,
    lr=LR,
    weight_decay=WEIGHT_DECAY,
    backend=jax.default_backend(),
    device=jax.devices()[0].device_kind,
    jax=jax.__version__,
    flax=flax.__version__,
    cpus=os.cpu_count(),
    loadavg_start=os.getloadavg(),
    python=platform.python_version(),
  )
  if args.scan:
    meta["flops_note"] = (
      "XLA's cost analysis counts a while-loop body once, so with --scan the "
      "flops cover one layer plus embedding/head; compare flops without --scan."
    )
    print("# note: " + meta["flops_note"], flush=True)
  print(
    f"# bench: {args.config} batch={args.batch} seq={args.seq} r={args.rank} {args.dtype} "
    f"scan={args.scan} remat={args.remat} on {meta['device']}",
    flush=True,
  )
  runs = []
  for mode in args.modes:
    runs.append(compile_mode(mode, model, params, tokens, args))
    print(json.dumps(runs[-1]["stats"]), flush=True)
  time_modes(runs, tokens, args.steps, args.warmup)
  results = {r["stats"]["mode"]: r["stats"] for r in runs}
  meta["loadavg_end"] = os.getloadavg()
  out = dict(meta=meta, results=results, ratios=ratios(results))
  print("\n" + table(results, out["ratios"]), flush=True)
  if args.peft:
    out["peft_cpu"] = run_peft_cpu(results)
    print(json.dumps(out["peft_cpu"], indent=1), flush=True)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()
