"""Adapter-only orbax checkpoints: exact round trips, size, sharding, checks, crash safety."""

import gc
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import delora_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPT = delora_jax.optimizer(optax.adamw, learning_rate=1e-2, weight_decay=0.01)


def base(seed=0, dtype=jnp.float32, stacked=False):
  k = jax.random.split(jax.random.key(seed), 3)
  lead = (3,) if stacked else ()
  return {
    "enc": {"kernel": jax.random.normal(k[0], (*lead, 16, 12), dtype), "bias": jnp.zeros((*lead, 12), dtype)},
    "dec": {"kernel": jax.random.normal(k[1], (*lead, 12, 8), dtype)},
  }


def adapted(params, rank=4, init="random", stacked=False, key=0):
  rule = delora_jax.Rule(rank, lam=5.0, init=init, stack_axes=1 if stacked else 0)
  return delora_jax.wrap(params, {".*kernel": rule}, key=jax.random.key(key))


@jax.jit
def _train_step(tree, state):
  trainable, frozen = delora_jax.split(tree)
  loss = lambda t: sum(jnp.sum(d**2) for d in delora_jax.delta(delora_jax.combine(t, frozen)).values())
  upd, state = OPT.update(jax.grad(loss)(trainable), state, trainable)
  return delora_jax.combine(optax.apply_updates(trainable, upd), frozen), state


def trained(tree, steps=2):
  """A few AdamW steps on a quadratic loss, so adapters and optimizer state are non-trivial."""
  state = OPT.init(delora_jax.split(tree)[0])
  for _ in range(steps):
    tree, state = _train_step(tree, state)
  return tree, state


def assert_same_tree(got, want):
  gl, gd = jax.tree_util.tree_flatten(got)
  wl, wd = jax.tree_util.tree_flatten(want)
  assert gd == wd
  for g, w in zip(gl, wl):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def dir_bytes(path):
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def adapter_bytes(tree):
  return sum(x.nbytes for f in delora_jax.adapters(tree).values() for x in f.values())


@pytest.mark.parametrize("kind", ["f32", "bf16_base_stacked", "paper"])
def test_round_trip_is_exact_with_optimizer_state(tmp_path, kind):
  stacked = kind == "bf16_base_stacked"
  params = base(dtype=jnp.bfloat16 if stacked else jnp.float32, stacked=stacked)
  init = "paper" if kind == "paper" else "random"
  tree, state = trained(adapted(params, init=init, stacked=stacked))
  path = delora_jax.save_adapters(tmp_path / "ckpt", tree, opt_state=state)
  target = adapted(params, init=init, stacked=stacked, key=7)
  got, got_state = delora_jax.load_adapters(path, target, opt_state=OPT.init(delora_jax.split(target)[0]))
  assert_same_tree(got, tree)
  assert_same_tree(got_state, state)
  assert got["enc"]["kernel"].w is target["enc"]["kernel"].w  # the base is not touched
  if stacked:
    assert got["enc"]["kernel"].a.dtype == jnp.float32 and got["enc"]["kernel"].w.dtype == jnp.bfloat16
    assert got["enc"]["kernel"].a.shape == (3, 16, 4)
  if kind == "paper":
    assert got["dec"]["kernel"].res_a is not None
  assert_same_tree(delora_jax.load_adapters(path, target), tree)  # opt_state is optional on load


def test_checkpoint_holds_only_adapters(tmp_path):
  tree = adapted(base())
  path = delora_jax.save_adapters(tmp_path / "a", tree)
  assert dir_bytes(path) <= 1.25 * adapter_bytes(tree) + 64 * 1024


def llama_params(h=512, layers=4, heads=8, kv_heads=2, inter=1408, vocab=8192):
  rng = np.random.default_rng(0)
  hd = h // heads
  shapes = {"embed_tokens/embedding": (vocab, h), "norm/scale": (h,), "lm_head/kernel": (h, vocab)}
  for i in range(layers):
    shapes.update(
      {
        f"layers_{i}/input_layernorm/scale": (h,),
        f"layers_{i}/post_attention_layernorm/scale": (h,),
        f"layers_{i}/self_attn/q_proj/kernel": (h, heads * hd),
        f"layers_{i}/self_attn/k_proj/kernel": (h, kv_heads * hd),
        f"layers_{i}/self_attn/v_proj/kernel": (h, kv_heads * hd),
        f"layers_{i}/self_attn/o_proj/kernel": (heads * hd, h),
        f"layers_{i}/mlp/gate_proj/kernel": (h, inter),
        f"layers_{i}/mlp/up_proj/kernel": (h, inter),
        f"layers_{i}/mlp/down_proj/kernel": (inter, h),
      }
    )
  params = {}
  for path, shape in shapes.items():
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)
  return params


