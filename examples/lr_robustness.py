"""DeLoRA vs LoRA across learning rates: the paper's robustness result in miniature.

    python examples/lr_robustness.py           # 5-6 minutes on 2 CPU cores
    python examples/lr_robustness.py --quick   # CI smoke run (writes to a temp folder)
    python examples/lr_robustness.py --plot-only  # redraw the PNG from the JSON

The same pretrained all-MiniLM-L6-v2 is fine-tuned on the same VADER valence
regression as ``examples/finetune.py`` (see its docstring for the data), once
per learning rate and method, with everything else equal:

* the adapted kernels (attention query/value of all 6 layers), rank 8;
* LoRA: ``ΔW = (alpha / r) A B`` with ``alpha = r``, ``A`` Kaiming-uniform and
  ``B = 0`` (PEFT's defaults), written out below in a few lines;
* DeLoRA: ``delora_jax`` with PEFT's initialisation and λ = 2 (``--lam``);
* Adam with the swept learning rate for every adapter parameter (DeLoRA's λ
  included: one learning rate, as in PEFT), cosine decay to 10%;
* the linear head starts from the least-squares probe and trains with a fixed
  learning rate of 1e-3 in every run, so only the adapters' learning rate moves;
* the same batches in the same order.

Recorded per run: held-out Pearson r and MSE, and the relative update norm
``||ΔW||_F / ||W||_F`` averaged over the adapted kernels. The JSON and the PNG
(``examples/lr_robustness.{json,png}``) are what ``docs/lr_robustness.md``
discusses.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _valence as V  # noqa: E402
import finetune  # noqa: E402

import delora_jax  # noqa: E402

TARGETS = r"encoder/layer_\d+/attention/self/(query|value)/kernel"
HEAD_LR = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--lrs", type=float, nargs="+", default=[float(x) for x in np.logspace(-5, -1, 7)])
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--lam", type=float, default=2.0, help="DeLoRA's initial λ")
  p.add_argument("--train-size", type=int, default=None)
  p.add_argument("--test-size", type=int, default=1000)
  p.add_argument("--json", default=os.path.join(HERE, "lr_robustness.json"))
  p.add_argument("--png", default=os.path.join(HERE, "lr_robustness.png"))
  p.add_argument(
    "--png-diagnostics",
    default=os.path.join(HERE, "lr_robustness_diagnostics.png"),
    help="per-layer relative update (and DeLoRA's bound use) over training",
  )
  p.add_argument("--log-every", type=int, default=10, help="record the diagnostics every N steps")
  p.add_argument("--plot-only", action="store_true", help="redraw the PNGs from --json")
  p.add_argument(
    "--quick", action="store_true", help="CI: 3 learning rates, 8 steps, small data, output in the temp folder"
  )
  if p.parse_args(argv).quick:  # explicit flags still win over the quick defaults
    tmp = os.path.join(tempfile.gettempdir(), "lr_robustness_quick")
    p.set_defaults(
      lrs=[1e-4, 1e-2, 1e-1],
      steps=8,
      batch=16,
      train_size=512,
      test_size=128,
      json=tmp + ".json",
      png=tmp + ".png",
      png_diagnostics=tmp + "_diag.png",
    )
  return p.parse_args(argv)


# --- plain LoRA, alpha = r (scaling 1) ---------------------------------------------


def lora_init(params, rank: int, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
  """``{path: {"a": (in, r) Kaiming-uniform, "b": (r, out) zeros}}`` on the target kernels."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for i, path in enumerate(sorted(p for p in flat if re.fullmatch(TARGETS, p))):
    n_in, n_out = flat[path].shape
    bound = 1.0 / math.sqrt(n_in)  # torch kaiming_uniform_(a=sqrt(5)), as PEFT
    out[path] = {
      "a": jax.random.uniform(jax.random.fold_in(key, i), (n_in, rank), minval=-bound, maxval=bound),
      "b": jnp.zeros((rank, n_out)),
    }
  return out


