"""Checkpoints never lose data (issue 13, #2 and #3): atomic overwrite, foreign targets refused,
concurrent saves, failed writes, extra leaves, and a soak test with kill -9 and a concurrent reader.

The soak test and the concurrency tests run this file as a script (``writer`` / ``reader`` /
``racer`` roles) in subprocesses.
"""

import errno
import json
import os
import pathlib
import random
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tree(version: int):
  """An adapted tree whose adapters all encode ``version`` exactly (lam = version, a = version/8)."""
  import jax.numpy as jnp  # noqa: PLC0415

  import delora_jax  # noqa: PLC0415

  base = {
    "enc": {"kernel": jnp.arange(48, dtype=jnp.float32).reshape(8, 6) / 10},
    "head": {"kernel": jnp.ones((6, 2)), "bias": jnp.zeros((2,))},
  }
  tree = delora_jax.wrap(base, {"enc/kernel": delora_jax.Rule(2, 1.0)})
  k = tree["enc"]["kernel"]
  k = k.replace(
    a=jnp.full_like(k.a, version / 8), b=jnp.full_like(k.b, version / 4), lam=jnp.full_like(k.lam, float(version))
  )
  return {
    **tree,
    "enc": {"kernel": k},
    "head": {"kernel": jnp.full((6, 2), float(version)), "bias": jnp.full((2,), float(version))},
  }


def _version_of(tree) -> int:
  """The version a loaded tree holds; AssertionError unless every array agrees exactly."""
  k = tree["enc"]["kernel"]
  v = float(k.lam)
  assert v == int(v), v
  v = int(v)
  np.testing.assert_array_equal(k.a, np.full(k.a.shape, v / 8, np.float32))
  np.testing.assert_array_equal(k.b, np.full(k.b.shape, v / 4, np.float32))
  np.testing.assert_array_equal(tree["head"]["kernel"], np.full((6, 2), float(v), np.float32))
  return v


def _load(path):
  import delora_jax  # noqa: PLC0415

  return delora_jax.load_adapters(path, _tree(0))


def _save(path, version, overwrite=True):
  import delora_jax  # noqa: PLC0415

  return delora_jax.save_adapters(path, _tree(version), extra_trainable="head/.*", overwrite=overwrite)


def _leftovers(path) -> list[str]:
  parent = pathlib.Path(path).parent
  return sorted(e.name for e in parent.iterdir() if ".delora-" in e.name or "orbax-checkpoint-tmp" in e.name)


# --- overwrite -----------------------------------------------------------------------------