def test_llama_adapter_checkpoint_is_under_3_percent_of_full(tmp_path):
  params = llama_params()
  tree = delora_jax.wrap(params, {r"layers_\d+/.*_proj/kernel": delora_jax.Rule(8, init="random")})
  path = delora_jax.save_adapters(tmp_path / "adapters", tree)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "full", params)
  adapters, full = dir_bytes(path), dir_bytes(tmp_path / "full")
  assert adapters <= 1.25 * adapter_bytes(tree) + 64 * 1024
  assert adapters < 0.03 * full, (adapters, full)


def test_sharded_save_and_restore_takes_target_shardings(tmp_path):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  rows, cols, rep = (NamedSharding(mesh, s) for s in (P("x"), P(None, "x"), P()))
  params = {"enc": {"kernel": jax.random.normal(jax.random.key(0), (32, 16))}}
  tree = delora_jax.wrap(params, {"enc/kernel": delora_jax.Rule(8, init="random")})

  def placed(t, a_sharding):
    k = t["enc"]["kernel"]
    put = jax.device_put
    return {
      "enc": {
        "kernel": k.replace(
          w=put(k.w, rows), a=put(k.a, a_sharding), b=put(k.b, cols), lam=put(k.lam, rep), w_norm=put(k.w_norm, rows)
        )
      }
    }

  src = placed(tree, rows)
  path = delora_jax.save_adapters(tmp_path / "s", src)
  target = placed(adapted_like(params), cols)
  got = delora_jax.load_adapters(path, target)["enc"]["kernel"]
  assert got.a.sharding.is_equivalent_to(cols, 2) and got.b.sharding.is_equivalent_to(cols, 2)
  assert got.w_norm.sharding.is_equivalent_to(rows, 1)
  np.testing.assert_array_equal(np.asarray(got.a), np.asarray(tree["enc"]["kernel"].a))
  explicit = delora_jax.load_adapters(path, target, shardings={"enc/kernel": rep})["enc"]["kernel"]
  assert explicit.a.sharding.is_equivalent_to(rep, 2)
  np.testing.assert_array_equal(np.asarray(explicit.b), np.asarray(tree["enc"]["kernel"].b))


def adapted_like(params):
  return delora_jax.wrap(params, {"enc/kernel": delora_jax.Rule(8, init="random")}, key=jax.random.key(3))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  tree, state = trained(adapted(base()))
  path = delora_jax.save_adapters(tmp_path_factory.mktemp("ck") / "c", tree, opt_state=state)
  return path, tree, state


MISMATCHES = {
  "missing_path": (lambda: delora_jax.wrap(base(), {"enc/kernel": 4}), "not adapted in the target"),
  "extra_path": (
    lambda: delora_jax.wrap({**base(), "head": {"kernel": jnp.ones((8, 8))}}, {".*kernel": 4}),
    "absent from the checkpoint",
  ),
  "rank": (lambda: adapted(base(), rank=2), "rank 4 in the checkpoint, 2 in the target"),
  "shape": (
    lambda: adapted({"enc": {"kernel": jnp.ones((20, 12)), "bias": jnp.zeros(12)}, "dec": base()["dec"]}),
    "base kernel shape",
  ),
  "other_base": (lambda: adapted(base(seed=5)), "base kernel differs"),
  "paper_vs_random": (lambda: adapted(base(), init="paper"), "fields"),
  "adapter_dtype": (lambda: delora_jax.wrap(base(), {".*kernel": delora_jax.Rule(4, dtype="bfloat16")}), "bfloat16"),
  "dropout": (lambda: delora_jax.wrap(base(), {".*kernel": delora_jax.Rule(4, dropout=0.1)}), "dropout"),
}


@pytest.mark.parametrize("case", list(MISMATCHES), ids=list(MISMATCHES))
def test_mismatched_target_is_a_clear_error(saved, case):
  path, _, _ = saved
  make, msg = MISMATCHES[case]
  target = make()
  before = jax.tree_util.tree_map(np.asarray, target)
  with pytest.raises(ValueError, match=re.escape(msg)):
    delora_jax.load_adapters(path, target)
  assert_same_tree(jax.tree_util.tree_map(np.asarray, target), before)


def test_optimizer_state_mismatches(saved, tmp_path):
  path, tree, _ = saved
  other = optax.sgd(0.1).init(delora_jax.split(tree)[0])
  with pytest.raises(ValueError, match="does not fit the target `opt_state`"):
    delora_jax.load_adapters(path, tree, opt_state=other)
  bare = delora_jax.save_adapters(tmp_path / "bare", tree)
  with pytest.raises(ValueError, match="holds no optimizer state"):
    delora_jax.load_adapters(bare, tree, opt_state=OPT.init(delora_jax.split(tree)[0]))
  with pytest.raises(TypeError, match="expected an array"):
    delora_jax.save_adapters(tmp_path / "x", tree, opt_state={"count": 3})