def lora_merge(params, lora):
  """``params`` with ``W + A @ B`` at every LoRA path."""
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update({p: flat[p] + f["a"] @ f["b"] for p, f in lora.items()})
  return traverse_util.unflatten_dict(flat, sep="/")


def lora_forward(model, trainable, frozen, ids, mask):
  tree = {"bert": lora_merge(frozen["bert"], trainable["lora"]), "head": trainable["head"]}
  return V.predict_head(tree["head"], V.embed_fn(model)(tree["bert"], ids, mask))


def lora_rel_update(params, lora) -> float:
  flat = traverse_util.flatten_dict(params, sep="/")
  return float(np.mean([jnp.linalg.norm(f["a"] @ f["b"]) / jnp.linalg.norm(flat[p]) for p, f in lora.items()]))


def lora_diagnostics(w_norms: dict[str, jax.Array], lora) -> dict[str, dict[str, jax.Array]]:
  """LoRA's per-layer ``||A B||_F / ||W||_F`` from the factors (r x r Gram matrices), the
  same way ``delora_jax.diagnostics`` measures DeLoRA; LoRA has no bound to use."""
  out = {}
  for p, f in lora.items():
    ga, gb = f["a"].T @ f["a"], f["b"] @ f["b"].T
    out[p] = {"relative_update": jnp.sqrt(jnp.maximum(jnp.sum(ga * gb), 0.0)) / w_norms[p]}
  return out


# --- DeLoRA ---------------------------------------------------------------------------


def delora_forward(model, trainable, frozen, ids, mask):
  return finetune.predict(model, delora_jax.combine(trainable, frozen), ids, mask)


def delora_rel_update(tree) -> float:
  flat = traverse_util.flatten_dict(delora_jax.unwrap(tree), sep="/")
  return float(np.mean([jnp.linalg.norm(d) / jnp.linalg.norm(flat[p]) for p, d in delora_jax.delta(tree).items()]))


# --- one training run -----------------------------------------------------------------


def make_step(forward, opt):
  """A jitted Adam step; the adapters' and the head's learning rates are arguments."""

  def loss_fn(trainable, frozen, ids, mask, y):
    return jnp.mean((forward(trainable, frozen, ids, mask) - y) ** 2)

  @jax.jit
  def step(trainable, opt_state, frozen, ids, mask, y, lr, head_lr):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask, y)
    updates, opt_state = opt.update(grads, opt_state, trainable)  # unit learning rate
    updates = {k: jax.tree.map(lambda u, f=(head_lr if k == "head" else lr): u * f, v) for k, v in updates.items()}
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step


def run(step, opt, trainable, frozen, train, batches, lr, desc, diagnose, log_every):
  """Trains one run; every ``log_every`` steps records ``diagnose(trainable)`` per layer."""
  opt_state = opt.init(trainable)
  schedule = optax.cosine_decay_schedule(1.0, len(batches), alpha=0.1)
  losses, history = [], {"step": [], "kernels": {}}
  bar = tqdm(batches, desc=desc, leave=False, mininterval=1.0)
  for t, idx in enumerate(bar):
    f = float(schedule(t))
    trainable, opt_state, loss = step(
      trainable, opt_state, frozen, train.ids[idx], train.mask[idx], train.y[idx], lr * f, HEAD_LR * f
    )
    losses.append(float(loss))
    if t % log_every == 0 or t == len(batches) - 1:
      figures = diagnose(trainable)
      finetune.record(history, t + 1, figures)
      rel = np.mean([float(x["relative_update"]) for x in figures.values()])
      post = {"rel_mean": f"{rel:.2e}"}
      if all("bound_use" in x for x in figures.values()):
        post["bound_max"] = f"{max(float(x['bound_use']) for x in figures.values()):.3f}"
      bar.set_postfix(post, refresh=False)
  return trainable, losses, history


