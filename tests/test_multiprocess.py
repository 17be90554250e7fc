"""Two-process `jax.distributed` DeLoRA training on localhost, with a checkpoint round trip.

The test launches this file as a script in two processes (2 CPU devices each,
gloo collectives, one global 2x2 ("data", "model") mesh):

1. "train": both processes run the multi-process recipe of docs/distributed.md
   as written (5 steps, then `save_adapters` / `load_adapters` from both);
2. "restore": a fresh pair wraps the base with another key, restores the
   checkpoint (adapters and optimizer state) and takes a 6th step.

Both must match the same steps in a single process. jax is imported inside
functions: the workers configure it before their backend starts.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 5
RTOL = 1e-5
TIMEOUT_S = 150
DOC_ADDRESS, DOC_CKPT = '"127.0.0.1:12355"', '"/tmp/delora_mp_ckpt"'


def doc_recipe() -> str:
  text = (ROOT / "docs" / "distributed.md").read_text()
  blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "jax.distributed.initialize" in b]
  assert len(blocks) == 1, "docs/distributed.md should have one multi-process recipe"
  assert DOC_ADDRESS in blocks[0] and DOC_CKPT in blocks[0]
  return blocks[0]


def setup():
  """The recipe's model, base params, data, specs and step (the same in every process)."""
  import flax.linen as nn
  import jax
  import optax
  from jax.sharding import PartitionSpec as P

  import delora_jax as dj

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(64)(x))
      return nn.Dense(24)(h)

  model = MLP()
  rng = np.random.default_rng(0)
  params = {
    "Dense_0": {"kernel": rng.standard_normal((16, 64), np.float32) / 4, "bias": np.zeros(64, np.float32)},
    "Dense_1": {"kernel": rng.standard_normal((64, 24), np.float32) / 8, "bias": np.zeros(24, np.float32)},
  }
  x = rng.standard_normal((32, 16), np.float32)
  y = rng.standard_normal((32, 24), np.float32)
  specs = {
    "Dense_0": {"kernel": P("data", "model"), "bias": P("model")},
    "Dense_1": {"kernel": P("model", "data"), "bias": P("data")},
  }
  opt = dj.optimizer(optax.adam, learning_rate=1e-2)

  def step(trainable, opt_state, frozen, x, y):
    def loss_fn(t):
      pred = dj.apply(model, {"params": dj.combine(t, frozen)}, x)
      return ((pred - y) ** 2).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  rules = {".*kernel": dj.Rule(4, lam=2.0)}
  return dict(params=params, x=x, y=y, specs=specs, rules=rules, opt=opt, step=step)


def flat(adapters: dict) -> dict:
  return {f"{p}.{f}": np.asarray(v) for p, fs in adapters.items() for f, v in fs.items()}


def reference(steps: int):
  """The same training in one process, on one device: losses and adapters after each step."""
  import jax

  import delora_jax as dj

  s = setup()
  trainable, frozen = dj.split(dj.wrap(s["params"], s["rules"]))
  opt_state = s["opt"].init(trainable)
  fn = jax.jit(s["step"])
  losses, snapshots = [], []
  for _ in range(steps):
    trainable, opt_state, loss = fn(trainable, opt_state, frozen, s["x"], s["y"])
    losses.append(float(loss))
    snapshots.append(flat(dj.adapters(dj.combine(trainable, frozen))))
  return losses, snapshots


# ------------------------------------------------------------------ the worker


def train_worker(process_id: int, port: int, workdir: str) -> None:
  """The docs recipe, as written but for its port and checkpoint folder."""
  src = doc_recipe().replace(DOC_ADDRESS, f'"127.0.0.1:{port}"')
  src = src.replace(DOC_CKPT, repr(os.path.join(workdir, "adapters")))
  os.environ["PROCESS_ID"] = str(process_id)
  ns = {"__name__": "__recipe__"}
  exec(compile(src, "docs/distributed.md", "exec"), ns)  # noqa: S102
  np.savez(os.path.join(workdir, f"train_{process_id}.npz"), losses=np.array(ns["losses"]), **flat(ns["trained"]))