def test_argument_errors(saved, tmp_path):
  path, tree, _ = saved
  with pytest.raises(ValueError, match="already exists"):
    delora_jax.save_adapters(path, tree)
  with pytest.raises(ValueError, match="holds no DeLoRA-adapted kernel"):
    delora_jax.load_adapters(path, base())
  with pytest.raises(ValueError, match="does not exist"):
    delora_jax.load_adapters(tmp_path / "nope", tree)
  with pytest.raises(TypeError, match="`directory` must be a path"):
    delora_jax.load_adapters(3, tree)
  with pytest.raises(ValueError, match="no finished checkpoint for step 4"):
    delora_jax.load_adapters(tmp_path, tree, step=4)
  with pytest.raises(TypeError, match="`step` must be an int"):
    delora_jax.load_adapters(tmp_path, tree, step="4")
  rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(TypeError, match="`shardings` must be None"):
    delora_jax.load_adapters(path, tree, shardings=["x"])
  with pytest.raises(ValueError, match="no entry for the adapted path 'enc/kernel'"):
    delora_jax.load_adapters(path, tree, shardings={"dec/kernel": rep})
  with pytest.raises(ValueError, match="no entry for field 'b'"):
    delora_jax.load_adapters(path, tree, shardings={p: {"a": rep} for p in ("enc/kernel", "dec/kernel")})
  with pytest.raises(TypeError, match="must be a jax.sharding.Sharding"):
    delora_jax.load_adapters(path, tree, shardings=dict.fromkeys(("enc/kernel", "dec/kernel"), 1))
  overwritten = delora_jax.save_adapters(tmp_path / "o", tree)
  assert delora_jax.save_adapters(overwritten, tree, overwrite=True) == overwritten


def _copy(path, tmp_path):
  import shutil

  dst = tmp_path / "copy"
  shutil.copytree(path, dst)
  return dst


def _corrupt_meta(dst, edit):
  import json

  meta_file = next((dst / "delora_meta").glob("metadata*"))
  meta = json.loads(meta_file.read_text())
  edit(meta)
  meta_file.write_text(json.dumps(meta))


CORRUPTIONS = {
  "no_meta_item": (lambda d: __import__("shutil").rmtree(d / "delora_meta"), "not a delora_jax adapter checkpoint"),
  "wrong_format": (lambda d: _corrupt_meta(d, lambda m: m.update(format="x")), "not a delora_jax adapter checkpoint"),
  "newer_version": (lambda d: _corrupt_meta(d, lambda m: m.update(version=99)), "format version 99"),
  "meta_garbage": (lambda d: next((d / "delora_meta").glob("metadata*")).write_text("{not json"), "unreadable"),
  "opt_item_missing": (lambda d: __import__("shutil").rmtree(d / "delora_opt_state"), "do not match its metadata"),
  "checksum": (
    lambda d: _corrupt_meta(d, lambda m: m["kernels"]["dec/kernel"]["fields"]["b"].update(checksum="0" * 32)),
    "checksum mismatch",
  ),
  # Switching the checks off by editing the metadata: one process saved it, so each array has a
  # checksum, and a missing one is refused (the data is even intact here).
  "checksum_nulled": (
    lambda d: _corrupt_meta(d, lambda m: m["kernels"]["dec/kernel"]["fields"]["b"].update(checksum=None)),
    "no checksum where one process saved every array",
  ),
  "no_commit_marker": (lambda d: (d / "commit_success.txt").unlink(), "not a finished checkpoint"),
  "data_files": (lambda d: [f.write_bytes(b"\0" * 7) for f in (d / "delora_adapters").rglob("d/*")], "corrupt"),
}


# On unreadable array data, orbax/tensorstore leave callbacks for an already closed event loop
# (reported as "unraisable" RuntimeErrors after our ValueError is raised): third-party noise.
_ORBAX_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.parametrize(
  "case",
  [pytest.param(c, marks=[_ORBAX_NOISE] if c == "data_files" else []) for c in CORRUPTIONS],
  ids=list(CORRUPTIONS),
)
def test_corrupt_checkpoint_is_a_clear_error(saved, tmp_path, case):
  path, tree, state = saved
  dst = _copy(path, tmp_path)
  damage, msg = CORRUPTIONS[case]
  damage(dst)
  before = jax.tree_util.tree_map(np.asarray, tree)
  with pytest.raises(ValueError, match=msg):
    delora_jax.load_adapters(dst, tree, opt_state=state)
  gc.collect()  # let orbax's leftovers surface within this test (see _ORBAX_NOISE)
  assert_same_tree(jax.tree_util.tree_map(np.asarray, tree), before)


