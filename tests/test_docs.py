"""The README's and the docs site's code: every ```python block runs as pasted, and the API pages
cover the API.

As pasted: a block needs nothing from outside itself (its own imports and inputs), unless its first
line says otherwise: ``# continues ...`` (it runs after the page's earlier blocks, in the same
session) or ``# ... inputs: `name`, ...`` (a template on a real model whose inputs it names). That
is checked on the source, for every block, cheaply; the blocks themselves run here, a page's in
order in one namespace in a fresh working directory, or in the topical test that checks what they
do and has their packages (listed in EXECUTED_ELSEWHERE, and checked to be run there).
"""

import builtins
import importlib
import pathlib
import re
import symtable

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# page -> the test files that execute its blocks (with what the page needs around them).
EXECUTED_ELSEWHERE = {
  "README.md": ("test_readme.py", "test_stacked.py"),  # quickstart (as examples/quickstart.py), NNX, any layer; layouts
  "docs/checkpoints.md": ("test_checkpoint.py", "test_peft_io.py"),  # orbax part; all (torch, PEFT)
  "docs/distributed.md": ("test_distributed.py", "test_multiprocess.py"),  # one process; two
  # gemma 1-3 and tunix: main stack only; gemma 4 and MaxText (blocks starting "# gemma 4" /
  # "# MaxText"): Python >= 3.12, CI's real-code stack only
  "docs/real_models.md": ("test_real_models.py", "test_gemma4.py", "test_maxtext.py"),
  "docs/examples.md": ("test_examples.py",),  # reads the example's output: main stack only
  "docs/from_peft.md": ("test_peft_config.py",),  # torch and PEFT: main stack only
  "docs/tunix.md": ("test_tunix.py",),  # tunix's PeftTrainer: main stack only
  "docs/maxtext.md": ("test_maxtext.py",),  # MaxText: Python >= 3.12, CI's real-code stack only
}


def blocks(page: str) -> list[str]:
  return BLOCK.findall((ROOT / page).read_text())


def pages() -> list[str]:
  return ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))]


def defined_and_free(src: str, name: str) -> tuple[set[str], set[str]]:
  """The names a block defines at its top level, and those it reads without defining them."""
  top = symtable.symtable(src, name, "exec")
  defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
  free: set[str] = set()
  tables = [top]
  while tables:
    t = tables.pop()
    for s in t.get_symbols():
      unbound = not (s.is_assigned() or s.is_imported()) if t is top else s.is_global()
      if s.is_referenced() and unbound:
        free.add(s.get_name())
    tables.extend(t.get_children())
  return defined, free - defined - set(dir(builtins))


@pytest.mark.parametrize("page", pages())
def test_every_block_runs_as_pasted(page):
  """Each block defines or imports every name it uses, but for the earlier blocks' names where it says
  that it continues them, and the inputs its first line names."""
  seen: set[str] = set()
  for i, block in enumerate(blocks(page)):
    first = block.split("\n", 1)[0]
    defined, free = defined_and_free(block, f"{page}[block {i}]")
    if first.startswith("# continues "):
      free -= seen
    elif "inputs:" in first:
      free -= set(re.findall(r"`(\w+)`", first.split("inputs:", 1)[1]))
    assert not free, f"{page}, python block {i} uses {sorted(free)} without defining or importing them"
    seen |= defined


def test_the_as_pasted_check_can_fail():
  assert defined_and_free("import jax\nx = jax.numpy.ones(3)\ndef f():\n  return y + x\n", "t")[1] == {"y"}
  assert defined_and_free("for i in range(3):\n  print(i, [j for j in z])\n", "t")[1] == {"z"}


@pytest.mark.parametrize("page", [p for p in pages() if p not in EXECUTED_ELSEWHERE])
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ns: dict = {}
  for i, block in enumerate(blocks(page)):
    exec(compile(block, f"{page}[block {i}]", "exec"), ns)  # noqa: S102 (our docs)


@pytest.mark.parametrize("page", sorted(EXECUTED_ELSEWHERE))
def test_pages_run_elsewhere_are_run_there(page):
  assert blocks(page), f"{page} has no python block"
  for test_file in EXECUTED_ELSEWHERE[page]:
    src = (ROOT / "tests" / test_file).read_text()
    assert f'"{pathlib.Path(page).name}"' in src and "exec(" in src, test_file


MODULES = (
  "delora_jax",
  "delora_jax.nnx",
  "delora_jax.peft",
  "delora_jax.models",
  "delora_jax.models.bert",
  "delora_jax.integrations.maxtext",
)


def test_api_pages_cover_every_public_module():
  documented = set(re.findall(r"automodule:: (\S+)", "".join(p.read_text() for p in (DOCS / "api").glob("*.md"))))
  for modname in MODULES:
    assert modname in documented
    mod = importlib.import_module(modname)
    subs = [getattr(mod, n).__name__ for n in getattr(mod, "__all__", ()) if isinstance(getattr(mod, n), type(mod))]
    assert set(subs) <= documented, modname


def test_api_index_summarises_every_public_name():
  """docs/api/index.md's summary tables list each public name once (docs/conf.py's definition of public)."""
  import inspect

  text = (DOCS / "api" / "index.md").read_text()
  listed: dict[str, list[str]] = {}
  for section in text.split(".. currentmodule:: ")[1:]:
    modname, body = section.split("\n", 1)
    listed[modname] = re.findall(r"^   (\w+)$", body.split("```", 1)[0], re.M)
  for modname in MODULES:
    mod = importlib.import_module(modname)
    names = getattr(mod, "__all__", None) or [
      n for n, o in vars(mod).items() if not n.startswith("_") and inspect.getmodule(o) is mod
    ]
    public = sorted(n for n in names if not inspect.ismodule(getattr(mod, n)))
    assert sorted(listed[modname]) == public, modname


def test_readme_links_resolve():
  """The README's relative links point at files of the checkout (the docs build checks the docs' own)."""
  text = (ROOT / "README.md").read_text()
  targets = [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in t]
  assert len(targets) > 10
  assert [t for t in targets if not (ROOT / t).exists()] == []
