"""benchmarks/: the LoRA baseline is right, and the tiny run (through gpu_compare.sh) reports sane figures.

Structure and relations only; no assertion about time.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from delora_jax.models import Llama, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
MODES = ("full", "frozen", "lora", "lora_plain", "delora_merged", "delora")


def _load_bench():
  spec = importlib.util.spec_from_file_location("delora_bench", REPO / "benchmarks" / "bench.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


bench = _load_bench()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(DELORA_BENCH_SMOKE="1", OUT=str(out), PYTHON=sys.executable)
  proc = subprocess.run(
    ["bash", str(REPO / "benchmarks" / "gpu_compare.sh")], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((out / "delora_jax_tiny.json").read_text()), proc


def test_wrapper_smoke_mode_skips_peft_anchor(tiny_run):
  _, proc = tiny_run
  assert (
    "torch sees no CUDA device; skipped the PEFT anchor" in proc.stderr
    or "smoke mode; skipped the PEFT anchor" in proc.stderr
    or "PEFT anchor not found" in proc.stderr
  ), proc.stderr[-2000:]
  assert "| delora |" in proc.stdout and "| delora/lora |" in proc.stdout


def test_every_mode_reports_every_field(tiny_run):
  data, _ = tiny_run
  assert data["meta"]["config"] == "tiny" and data["meta"]["batch"] == 2
  assert list(data["results"]) == list(MODES)
  for mode, r in data["results"].items():
    mem = r["memory_bytes"]
    assert r["flops"] > 0 and r["step_s_median"] > 0, mode
    assert (r["trainable_params"] > 0) == (mode != "frozen"), mode
    assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s_median"])
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    assert mem["alias"] > 0, f"{mode}: the donated train state is not aliased"
    assert math.isfinite(r["first_loss"])


def test_relations_between_modes(tiny_run):
  data, _ = tiny_run
  r, rat = data["results"], data["ratios"]
  n = {m: r[m]["trainable_params"] for m in MODES}
  assert n["delora"] == n["delora_merged"] == n["lora"] + 14  # one λ per adapted kernel (2 x 7)
  assert n["lora_plain"] == n["lora"]
  assert n["lora"] < n["full"] and r["frozen"]["differentiated"] == 2 * 32 * 64
  assert n["lora"] == 2 * sum(
    16 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 176), (64, 176), (176, 64)]
  )
  assert r["frozen"]["flops"] < r["lora"]["flops"] < r["full"]["flops"]
  assert rat["delora/lora"]["flops"] == pytest.approx(r["delora"]["flops"] / r["lora"]["flops"])
  assert 1.0 <= rat["delora/lora"]["flops"] <= 1.2
  assert r["delora"]["delora_paths"] == {"factorised": 14, "merged": 0, "unused": 0}
  # Memory: the merged path keeps W + ΔW for every kernel until the backward pass; the
  # factorised one never forms it (the smoke run is one CPU device: the joined form).
  mem = {m: r[m]["memory_bytes"]["total"] for m in MODES}
  assert mem["delora"] < mem["delora_merged"]
  assert mem["lora"] <= mem["lora_plain"]  # the shared fused layer keeps one output buffer
  # b = 0 (LoRA, DeLoRA) and a zero embedding offset (frozen): all modes start from one model.
  first = [r[m]["first_loss"] for m in MODES]
  np.testing.assert_allclose(first, first[0], rtol=1e-5)
  assert first[0] == pytest.approx(math.log(128), rel=0.05)


def test_lora_baseline_is_w_plus_ab():
  cfg = LlamaConfig.preset("tiny")
  model, x = Llama(cfg), jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  params = model.init(jax.random.key(0), x)["params"]
  lora = bench.lora_init(params, 4, jax.random.key(1))
  lora = jax.tree.map(lambda v: v + 0.05 if v.ndim == 2 and v.shape[0] == 4 else v, lora)  # b != 0
  got = {}
  forms = [(True, "plain"), (False, "plain"), (True, "joined")]
  for flatten, form in forms:
    with nn.intercept_methods(bench.lora_interceptor(2.0, flatten, form)):
      got[flatten, form] = model.apply({"params": bench.deep_merge(params, lora)}, x)
  flat, lflat = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(lora)
  for path in list(flat):
    if path[-2] in bench.TARGETS:
      a, b = lflat[path[:-1] + ("lora_a",)], lflat[path[:-1] + ("lora_b",)]
      flat[path] = flat[path] + 2.0 * a @ b
  want = model.apply({"params": flax.traverse_util.unflatten_dict(flat)}, x)
  assert len(lflat) == 2 * 7 * 2
  for key in forms:
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_qlora_baseline_is_dequantized_w_plus_ab():
  """The harness's LoRA on a base stored quantized (scale.py --quantize): the dequantized kernel plus a @ b."""
  from delora_jax import _quant  # noqa: PLC0415

  cfg = LlamaConfig.preset("tiny")
  model, x = Llama(cfg), jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  params = model.init(jax.random.key(0), x)["params"]
  lora = jax.tree.map(lambda v: v + 0.05, bench.lora_init(params, 4, jax.random.key(1)))  # b != 0
  flat, lflat = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(lora)
  quantized, want = dict(flat), dict(flat)
  for path in flat:
    if path[-2] in bench.TARGETS:
      quantized[path] = q = _quant.quantize(flat[path], "nf4", (-2,), 4)
      a, b = lflat[path[:-1] + ("lora_a",)], lflat[path[:-1] + ("lora_b",)]
      want[path] = _quant.dequantize(q) + 2.0 * a @ b
  with nn.intercept_methods(bench.lora_interceptor(2.0, True, "joined")):
    got = model.apply({"params": bench.deep_merge(flax.traverse_util.unflatten_dict(quantized), lora)}, x)
  want = model.apply({"params": flax.traverse_util.unflatten_dict(want)}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "argv, match",
  [
    (["--modes", "lora,qlora"], "unknown \\['qlora'\\]"),
    (["--config", "tiny", "--peft"], "the PEFT CPU anchor runs"),
  ],
  ids=["mode", "peft-shape"],
)
def test_cli_errors(argv, match, capsys):
  with pytest.raises(SystemExit):
    bench.parse(argv)
  assert match.replace("\\", "") in capsys.readouterr().err