def test_checksums_of_a_multi_process_save_may_be_absent(saved, tmp_path):
  # A multi-process save cannot hash arrays whose shards are spread over processes: its
  # metadata says so ("processes"), and only there may a checksum be absent.
  path, tree, state = saved
  dst = _copy(path, tmp_path)

  def spread(m):
    m["processes"] = 2
    m["kernels"]["dec/kernel"]["fields"]["b"]["checksum"] = None

  _corrupt_meta(dst, spread)
  restored, _ = delora_jax.load_adapters(dst, tree, opt_state=state)
  np.testing.assert_array_equal(restored["dec"]["kernel"].b, tree["dec"]["kernel"].b)


def test_docs_snippets_run(tmp_path, monkeypatch):
  """The orbax ```python blocks of docs/checkpoints.md run, in order, in one namespace (the
  whole page, with its torch/PEFT part, runs in test_peft_io.py: main stack only)."""
  text = (ROOT / "docs" / "checkpoints.md").read_text().split("## PEFT adapter folders")[0]
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) == 5  # save/load, heads saved along, optimizer state, CheckpointManager, sharded
  monkeypatch.chdir(tmp_path)
  ns = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/checkpoints.md[block {i}]", "exec"), ns)


CHILD = textwrap.dedent("""
    import dataclasses, sys, time
    import jax, jax.numpy as jnp, orbax.checkpoint as ocp
    import delora_jax

    class Stall(ocp.CheckpointHandler):
      # An item that starts writing and never finishes (the process is killed meanwhile).
      def save(self, directory, args):
        (directory / "partial.bin").write_bytes(b"x" * 4096)
        deadline = time.monotonic() + 60  # let the adapters item start writing too
        while not list(directory.parent.glob("delora_adapters*")) and time.monotonic() < deadline:
          time.sleep(0.01)
        open(sys.argv[2], "w").close()
        time.sleep(600)
      def restore(self, directory, args=None):
        return None

    @ocp.args.register_with_handler(Stall, for_save=True)
    @dataclasses.dataclass
    class StallSave(ocp.args.CheckpointArgs):
      pass

    @ocp.args.register_with_handler(Stall, for_restore=True)
    @dataclasses.dataclass
    class StallRestore(ocp.args.CheckpointArgs):
      pass

    params = {"enc": {"kernel": jnp.arange(96.0).reshape(16, 6) / 50}}
    tree = delora_jax.wrap(params, {"enc/kernel": delora_jax.Rule(2, init="random")})
    opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
    with ocp.CheckpointManager(sys.argv[1], options=opts) as mngr:
      for step in range(3):
        k = tree["enc"]["kernel"]
        tree = {"enc": {"kernel": k.replace(lam=k.lam + 1.0)}}
        args = delora_jax.adapter_save_args(tree)
        if step > 0:
          args = ocp.args.Composite(**args, stall=StallSave())
        mngr.save(step, args=args)
        mngr.wait_until_finished()
""")


def test_crash_mid_save_leaves_previous_step_restorable(tmp_path):
  root, marker = tmp_path / "run", tmp_path / "writing"
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  child = subprocess.Popen(
    [sys.executable, str(script), str(root), str(marker)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    deadline = time.monotonic() + 120
    while not marker.exists():
      assert child.poll() is None, "child exited before reaching the second save"
      assert time.monotonic() < deadline, "child did not reach the second save"
      time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
  finally:
    child.kill()
    child.wait()
  names = sorted(p.name for p in root.iterdir())
  assert "0" in names and "1" not in names
  tmp = [root / n for n in names if n.startswith("1.orbax-checkpoint-tmp")]
  assert len(tmp) == 1 and list(tmp[0].glob("delora_adapters*"))  # half-written step 1 is there

  params = {"enc": {"kernel": jnp.arange(96.0).reshape(16, 6) / 50}}
  target = delora_jax.wrap(params, {"enc/kernel": delora_jax.Rule(2, init="random")})
  with pytest.raises(ValueError, match="not a finished checkpoint"):
    delora_jax.load_adapters(tmp[0], target)
  with pytest.raises(ValueError, match="no finished checkpoint for step 1"):
    delora_jax.load_adapters(root, target, step=1)
  got = delora_jax.load_adapters(root, target, step=0)["enc"]["kernel"]
  assert float(got.lam) == 16.0  # lam 15 + 1 at step 0
  np.testing.assert_array_equal(np.asarray(got.a), np.asarray(target["enc"]["kernel"].a))
  with ocp.CheckpointManager(root) as mngr:  # a resumed run sees step 0 only, and goes on
    assert mngr.latest_step() == 0 and list(mngr.all_steps()) == [0]
    mngr.save(1, args=delora_jax.adapter_save_args(target))
    mngr.wait_until_finished()
  assert float(delora_jax.load_adapters(root, target, step=1)["enc"]["kernel"].lam) == 15.0
