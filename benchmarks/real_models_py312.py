"""DeLoRA on real model code that needs Python >= 3.12 (MaxText 0.2.5, gemma 4.0.1), CPU, float32.

XLA's figures of one compiled train step (``jax.jit(step).lower(...).compile()``: ``cost_analysis()``
flops, ``memory_analysis()`` temp bytes), same tiny random-weight models as tests/test_maxtext.py and
tests/test_gemma4.py, batch 2:

  1. MaxText llama2 decoder (2 layers, embed 64), scanned (MaxText's default ``scan_layers=True,
     param_scan_axis=1``) and unrolled: DeLoRA (``delora_jax.nnx.wrap``, layouts from ``like=``,
     ``delora_jax.optimizer(optax.adam)``) vs MaxText's own LoRA (``lora_utils.apply_lora_to_model``:
     qwix, ``optax.adam``), rank 8 on the same 7 projections per layer, the same loss and a train step
     in MaxText's split/merge style. Targets: flops <= 1.02x, temp memory <= 1.05x LoRA's.
     A scanned step's cost counts the layer loop once (XLA counts a while body once).
  2. gemma 4 MoE (``Gemma4_26B_A4B``-like: 4 experts, top 2): DeLoRA rank 8 on the experts only
     (``mlp/{gating_einsum,linear}/w``, contracted by ``lax.ragged_dot``) vs the frozen step (the
     gradient w.r.t. the token embedding only: backprop through every activation, no kernel
     gradient). Target: <= +5 % flops.

A row that fails records its error (e.g. a delora_jax without positioned stacked axes or ragged_dot
support). Prints a table and JSON:

  JAX_PLATFORMS=cpu python benchmarks/real_models_py312.py --out benchmarks/results/real_models_py312_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import delora_jax  # noqa: E402
import delora_jax.nnx  # noqa: E402,F401

RANK = 8


def figures(step, *args) -> dict:
  compiled = jax.jit(step).lower(*args).compile()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  mem = compiled.memory_analysis()
  return {"flops": float(ca["flops"]), "temp_bytes": int(mem.temp_size_in_bytes)}


def attempt(fn) -> dict:
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 (recorded, reported)
    return {"error": f"{type(e).__name__}: {str(e)[:600]}", "where": traceback.format_exc(limit=-3)[-1500:]}


def xent(logits, tok):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]).mean()


# ----------------------------------------------------------------------------- MaxText


def maxtext_rows(scan: bool) -> dict:
  from maxtext.utils import lora_utils  # noqa: PLC0415

  from tests import test_maxtext as tm  # noqa: PLC0415

  args = tm.inputs()
  tok = args[0]

  def step_for(model, wrt, opt):
    graphdef, train, rest = nnx.split(model, wrt, ...)

    def step(train, opt_state):
      def loss(train):  # copy=True on both sides: MaxText's scan writes non-Param state back
        return xent(tm.call(tm.fresh(nnx.merge(graphdef, train, rest, copy=True)), args), tok)

      value, g = jax.value_and_grad(loss)(train)
      upd, opt_state = opt.update(g, opt_state, train)
      return optax.apply_updates(train, upd), opt_state, value

    return step, train, opt.init(train)

  def delora():
    model, _ = tm.build(scan)
    adapted = delora_jax.nnx.wrap(
      model, {tm.RULES_RE: delora_jax.Rule(RANK)}, like=lambda m: tm.call(m, args), key=jax.random.key(1)
    )
    step, train, state = step_for(
      adapted, delora_jax.nnx.DeloraParam, delora_jax.optimizer(optax.adam, learning_rate=1e-3)
    )
    out = figures(step, train, state)
    out["trainable"] = int(sum(x.size for x in jax.tree.leaves(train)))
    out["adapted"] = len(delora_jax.adapters(adapted))
    return out

  def lora():
    model, cfg = tm.build(scan, lora={"enable_lora": True, "lora_rank": RANK, "lora_alpha": 2.0 * RANK})
    from maxtext.utils import maxtext_utils  # noqa: PLC0415

    lora_model = lora_utils.apply_lora_to_model(model, maxtext_utils.get_mesh_from_config(cfg), cfg)
    step, train, state = step_for(lora_model, nnx.LoRAParam, optax.adam(1e-3))
    out = figures(step, train, state)
    out["trainable"] = int(sum(x.size for x in jax.tree.leaves(train)))
    return out

  row = {"delora": attempt(delora), "lora": attempt(lora)}
  if "flops" in row["delora"] and "flops" in row["lora"]:
    row["flops_ratio"] = row["delora"]["flops"] / row["lora"]["flops"]
    row["temp_ratio"] = row["delora"]["temp_bytes"] / row["lora"]["temp_bytes"]
  return row


# ----------------------------------------------------------------------------- gemma 4 MoE


def gemma4_moe_row() -> dict:
  from tests import test_gemma4 as tg  # noqa: PLC0415

  with jax.numpy_rank_promotion("allow"):
    model, params, tok = tg.build("moe")

    def loss_of(apply_fn):
      return lambda *a: xent(apply_fn(*a).logits, tok)

    def frozen():
      emb = params["embedder"]["input_embedding"]
      rest = dict(params)

      def loss(e):
        p = dict(rest, embedder=dict(rest["embedder"], input_embedding=e))
        return xent(model.apply({"params": p}, tok).logits, tok)

      opt = optax.adam(1e-3)

      def step(e, s):
        value, g = jax.value_and_grad(loss)(e)
        upd, s = opt.update(g, s, e)
        return optax.apply_updates(e, upd), s, value

      return figures(step, emb, opt.init(emb))

    def delora():
      tree = delora_jax.wrap(params, {r"layer_\d+/mlp/(gating_einsum|linear)/w": RANK}, like=(model, tok))
      trainable, frozen_ = delora_jax.split(tree)
      opt = delora_jax.optimizer(optax.adam, learning_rate=1e-3)

      def loss(t):
        return xent(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen_)}, tok).logits, tok)

      def step(t, s):
        value, g = jax.value_and_grad(loss)(t)
        upd, s = opt.update(g, s, t)
        return optax.apply_updates(t, upd), s, value

      out = figures(step, trainable, opt.init(trainable))
      out["explain"] = delora_jax.explain(model, {"params": tree}, tok)
      return out

    row = {"frozen": attempt(frozen), "delora_experts": attempt(delora)}
  if "flops" in row["frozen"] and "flops" in row["delora_experts"]:
    row["flops_ratio"] = row["delora_experts"]["flops"] / row["frozen"]["flops"]
  return row


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=None, help="write the JSON here too")
  ap.add_argument("--only", choices=["maxtext", "gemma4"], default=None)
  a = ap.parse_args()
  res: dict = {"jax": jax.__version__, "rank": RANK}
  if a.only in (None, "maxtext"):
    res["maxtext_scanned"] = maxtext_rows(True)
    res["maxtext_unrolled"] = maxtext_rows(False)
  if a.only in (None, "gemma4"):
    res["gemma4_moe"] = gemma4_moe_row()

  def fmt(d, k):
    return f"{d[k]:,.0f}" if k in d else "error"

  head = ("case", "DeLoRA flops", "ref flops", "ratio", "DeLoRA temp", "ref temp", "ratio")
  print(f"{head[0]:<18} {head[1]:>14} {head[2]:>14} {head[3]:>7} {head[4]:>12} {head[5]:>12} {head[6]:>7}")
  for name in ("maxtext_scanned", "maxtext_unrolled"):
    if name in res:
      r, nan = res[name], float("nan")
      d, lo = r["delora"], r["lora"]
      print(
        f"{name:<18} {fmt(d, 'flops'):>14} {fmt(lo, 'flops'):>14} {r.get('flops_ratio', nan):>7.4f} "
        f"{fmt(d, 'temp_bytes'):>12} {fmt(lo, 'temp_bytes'):>12} {r.get('temp_ratio', nan):>7.4f}"
      )
  if "gemma4_moe" in res:
    r = res["gemma4_moe"]
    print(
      f"{'gemma4_moe':<18} {fmt(r['delora_experts'], 'flops'):>14} {fmt(r['frozen'], 'flops'):>14} "
      f"{r.get('flops_ratio', float('nan')):>7.4f}   (reference: the frozen step)"
    )
  for name, r in res.items():
    if isinstance(r, dict):
      for side, v in r.items():
        if isinstance(v, dict) and "error" in v:
          print(f"{name}/{side}: {v['error']}")
  text = json.dumps(res, indent=1, default=str)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