class Method(NamedTuple):
  """One fine-tuning method: how to step, evaluate and measure it."""

  step: Any  # jitted (trainable, opt_state, frozen, ids, mask, y, lr, head_lr) -> ...
  opt: optax.GradientTransformation  # unit learning rate; `step` scales the updates
  trainable: Any
  frozen: Any
  predict: Any  # jitted (trainable, ids, mask) -> predictions
  stats: Any  # trained trainable -> {"rel_update": ..., ...}
  diagnose: Any  # jitted trainable -> {path: {"relative_update", ...}} (per layer)


def lora_method(model, params, head, rank: int) -> Method:
  frozen = {"bert": params}
  fwd = lambda *a: lora_forward(model, *a)  # noqa: E731
  flat = traverse_util.flatten_dict(params, sep="/")
  w_norms = {p: jnp.linalg.norm(flat[p]) for p in flat if re.fullmatch(TARGETS, p)}
  return Method(
    make_step(fwd, optax.adam(1.0)),
    optax.adam(1.0),
    {"lora": lora_init(params, rank, jax.random.key(0)), "head": head},
    frozen,
    jax.jit(lambda tr, i, m: fwd(tr, frozen, i, m)),
    lambda tr: {"rel_update": lora_rel_update(params, tr["lora"])},
    jax.jit(lambda tr: lora_diagnostics(w_norms, tr["lora"])),
  )


def delora_method(model, params, head, rank: int, lam: float) -> Method:
  tree = {"bert": delora_jax.wrap(params, {TARGETS: delora_jax.Rule(rank, lam=lam)}), "head": head}
  trainable, frozen = delora_jax.split(tree, extra_trainable="head/.*")
  opt = delora_jax.optimizer(optax.adam, learning_rate=1.0, extra_trainable="head/.*")
  fwd = lambda *a: delora_forward(model, *a)  # noqa: E731

  def stats(tr):
    bert_tree = delora_jax.combine(tr, frozen)["bert"]
    lams = [float(x["lam"]) for x in delora_jax.adapters(bert_tree).values()]
    return {"rel_update": delora_rel_update(bert_tree), "lam_mean": float(np.mean(lams))}

  diagnose = jax.jit(lambda tr: delora_jax.diagnostics(delora_jax.combine(tr, frozen)["bert"])["kernels"])
  return Method(
    make_step(fwd, opt), opt, trainable, frozen, jax.jit(lambda tr, i, m: fwd(tr, frozen, i, m)), stats, diagnose
  )


def sweep(args) -> dict:
  t0 = time.time()
  train, test = V.splits(args.train_size, args.test_size)
  model, params = V.load_encoder()
  embed = jax.jit(V.embed_fn(model))
  head = {
    k: jnp.asarray(v) for k, v in V.ridge_head(V.batched(lambda i, m: embed(params, i, m), train), train.y).items()
  }
  probe = V.metrics(V.predict_head(head, V.batched(lambda i, m: embed(params, i, m), test)), test.y)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, len(train.y), args.batch) for _ in range(args.steps)]
  methods = {
    "LoRA": lora_method(model, params, head, args.rank),
    "DeLoRA": delora_method(model, params, head, args.rank, args.lam),
  }
  runs = []
  for lr in args.lrs:
    for name, m in methods.items():
      tr, losses, history = run(
        m.step, m.opt, m.trainable, m.frozen, train, batches, lr, f"{name} lr={lr:.0e}", m.diagnose, args.log_every
      )
      metric = V.metrics(V.batched(functools.partial(m.predict, tr), test), test.y)
      runs.append(
        {
          "method": name,
          "lr": lr,
          **metric,
          **m.stats(tr),
          "final_train_loss": float(np.mean(losses[-10:])),
          "history": history,
        }
      )
      print(
        f"{name:>6} lr={lr:.1e}: test r={metric['pearson']:.4f} MSE={metric['mse']:.4g} "
        f"||ΔW||/||W||={runs[-1]['rel_update']:.3g}  ({time.time() - t0:.0f} s)"
      )
  config = {k: getattr(args, k) for k in ("steps", "batch", "rank", "lam", "train_size", "test_size")}
  config.update(
    targets=TARGETS, head_lr=HEAD_LR, n_train=len(train.y), n_test=len(test.y), seconds=round(time.time() - t0, 1)
  )
  return {"config": config, "linear_probe": probe, "runs": runs}