def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path):
  path = tmp_path / "ckpt"
  _save(path, 1, overwrite=False)
  _save(path, 2)
  assert _version_of(_load(path)) == 2
  assert _leftovers(path) == []


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
  import delora_jax  # noqa: PLC0415

  folder = tmp_path / "work"
  folder.mkdir()
  (folder / "thesis.txt").write_text("four years")
  with pytest.raises(
    ValueError, match=r"is not an adapter checkpoint \(it holds \['thesis.txt'\]\).*nothing was touched"
  ):
    delora_jax.save_adapters(folder, _tree(1), overwrite=True)
  assert (folder / "thesis.txt").read_text() == "four years"
  plain = tmp_path / "notes.txt"
  plain.write_text("keep")
  with pytest.raises(ValueError, match=r"is a file, not an adapter checkpoint"):
    delora_jax.save_adapters(plain, _tree(1), overwrite=True)
  assert plain.read_text() == "keep"
  # A checkpoint a user put a file of their own into is not replaced either.
  ckpt = tmp_path / "ckpt"
  _save(ckpt, 1, overwrite=False)
  (ckpt / "mine.txt").write_text("x")
  with pytest.raises(ValueError, match=r"it holds \['mine.txt'\]"):
    _save(ckpt, 2)
  (ckpt / "mine.txt").unlink()
  assert _version_of(_load(ckpt)) == 1


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  import delora_jax  # noqa: PLC0415

  path = tmp_path / "ckpt"
  _save(path, 1, overwrite=False)
  real = ocp.Checkpointer.save

  def full_disk(self, directory, *args, **kwargs):
    real(self, directory, *args, **kwargs)  # the new checkpoint is half on disk...
    raise OSError(errno.ENOSPC, "No space left on device")  # ...when the disk fills up

  monkeypatch.setattr(ocp.Checkpointer, "save", full_disk)
  with pytest.raises(
    delora_jax.CheckpointError,
    match=(
      r"writing the checkpoint .*ckpt' failed \(OSError: .*No space left"
      r".*the checkpoint already there is unchanged.*free space"
    ),
  ) as info:
    _save(path, 2)
  assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
  monkeypatch.setattr(ocp.Checkpointer, "save", real)
  assert _version_of(_load(path)) == 1
  assert _leftovers(path) == []


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  import delora_jax  # noqa: PLC0415

  def refuse(self, directory, *args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: quota")

  monkeypatch.setattr(ocp.Checkpointer, "save", refuse)
  with pytest.raises(delora_jax.CheckpointError, match="RESOURCE_EXHAUSTED.*nothing was written"):
    _save(tmp_path / "ckpt", 1, overwrite=False)
  assert list(tmp_path.iterdir()) == []


def test_stale_staging_is_removed_only_when_its_lock_is_free(tmp_path):
  # A writer holds an flock on its staging folder's lock file while it runs; the kernel lets it
  # go when the process dies. A sweep deletes only folders whose lock it can take, so a live
  # writer is safe whatever its PID namespace (a container): a PID is never looked at. A
  # second open file description in this process conflicts with flock like another process.
  from delora_jax import _atomic  # noqa: PLC0415

  path = str(tmp_path / "ckpt")
  live_token, live_fd = _atomic.create_staging(path)  # a writer still running
  dead_token, dead_fd = _atomic.create_staging(path)
  os.close(dead_fd)  # a writer killed mid-save: its lock is released, its folder left
  os.makedirs(os.path.join(_atomic.staging_path(path, dead_token), "checkpoint.orbax-checkpoint-tmp-1", "d"))
  unlocked = _atomic.staging_path(path, f"{_atomic.socket.gethostname()}-0123456789ab")
  os.makedirs(unlocked)  # killed before it could create its lock file
  other_host = _atomic.staging_path(path, "another-machine-0123456789ab")
  os.makedirs(other_host)  # on a network filesystem a lock may be local to its machine: left alone
  _save(path, 3, overwrite=False)
  live = _atomic.staging_path(path, live_token)
  assert sorted(_leftovers(path)) == sorted(os.path.basename(p) for p in (live, other_host))
  _atomic.discard(live, live_fd)
  assert _version_of(_load(path)) == 3


@pytest.mark.parametrize("sweep_ends", ["deleted", "still_deleting"])
def test_a_sweep_between_creating_a_staging_folder_and_locking_it_costs_a_retry(tmp_path, monkeypatch, sweep_ends):
  # Concurrent saves on one host sweep each other's staging folders: one may judge a folder
  # another has just made, before that one created and locked its lock file. The sweep wins
  # that folder (it either still holds the lock it created, or has deleted the folder); the
  # save that made it must try another name, not fail.
  from delora_jax import _atomic  # noqa: PLC0415

  path = str(tmp_path / "ckpt")
  real_mkdir, swept, held = os.mkdir, [], []

  def mkdir_then_swept(folder, *args, **kwargs):
    real_mkdir(folder, *args, **kwargs)
    if swept:
      return
    swept.append(folder)
    lock = os.path.join(folder, _atomic.LOCK)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # as the sweep of another save does
    _atomic.fcntl.flock(fd, _atomic.fcntl.LOCK_EX | _atomic.fcntl.LOCK_NB)
    if sweep_ends == "deleted":
      _atomic.shutil.rmtree(folder)
      os.close(fd)
    else:
      held.append(fd)

  monkeypatch.setattr(_atomic.os, "mkdir", mkdir_then_swept)
  token, fd = _atomic.create_staging(path)
  monkeypatch.undo()
  folder = _atomic.staging_path(path, token)
  assert len(swept) == 1 and folder != swept[0] and os.path.isdir(folder)
  other = os.open(os.path.join(folder, _atomic.LOCK), os.O_RDWR)
  with pytest.raises(BlockingIOError):  # the new folder's lock is held by its save
    _atomic.fcntl.flock(other, _atomic.fcntl.LOCK_EX | _atomic.fcntl.LOCK_NB)
  os.close(other)
  _atomic.discard(folder, fd)
  for held_fd in held:
    _atomic.shutil.rmtree(swept[0])
    os.close(held_fd)
  assert _leftovers(path) == []


def test_a_long_legal_name_can_be_saved_to(tmp_path):
  # 200 characters (255 is the limit): the staging folder beside it shortens the name to fit.
  path = tmp_path / ("x" * 150 + "é" * 50)  # 250 bytes
  assert len(os.fsencode(path.name)) == 250
  _save(path, 1, overwrite=False)
  _save(path, 2)
  assert _version_of(_load(path)) == 2 and _leftovers(path) == []


def test_exchange_fallback_keeps_the_old_checkpoint_aside_until_the_new_is_in_place(tmp_path, monkeypatch):
  from delora_jax import _atomic  # noqa: PLC0415

  monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)  # a filesystem without renameat2
  path = tmp_path / "ckpt"
  _save(path, 1, overwrite=False)
  _save(path, 2)
  assert _version_of(_load(path)) == 2 and _leftovers(path) == []


