"""Test setup: 8 simulated CPU devices (before jax is imported), strict numerics."""

import os

# Added to the user's own XLA_FLAGS (if any), unless they already set a device count.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile thousands of tiny programs (eager ops, one jit per case) and little else:
# LLVM's optimisation level 0 takes about a third off their compile time. The HLO (fusion,
# layouts, collectives, the costs and bytes the tests read) and the numerics (no fast-math at
# either level) do not depend on it. XLA reads its flags once, when the backend starts, so this
# process starts it here and then restores the user's flags: subprocesses the tests start (the
# examples, the benchmarks, multi-process runs) run fully optimised code.
_fast = "--xla_backend_optimization_level" not in _flags
if _fast:
  os.environ["XLA_FLAGS"] = _flags + " --xla_backend_optimization_level=0"

import jax  # noqa: E402

if _fast:
  jax.devices()  # starts the backend with the flags above
  os.environ["XLA_FLAGS"] = _flags

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
