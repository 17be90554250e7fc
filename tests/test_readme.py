"""The README's commands and quickstart are the ones CI and examples/ run."""

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme():
  return (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
  blocks = re.findall(r"```bash\n(.*?)\n```", readme(), re.S)
  test_cmd = next(b for b in blocks if "pytest" in b)
  ci = (ROOT / ".ci" / "run").read_text()
  assert test_cmd in ci
  assert any("examples/finetune.py" in b for b in blocks)


def test_quickstart_is_examples_quickstart_verbatim_and_runs():
  block = re.search(r"## Quickstart.*?```python\n(.*?)```", readme(), re.S).group(1)
  assert block.strip() == (ROOT / "examples" / "quickstart.py").read_text().strip()
  out = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300, cwd=ROOT
  )
  assert out.returncode == 0, out.stderr
  before, after = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out.stdout).groups())
  assert after < 0.8 * before


def test_nnx_snippet_runs_and_trains():
  block = re.search(r"### Flax NNX.*?```python\n(.*?)```", readme(), re.S).group(1)
  ns = {}
  exec("import jax, jax.numpy as jnp, optax, delora_jax\n" + block, ns)  # noqa: S102 (our README)
  x = jax.random.normal(jax.random.key(0), (16, 8))
  y = jnp.sin(x[:, :4])
  losses = [float(ns["step"](ns["adapted"], ns["opt"], x, y)) for _ in range(30)]
  assert losses[-1] < 0.8 * losses[0]
  assert type(ns["merged"]).__name__ == "Linear"


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