# --- extra leaves --------------------------------------------------------------------------


def test_extra_leaves_are_saved_checked_and_restored(tmp_path):
  import jax.numpy as jnp  # noqa: PLC0415

  import delora_jax  # noqa: PLC0415

  path = _save(tmp_path / "ckpt", 7, overwrite=False)
  got = _load(path)
  assert _version_of(got) == 7
  np.testing.assert_array_equal(got["head"]["bias"], np.full((2,), 7.0, np.float32))
  target = _tree(0)
  target["head"]["kernel"] = jnp.ones((6, 3))
  with pytest.raises(
    ValueError, match=r"head/kernel: float32\(6, 2\) in the checkpoint, float32\(6, 3\) in the target"
  ):
    delora_jax.load_adapters(path, target)
  target = _tree(0)
  del target["head"]["bias"]
  with pytest.raises(ValueError, match=r"head/bias: an extra leaf in the checkpoint .* absent from the target"):
    delora_jax.load_adapters(path, target)
  with pytest.raises(ValueError, match=r"`extra_trainable`='heads/.\*' selects no plain array leaf"):
    delora_jax.save_adapters(tmp_path / "other", _tree(1), extra_trainable="heads/.*")
  assert not (tmp_path / "other").exists()


def test_corrupt_extra_leaf_is_detected(tmp_path):
  path = pathlib.Path(_save(tmp_path / "ckpt", 5, overwrite=False))
  meta_file = next(p for p in (path / "delora_meta").iterdir() if p.name == "metadata")
  meta = json.loads(meta_file.read_text())
  meta["extra"]["head/kernel"]["checksum"] = "0" * 32  # as if the bytes on disk had changed
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"corrupt: the data read for \['head/kernel'\] differs"):
    _load(path)


# --- concurrent saves ----------------------------------------------------------------------