def restore_worker(process_id: int, port: int, workdir: str) -> None:
  """A fresh run: restore what both processes wrote, check shardings, take one more step."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=60)
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import delora_jax as dj

  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  s = setup()
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))  # "data" spans processes
  base_sh = jax.tree.map(lambda spec: NamedSharding(mesh, spec), s["specs"])
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  tree = dj.wrap(jax.device_put(s["params"], base_sh), s["rules"], key=jax.random.key(99))
  sh = dj.shardings(tree, base_sh)
  assert jax.tree.leaves(jax.tree.map(lambda a: a.sharding, tree)) == jax.tree.leaves(sh)
  t_sh, f_sh = dj.split(sh)
  opt_state = s["opt"].init(dj.split(tree)[0])
  s_sh = jax.tree.map(lambda a: a.sharding if len(a.sharding.device_set) > 1 else replicated, opt_state)
  opt_state = jax.device_put(opt_state, s_sh)
  # The base-norm check (on by default) runs in place on arrays spread over both processes.
  restored, opt_state = dj.load_adapters(os.path.join(workdir, "adapters"), tree, opt_state=opt_state)
  assert jax.tree.leaves(jax.tree.map(lambda a: a.sharding, restored)) == jax.tree.leaves(sh), (
    "restored adapters are not in the derived shardings"
  )
  fn = jax.jit(
    s["step"],
    in_shardings=(t_sh, s_sh, f_sh, batch, batch),
    out_shardings=(t_sh, s_sh, replicated),
    donate_argnums=(0, 1),
  )
  trainable, frozen = dj.split(restored)
  x, y = jax.device_put(s["x"], batch), jax.device_put(s["y"], batch)
  trainable, opt_state, loss = fn(trainable, opt_state, frozen, x, y)
  gathered = multihost_utils.process_allgather(dj.adapters(dj.combine(trainable, frozen)), tiled=True)
  np.savez(os.path.join(workdir, f"restore_{process_id}.npz"), losses=np.array([float(loss)]), **flat(gathered))


# ------------------------------------------------------------------- launching


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _launch(mode: str, workdir: pathlib.Path) -> None:
  """Runs both processes; retries once on a new port if the coordinator's port was taken."""
  try:
    _launch_once(mode, workdir)
  except AssertionError as e:
    if not re.search(r"address already in use|failed to add port", str(e), flags=re.I):
      raise
    _launch_once(mode, workdir)


def _launch_once(mode: str, workdir: pathlib.Path) -> None:
  """Runs both processes; on any failure kills the other one and reports both logs."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  )
  port = _free_port()
  logs = [workdir / f"{mode}_{i}.log" for i in range(2)]
  procs = []
  try:
    for i in range(2):
      with open(logs[i], "w") as log:
        procs.append(
          subprocess.Popen(
            [sys.executable, __file__, mode, str(i), str(port), str(workdir)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
          )
        )
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  if any(p.returncode != 0 for p in procs):
    tails = "\n".join(
      f"--- process {i} (exit {p.returncode}):\n{logs[i].read_text()[-3000:]}" for i, p in enumerate(procs)
    )
    raise AssertionError(f"two-process {mode} run failed or timed out ({TIMEOUT_S} s):\n{tails}")


def _assert_adapters(got, want: dict, what: str) -> None:
  for name, x in want.items():
    a, b = np.asarray(got[name], np.float64), np.asarray(x, np.float64)
    err = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    assert err < RTOL, f"{what}: {name} relative error {err:.3g}"


def test_two_processes_match_one_and_checkpoint_round_trips(tmp_path):
  ref_losses, ref_snapshots = reference(STEPS + 1)

  _launch("train", tmp_path)
  for i in range(2):
    got = np.load(tmp_path / f"train_{i}.npz")
    np.testing.assert_allclose(got["losses"], ref_losses[:STEPS], rtol=RTOL)
    _assert_adapters(got, ref_snapshots[STEPS - 1], f"process {i} after {STEPS} steps")
  assert (tmp_path / "adapters" / "commit_success.txt").exists()

  _launch("restore", tmp_path)
  for i in range(2):
    got = np.load(tmp_path / f"restore_{i}.npz")
    np.testing.assert_allclose(got["losses"], ref_losses[STEPS:], rtol=RTOL)
    _assert_adapters(got, ref_snapshots[STEPS], f"process {i} after restore + 1 step")


if __name__ == "__main__":
  mode, pid, port, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  {"train": train_worker, "restore": restore_worker}[mode](pid, port, workdir)
