"""The engine's own figures: package shape, and the two front-ends on the same layer.

Prints JSON and a table:

- the library's import graph: modules, edges, floors (the longest import chain, counted in
  modules) and lines of code (``delora_jax/``, ``models/`` included), for this checkout and,
  with ``--against REV``, for a git revision (read with ``git show``, nothing checked out);
- one jitted Adam train step of a two-layer MLP, Linen ``nn.Dense`` through
  ``delora_jax.apply`` and NNX ``nnx.Linear`` through ``delora_jax.nnx.wrap``, same shapes and
  rank: XLA's flops (``cost_analysis``) and temp bytes (``memory_analysis``);
- a ``lax.ragged_dot`` MoE layer's step: DeLoRA on the experts against the frozen step.

Usage: ``python benchmarks/engine.py [--against c47b7e6]``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import delora_jax  # noqa: E402


def _sources(rev: str | None) -> dict[str, str]:
  """``{module: source}`` of every module of the package, at ``rev`` or in the working tree."""
  if rev is None:
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "delora_jax").rglob("*.py"))
    return {f: (ROOT / f).read_text() for f in files}
  names = subprocess.run(
    ["git", "ls-tree", "-r", "--name-only", rev, "delora_jax"], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  return {
    f: subprocess.run(["git", "show", f"{rev}:{f}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for f in names
    if f.endswith(".py")
  }


def _module(path: str) -> str:
  mod = path[: -len(".py")].replace("/", ".")
  return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def _code_lines(src: str) -> int:
  """Lines holding code: not blank, not only a comment, not part of a docstring."""
  tree = ast.parse(src)
  doc = set()
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
      if isinstance(body[0].value.value, str):
        doc.update(range(body[0].lineno, body[0].end_lineno + 1))
  return sum(
    1
    for i, line in enumerate(src.splitlines(), 1)
    if line.strip() and not line.strip().startswith("#") and i not in doc
  )


def package_shape(rev: str | None) -> dict:
  """Modules, import edges (any import of another package module, local ones included), floors, lines."""
  srcs = _sources(rev)
  mods = {_module(f): s for f, s in srcs.items()}
  edges: dict[str, set[str]] = {m: set() for m in mods}
  for m, src in mods.items():
    for node in ast.walk(ast.parse(src)):
      targets = []
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("delora_jax"):
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
        targets = subs or [node.module]  # `from pkg import _mod` imports _mod (pkg is already loading)
      elif isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      edges[m] |= {t for t in targets if t in mods and t != m}
  depth: dict[str, int] = {}

  def floor(m: str, seen: frozenset = frozenset()) -> int:
    if m not in depth:
      depth[m] = 1 + max((floor(t, seen | {m}) for t in edges[m] if t not in seen), default=0)
    return depth[m]

  floors = max(floor(m) for m in mods)
  return {
    "modules": len(mods),
    "edges": sum(len(e) for e in edges.values()),
    "floors": floors,
    "lines": sum(len(s.splitlines()) for s in srcs.values()),
    "code_lines": sum(_code_lines(s) for s in srcs.values()),
  }


def _compiled(step, *args) -> dict:
  c = jax.jit(step).lower(*args).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"flops": float(cost["flops"]), "temp_bytes": int(c.memory_analysis().temp_size_in_bytes)}


D_IN, D_HID, D_OUT, TOKENS, RANK = 256, 512, 256, 1024, 8


def linen_vs_nnx() -> dict:
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(D_OUT, name="l2")(nn.gelu(nn.Dense(D_HID, name="l1")(x)))

  x = jax.random.normal(jax.random.key(0), (TOKENS, D_IN))
  y = jax.random.normal(jax.random.key(1), (TOKENS, D_OUT))
  opt = delora_jax.optimizer(optax.adam, learning_rate=1e-3)
  model = MLP()
  tree = delora_jax.wrap(model.init(jax.random.key(2), x)["params"], {".*kernel": RANK})
  trainable, frozen = delora_jax.split(tree)

  def linen_step(t, s):
    loss = lambda t: jnp.mean((delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x) - y) ** 2)
    g = jax.grad(loss)(t)
    u, s = opt.update(g, s, t)
    return optax.apply_updates(t, u), s

  class NMLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
      self.l2 = nnx.Linear(D_HID, D_OUT, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.gelu(self.l1(x)))

  adapted = delora_jax.nnx.wrap(NMLP(nnx.Rngs(2)), {".*kernel": RANK})
  graphdef, params, rest = nnx.split(adapted, delora_jax.nnx.DeloraParam, ...)

  def nnx_step(p, s):
    loss = lambda p: jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  linen = _compiled(linen_step, trainable, opt.init(trainable))
  nnx_ = _compiled(nnx_step, params, opt.init(params))
  return {
    "linen_dense": linen,
    "nnx_linear": nnx_,
    "flops_ratio": nnx_["flops"] / linen["flops"],
    "temp_ratio": nnx_["temp_bytes"] / linen["temp_bytes"],
  }


def moe(experts: int = 8, d: int = 256, f: int = 512, tokens: int = 1024) -> dict:
  """One MoE layer pair (gelu between two ragged_dots) at the given widths, rank RANK."""

  class MoE(nn.Module):
    @nn.compact
    def __call__(self, x, sizes):
      wi = self.param("wi", nn.initializers.normal(0.02), (experts, d, f))
      wo = self.param("wo", nn.initializers.normal(0.02), (experts, f, d))
      return lax.ragged_dot(jax.nn.gelu(lax.ragged_dot(x, wi, sizes)), wo, sizes)

  model = MoE()
  x = jax.random.normal(jax.random.key(0), (tokens, d))
  sizes = jnp.full((experts,), tokens // experts, jnp.int32)
  params = model.init(jax.random.key(1), x, sizes)["params"]
  tree = delora_jax.wrap(params, {"w.*": delora_jax.Rule(RANK, stack_axes=1)})
  trainable, frozen = delora_jax.split(tree)

  def delora_loss(t, x):
    return jnp.sum(delora_jax.apply(model, {"params": delora_jax.combine(t, frozen)}, x, sizes, strict=True) ** 2)

  def frozen_loss(x):
    return jnp.sum(model.apply({"params": params}, x, sizes) ** 2)

  got = _compiled(jax.grad(delora_loss, argnums=(0, 1)), trainable, x)
  base = _compiled(jax.grad(frozen_loss), x)
  return {"delora": got, "frozen": base, "flops_over_frozen": got["flops"] / base["flops"]}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--against", default=None, help="a git revision to compare the package shape with")
  args = ap.parse_args()
  out = {"package": {"here": package_shape(None)}}
  if args.against:
    out["package"][args.against] = package_shape(args.against)
  out["linen_vs_nnx"] = linen_vs_nnx()
  out["moe_ragged_dot"] = moe()
  # gemma 4 26B-A4B-like widths (embed 2816, expert hidden 704), 8 of its experts, 512 tokens.
  out["moe_ragged_dot_26b_widths"] = moe(experts=8, d=2816, f=704, tokens=512)
  print(json.dumps(out, indent=2))
  print()
  for name, shape in out["package"].items():
    print(
      f"package {name:>10}: {shape['modules']} modules, {shape['edges']} edges, {shape['floors']} floors, "
      f"{shape['lines']} lines"
    )
  lv = out["linen_vs_nnx"]
  print(
    f"Adam step, 2-layer MLP r={RANK}: Linen Dense {lv['linen_dense']['flops']:.4g} flops "
    f"{lv['linen_dense']['temp_bytes']} B | NNX Linear {lv['nnx_linear']['flops']:.4g} flops "
    f"{lv['nnx_linear']['temp_bytes']} B | ratio flops {lv['flops_ratio']:.4f}, temp {lv['temp_ratio']:.4f}"
  )
  for name, widths in (("moe_ragged_dot", "d=256, f=512"), ("moe_ragged_dot_26b_widths", "d=2816, f=704")):
    print(
      f"MoE (ragged_dot, 8 experts, {widths}) DeLoRA on experts / frozen step flops: "
      f"{out[name]['flops_over_frozen']:.4f}"
    )


if __name__ == "__main__":
  main()
