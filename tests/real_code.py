"""Imports for the tests that run third-party model code needing Python >= 3.12 (gemma 4, MaxText).

Those packages exist only on CI's real-code stack (`.ci/real-lock.txt`). Elsewhere the test files
skip, saying which package is missing; with ``REQUIRE_REAL_MODELS=1`` (set by that CI stage) a
missing package is a failure instead, so the stage cannot pass by skipping.
"""

import importlib
import os
import warnings

import pytest


def require(module: str, why: str):
  """``importlib.import_module(module)``, or skip the calling test module (fail under REQUIRE_REAL_MODELS=1)."""
  try:
    # Their import-time deprecation notices (e.g. sympy's `mpmath.mpnumeric` under MaxText) are not
    # ours to fix; the suite turns warnings into errors, so they are silenced for the import only.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      warnings.simplefilter("ignore", FutureWarning)
      return importlib.import_module(module)
  except ImportError as e:
    msg = f"{module} is not importable ({e}): {why}"
    if os.environ.get("REQUIRE_REAL_MODELS") == "1":
      pytest.fail(f"REQUIRE_REAL_MODELS=1 but {msg}", pytrace=False)
    pytest.skip(msg, allow_module_level=True)
