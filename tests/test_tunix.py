"""tunix's own PeftTrainer, unchanged, with DeLoRA in its LoRA recipe (docs/tunix.md, run as pasted).

The page's block trains a tiny random Llama3 for 4 steps, checkpoints, and resumes to step 8 in a new
trainer, with ``delora_jax.optimizer`` and the recipe's sharding step. Checked here: only ``a``, ``b``
and λ train, the loss goes down, the resume restores and continues bit for bit; the recipe's qwix
selector (``delora_jax.Modules``) and its keyword example input (``like=model.get_model_input()``).
"""

import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx
from tunix.sft import sharding_utils

import delora_jax
from tests.helpers import assert_trees_equal

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [
  # tunix's code and its recipe, not ours: the recipe's `with mesh:` (tunix's trainer reads its mesh
  # from it), tunix's `pxla.thread_resources`, `optax.global_norm` and `.value` reads.
  pytest.mark.filterwarnings("ignore:.*context manager has been deprecated:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:jax.interpreters.pxla.thread_resources:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning"),
]
TARGETS = ".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj"  # the recipe's (qwix's)


@pytest.fixture(autouse=True)
def _third_party_rank_promotion():
  """tunix's norms broadcast (embed,) against (batch, seq, embed) (conftest forbids it for our code)."""
  with jax.numpy_rank_promotion("allow"):
    yield


@pytest.fixture(scope="module")
def recipe():
  """The namespace of docs/tunix.md's block after it ran, as pasted, in an empty namespace."""
  block = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "tunix.md").read_text(), re.S | re.M)
  assert len(block) == 1
  ns: dict = {}
  with jax.numpy_rank_promotion("allow"):
    exec(compile(block[0], "docs/tunix.md", "exec"), ns)  # noqa: S102 (our docs)
  return ns


def _flat(state) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def test_peft_trainer_trains_only_a_b_lam_and_the_loss_goes_down(recipe):
  fresh = recipe["apply_delora"](recipe["load_base_model"]())  # the model as it was before training
  before, after = _flat(nnx.state(fresh)), _flat(nnx.state(recipe["resumed_model"]))
  assert before.keys() == after.keys()
  changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
  assert changed == sorted(_flat(nnx.state(fresh, delora_jax.nnx.DeloraParam)))  # a, b, λ and nothing else
  assert len(changed) == 42 and all(re.search(r"_delora'\]\['(a|b|lam)'\]", k) for k in changed)  # 14 kernels
  # the eval loss of tunix's own metrics: before training, after step 4, after step 8 (resumed)
  first = recipe["trainer"].metrics_logger.get_metric_history("", "loss", "eval")
  second = recipe["resumed"].metrics_logger.get_metric_history("", "loss", "eval")
  assert first[-1] == pytest.approx(second[0], rel=1e-6)  # the resumed trainer starts where the first ended
  assert second[-1] < first[-1] < first[0] - 0.01, (first, second)


def test_resume_restores_and_continues_bit_for_bit(recipe):
  trainer, resumed = recipe["trainer"], recipe["resumed"]
  assert trainer.train_steps == 4 and resumed.train_steps == 8
  # The first trainer's own compiled step (no new compile) continues its run without a restart, on the
  # batches the resumed trainer took (tunix skips the 4 it had trained).
  step, _ = trainer.jit_train_and_eval_step()
  with recipe["mesh"]:
    for batch in recipe["train_ds"][4:8]:
      step(sharding_utils.shard_input(batch, trainer.config.data_sharding_axis))  # as trainer.train does
  assert_trees_equal(
    _flat(nnx.state(recipe["resumed_model"], nnx.LoRAParam)), _flat(nnx.state(recipe["lora_model"], nnx.LoRAParam))
  )
  opt_state = lambda t: _flat(nnx.state(t.optimizer, nnx.optimizer.OptState))  # noqa: E731
  assert_trees_equal(opt_state(resumed), opt_state(trainer))
  merged = recipe["merged"]  # a plain Llama3 again
  assert type(merged) is type(recipe["load_base_model"]()) and jax.tree.leaves(nnx.state(merged, nnx.LoRAParam)) == []


def test_qwix_selector_and_keyword_example_input_select_and_lay_out_as_parameter_paths(recipe):
  base = recipe["load_base_model"]()
  by_module = delora_jax.nnx.wrap(base, {delora_jax.Modules(TARGETS): 16}, like=base.get_model_input())
  tok, pos = np.ones((1, 8), np.int32), np.arange(8)[None]
  by_path = delora_jax.nnx.wrap(
    base,
    {
      r"layers/\d+/attn/(q_proj|k_proj|v_proj|o_proj)/w": 16,
      r"layers/\d+/mlp/(gate_proj|up_proj|down_proj)/kernel": 16,
    },
    like=(tok, pos, None, np.tril(np.ones((1, 8, 8), bool))),  # positional, another length
  )
  ks_module, ks_path = delora_jax._nnx.kernels(by_module), delora_jax._nnx.kernels(by_path)
  assert sorted(ks_module) == sorted(ks_path) and len(ks_module) == 14
  for p, k in ks_module.items():
    assert (k.in_axes, k.out_axes, k.stack) == (ks_path[p].in_axes, ks_path[p].out_axes, ks_path[p].stack), p
  assert_trees_equal(delora_jax.adapters(by_module), delora_jax.adapters(by_path))


def test_a_module_selector_that_matches_nothing_names_the_module_paths(recipe):
  base = recipe["load_base_model"]()
  want = r"Modules\('\.\*q_einsum'\) matches no module.*'layers/0/attn/k_proj'"
  with pytest.raises(ValueError, match=want):
    delora_jax.nnx.wrap(base, {delora_jax.Modules(".*q_einsum"): 16}, like=base.get_model_input())