def _spawn(role, *args):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(
    [sys.executable, __file__, role, *map(str, args)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.mark.parametrize(
  ("overwrite", "exchange"),
  [(False, True), (True, True), (True, False)],
  ids=["create", "overwrite", "overwrite_without_exchange"],
)
def test_concurrent_saves_each_succeed_with_their_own_data_or_raise(tmp_path, overwrite, exchange):
  # Without an exchange (not Linux), each save moves the checkpoint there aside before putting
  # its own in place; concurrent saves then move each other's aside, and the last writer wins.
  path = tmp_path / "ckpt"
  if overwrite:
    _save(path, 99, overwrite=False)
  start = time.time() + 12  # all four import jax first, then save at the same moment
  procs = {v: _spawn("racer", path, v, int(overwrite), start, int(exchange)) for v in (1, 2, 3, 4)}
  results = {}
  for v, p in procs.items():
    out, err = p.communicate(timeout=180)  # never hangs
    results[v] = (p.returncode, out.strip(), err)
  ok = [v for v, (rc, out, _) in results.items() if rc == 0 and out == "saved"]
  refused = [v for v, (rc, out, _) in results.items() if rc == 0 and out.startswith("refused")]
  assert sorted(ok + refused) == [1, 2, 3, 4], results
  final = _version_of(_load(path))
  if overwrite:
    assert refused == [] and final in ok, results  # last writer wins, each save was whole
  else:
    assert ok == [final], results  # exactly one created it; the others were told so
    # Told either before writing (it existed already) or after (another save finished first).
    assert all(("created by another save" in results[v][1] or "already exists" in results[v][1]) for v in refused), (
      results
    )
  assert _leftovers(path) == []


# --- soak: many cycles, random kill -9, a concurrent reader --------------------------------


def test_soak_save_load_overwrite_with_kills_and_a_concurrent_reader(tmp_path):
  """Bounded: ~KILLS writer lives, each killed at a random moment while it saves in a loop.

  After every kill the checkpoint must load exactly, and hold the newest completed save (the
  last version the writer reported, or the one it was finishing when killed). A reader loads
  all along; every load it completes must be a whole version, never a mix.
  """
  rng = random.Random(1301)
  path = tmp_path / "ckpt"
  _save(path, 0, overwrite=False)
  stop = tmp_path / "stop"
  reader = _spawn("reader", path, stop)
  version, kills, cycles = 0, 0, 0
  deadline = time.time() + 90
  while kills < 6 and time.time() < deadline:
    writer = _spawn("writer", path, version + 1)
    line = writer.stdout.readline()
    assert line.strip() == "ready", (line, writer.stderr.read() if writer.poll() is not None else "")
    time.sleep(rng.uniform(0.0, 2.5))
    writer.kill()  # SIGKILL, at a random point of a save
    out, _ = writer.communicate(timeout=30)
    done = [int(x) for x in out.split()]
    cycles += len(done)
    kills += 1
    finished = done[-1] if done else version
    got = _version_of(_load(path))
    assert got in (finished, finished + 1), (got, finished)
    version = got
  stop.touch()
  out, err = reader.communicate(timeout=120)
  stats = json.loads(out.strip().splitlines()[-1])
  assert stats["bad"] == [], stats
  assert stats["loads"] > 0 and kills >= 5 and cycles > 0, (stats, kills, cycles)
  print(
    f"soak: {cycles} completed saves, {kills} kill -9 faults, {stats['loads']} concurrent loads, "
    f"{stats['retried']} of them racing a swap"
  )
  # Whatever a killed writer left beside the checkpoint is cleared by the next save.
  _save(path, version + 1)
  assert _leftovers(path) == []


def _main(role, *args):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import delora_jax  # noqa: PLC0415

  if role == "racer":
    path, version, overwrite, start = args[0], int(args[1]), bool(int(args[2])), float(args[3])
    if not int(args[4]):
      from delora_jax import _atomic  # noqa: PLC0415

      _atomic._exchange = lambda a, b: False  # as on a filesystem without renameat2
    tree = _tree(version)
    time.sleep(max(0.0, start - time.time()))
    try:
      delora_jax.save_adapters(path, tree, extra_trainable="head/.*", overwrite=overwrite)
      print("saved")
    except ValueError as e:
      print(f"refused {e}")
  elif role == "writer":
    path, version = args[0], int(args[1])
    _tree(version)  # imports and first compilations done before the parent starts the clock
    print("ready", flush=True)
    for v in range(version, version + 1000):
      delora_jax.save_adapters(path, _tree(v), extra_trainable="head/.*", overwrite=True)
      print(v, flush=True)
  elif role == "reader":
    path, stop = args[0], pathlib.Path(args[1])
    from delora_jax import _checkpoint  # noqa: PLC0415

    reads, loads, bad = 0, 0, []
    real = _checkpoint._read

    def counting(*a, **k):
      nonlocal reads
      reads += 1
      return real(*a, **k)

    _checkpoint._read = counting
    while not stop.exists():
      try:
        _version_of(delora_jax.load_adapters(path, _tree(0)))
        loads += 1
      except (AssertionError, ValueError, OSError) as e:  # a load that fails or returns a mix
        bad.append(f"{type(e).__name__}: {str(e)[-400:]} (after {reads} reads)")
    print(json.dumps({"loads": loads, "bad": bad, "retried": reads - loads - len(bad)}))


if __name__ == "__main__":
  _main(*sys.argv[1:])
