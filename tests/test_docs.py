"""The docs site's pages: every ```python block of a guide runs, and the API pages cover the API.

A page's blocks run in order in one namespace (a page is one worked example), in a fresh
working directory. Pages that a topical test already executes are checked to be executed there.
"""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# page -> the test files that execute its blocks (with what the page needs around them).
EXECUTED_ELSEWHERE = {
  "checkpoints.md": ("test_checkpoint.py", "test_peft_io.py"),  # orbax part; all (torch, PEFT)
  "distributed.md": ("test_distributed.py", "test_multiprocess.py"),  # one process; two
  # gemma 1-3 and tunix: main stack only; gemma 4 and MaxText (blocks starting "# gemma 4" /
  # "# MaxText"): Python >= 3.12, CI's real-code stack only
  "real_models.md": ("test_real_models.py", "test_gemma4.py", "test_maxtext.py"),
  "examples.md": ("test_examples.py",),  # reads the example's output: main stack only
  "from_peft.md": ("test_peft_config.py",),  # torch and PEFT: main stack only
}


def blocks(page: str) -> list[str]:
  return BLOCK.findall((DOCS / page).read_text())


def guide_pages() -> list[str]:
  return sorted(p.name for p in DOCS.glob("*.md") if p.name != "index.md")


@pytest.mark.parametrize("page", [p for p in guide_pages() if p not in EXECUTED_ELSEWHERE])
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ns: dict = {}
  for i, block in enumerate(blocks(page)):
    exec(compile(block, f"docs/{page}[block {i}]", "exec"), ns)  # noqa: S102 (our docs)


@pytest.mark.parametrize("page", sorted(EXECUTED_ELSEWHERE))
def test_pages_run_elsewhere_are_run_there(page):
  assert blocks(page), f"docs/{page} has no python block"
  for test_file in EXECUTED_ELSEWHERE[page]:
    src = (ROOT / "tests" / test_file).read_text()
    assert f'"{page}"' in src and "exec(compile(" in src, test_file


def test_api_pages_cover_every_public_module():
  documented = set(re.findall(r"automodule:: (\S+)", "".join(p.read_text() for p in (DOCS / "api").glob("*.md"))))
  for modname in ("delora_jax", "delora_jax.nnx", "delora_jax.peft", "delora_jax.models", "delora_jax.models.bert"):
    assert modname in documented
    mod = importlib.import_module(modname)
    subs = [getattr(mod, n).__name__ for n in getattr(mod, "__all__", ()) if isinstance(getattr(mod, n), type(mod))]
    assert set(subs) <= documented, modname
