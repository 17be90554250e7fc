"""pytest options of the whole checkout: `--core` (the stacks without torch, gemma or tunix)
and a header with the versions the run resolved. The test setup itself: tests/conftest.py."""

import pathlib

# The files that run only on the main stack (the README's test command): they import PyTorch,
# PEFT, transformers, gemma, tunix or the examples' packages, or are the slow multi-process and
# example runs. `pytest --core` (CI's lower-bounds and newest-JAX stacks, which install none of
# those) leaves out exactly these, and says so in its header; every other test runs everywhere.
MAIN_STACK_ONLY = (
  "tests/test_bert.py",  # torch, transformers, the examples' BERT checkpoint and tokenizer
  "tests/test_examples.py",  # slow; torch, peft, the examples' packages
  "tests/test_llama.py",  # torch, transformers
  "tests/test_multiprocess.py",  # slow: two JAX processes
  "tests/test_peft_io.py",  # torch, peft, transformers
  "tests/test_peft_parity.py",  # torch, peft
  "tests/test_peft_config.py",  # torch, peft (PEFT's own DeLoRA test cases)
  "tests/test_peft_hf.py",  # torch, peft, transformers
  "tests/test_real_models.py",  # gemma, tunix
  "tests/torch_mlp.py",  # torch (a helper, collected for its doctests)
  "delora_jax/models/bert.py",  # its doctests load the examples' BERT checkpoint package
)
_ROOT = pathlib.Path(__file__).resolve().parent


def pytest_addoption(parser):
  parser.addoption(
    "--core", action="store_true", help="leave out the main-stack-only test files (tests/conftest.py MAIN_STACK_ONLY)"
  )


def pytest_ignore_collect(collection_path, config):
  if config.getoption("--core") and collection_path in {_ROOT / p for p in MAIN_STACK_ONLY}:
    return True
  return None


def pytest_report_header(config):
  import importlib.metadata
  import sys

  got = [f"python {sys.version.split()[0]}"]
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    got.append(f"{dist} {importlib.metadata.version(dist)}")
  lines = ["stack: " + ", ".join(got)]
  if config.getoption("--core"):
    lines.append("--core: not run on this stack (main stack only): " + ", ".join(MAIN_STACK_ONLY))
  return lines