def plot(result: dict, png: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for method, color in (("LoRA", "tab:orange"), ("DeLoRA", "tab:blue")):
    rs = [r for r in result["runs"] if r["method"] == method]
    lr = np.array([r["lr"] for r in rs])
    pearson = np.array([r["pearson"] for r in rs], float)
    ok = np.isfinite(pearson)
    ax1.plot(lr[ok], pearson[ok], "o-", color=color, label=method)
    ax1.plot(
      lr[~ok], np.zeros((~ok).sum()), "x", color=color, ms=10, label=f"{method} diverged (NaN)" if (~ok).any() else None
    )
    rel = np.array([r["rel_update"] for r in rs], float)
    ax2.plot(lr[np.isfinite(rel)], rel[np.isfinite(rel)], "o-", color=color, label=method)
  ax1.axhline(result["linear_probe"]["pearson"], color="gray", ls="--", label="linear probe (no fine-tuning)")
  ax1.set(xscale="log", xlabel="learning rate", ylabel="held-out Pearson r", title="VADER valence, all-MiniLM-L6-v2")
  ax2.set(
    xscale="log",
    yscale="log",
    xlabel="learning rate",
    ylabel="mean ||ΔW||_F / ||W||_F",
    title="size of the weight update",
  )
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  c = result["config"]
  fig.suptitle(
    f"rank {c['rank']} on query/value, {c['steps']} Adam steps of {c['batch']}, DeLoRA λ0 = {c['lam']}", fontsize=9
  )
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def plot_diagnostics(result: dict, png: str) -> None:
  """Per-layer relative update over training (LoRA dashed, DeLoRA solid: mean over layers,
  band = min..max) and DeLoRA's bound use, one colour per learning rate."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [r for r in result["runs"] if "history" in r]
  lrs = sorted({r["lr"] for r in runs})
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(lrs)))
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  for r in runs:
    h, c = r["history"], colors[lrs.index(r["lr"])]
    steps = np.array(h["step"])
    rel = np.array([k["relative_update"] for k in h["kernels"].values()], float)
    ls = "-" if r["method"] == "DeLoRA" else "--"
    label = f"{r['method']} lr={r['lr']:.0e}"
    ax1.plot(steps, np.nanmean(rel, 0), ls, color=c, label=label)
    ax1.fill_between(steps, np.nanmin(rel, 0), np.nanmax(rel, 0), color=c, alpha=0.12)
    if r["method"] == "DeLoRA":
      bound = np.array([k["bound_use"] for k in h["kernels"].values()], float)
      ax2.plot(steps, np.max(bound, 0), "-", color=c, label=f"lr={r['lr']:.0e} (max)")
      ax2.plot(steps, np.min(bound, 0), ":", color=c)
  ax1.set(
    yscale="log",
    xlabel="step",
    ylabel="||ΔW||_F / ||W||_F (per layer)",
    title="relative update: LoRA (dashed) vs DeLoRA (solid)",
  )
  ax2.set(
    xlabel="step",
    ylabel="||diag(1/w_norm) ΔW||_F / |λ|",
    ylim=(0, 1.05),
    title="DeLoRA bound use (max solid, min dotted)",
  )
  ax2.axhline(1.0, color="gray", ls="--", lw=0.8)
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
  ax1.legend(fontsize=6, ncol=2)
  ax2.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.plot_only:
    with open(args.json, encoding="utf-8") as f:
      result = json.load(f)
  else:
    result = sweep(args)
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  plot(result, args.png)
  plot_diagnostics(result, args.png_diagnostics)
  print(f"wrote {args.json}, {args.png} and {args.png_diagnostics}")
  print("RESULT " + json.dumps(result))
  return result


if __name__ == "__main__":
  main()
