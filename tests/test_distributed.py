"""Distributed DeLoRA: derived adapter shardings, mesh (FSDP/TP) and pmap training.

Runs on the 8 simulated CPU devices of conftest.py. Every distributed run is
compared with the same 5 training steps on one device.
"""

import collections
import dataclasses
import importlib.util
import math
import pathlib
import re
import runpy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import delora_jax as dj
from delora_jax import _wrap
from tests.helpers import rel

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 5
RTOL = 1e-5


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(64)(x))
    return nn.Dense(24)(h)


MODEL = MLP()
X = jax.random.normal(jax.random.key(1), (32, 16))
Y = jax.random.normal(jax.random.key(2), (32, 24))
PARAMS = MODEL.init(jax.random.key(0), X)["params"]
# FSDP over "data" and Megatron-style tensor parallelism over "model".
SPECS = {
  "Dense_0": {"kernel": P("data", "model"), "bias": P("model")},
  "Dense_1": {"kernel": P("model", "data"), "bias": P("data")},
}
RULES = {".*kernel": dj.Rule(4, init="random")}  # b != 0: every adapter gets a gradient
OPT = dj.optimizer(optax.adam, learning_rate=1e-2)
KERNEL_NUMEL = min(math.prod(PARAMS[k]["kernel"].shape) for k in PARAMS)


def loss_fn(trainable, frozen, x, y):
  out = dj.apply(MODEL, {"params": dj.combine(trainable, frozen)}, x, strict=True)
  return jnp.mean((out - y) ** 2)


def step(trainable, opt_state, frozen, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
  updates, opt_state = OPT.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, loss


def pmap_step(trainable, opt_state, frozen, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
  loss, grads = jax.lax.pmean((loss, grads), "batch")
  updates, opt_state = OPT.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, loss


def frozen_base_step(biases, kernels, x, y):
  """The base model's own step with frozen kernels: the collectives its layout needs."""

  def loss(b):
    p = {k: {"kernel": kernels[k], "bias": b[k]} for k in b}
    return jnp.mean((MODEL.apply({"params": p}, x) - y) ** 2)

  value, g = jax.value_and_grad(loss)(biases)
  return jax.tree.map(lambda b, d: b - 0.1 * d, biases, g), value


def full_finetune_step(params, x, y):
  def loss(p):
    return jnp.mean((MODEL.apply({"params": p}, x) - y) ** 2)

  value, g = jax.value_and_grad(loss)(params)
  return jax.tree.map(lambda p, d: p - 0.1 * d, params, g), value


def abstract_wrap(params, rules):
  """The adapted tree's shapes only (``jax.eval_shape``): enough for `shardings`, no compile."""
  return jax.eval_shape(lambda p: dj.wrap(p, rules), params)


def make_mesh(shape):
  return Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))


def assert_adapters_close(got, want):
  for path, fields in dj.adapters(want).items():
    for f, x in fields.items():
      err = rel(dj.adapters(got)[path][f], x)
      assert err < RTOL, f"{path}.{f}: relative error {err:.3g}"


@pytest.fixture(scope="module")
def reference():
  """Five steps on one device: losses, the trained tree and the initial adapters."""
  tree = dj.wrap(PARAMS, RULES)
  initial = dj.adapters(tree)
  trainable, frozen = dj.split(tree)
  opt_state = OPT.init(trainable)
  fn = jax.jit(step)
  losses = []
  for _ in range(STEPS):
    trainable, opt_state, loss = fn(trainable, opt_state, frozen, X, Y)
    losses.append(float(loss))
  return losses, dj.combine(trainable, frozen), initial


_COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def big_collectives(hlo: str, min_numel: int) -> collections.Counter:
  """``{(op, numel): count}`` of the collectives moving at least ``min_numel`` elements."""
  out = collections.Counter()
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    for dims in _SHAPE.findall(m.group(1)):
      n = math.prod(int(d) for d in dims.split(",") if d)
      if n >= min_numel:
        out[(m.group(2), n)] += 1
  return out


def extra_collectives(hlo: str, base_hlo: str) -> dict:
  """Kernel-sized collectives of ``hlo`` beyond those the frozen base step already has."""
  got, base = big_collectives(hlo, KERNEL_NUMEL), big_collectives(base_hlo, KERNEL_NUMEL)
  return {k: n - base[k] for k, n in got.items() if n > base[k]}


def mesh_setup(shape):
  mesh = make_mesh(shape)
  base_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
  params = jax.device_put(PARAMS, base_sh)
  batch = NamedSharding(mesh, P("data"))
  x, y = jax.device_put(X, batch), jax.device_put(Y, batch)
  return mesh, base_sh, params, batch, x, y


def shardings_of(tree):
  return jax.tree.map(lambda a: a.sharding, tree)


# ------------------------------------------------------------- derivation rules


def _specs(shape, spec, rule, mesh_shape=None):
  tree = abstract_wrap({"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}, {"kernel": rule})
  if mesh_shape is None:
    k = dj.shardings(tree, {"kernel": spec})["kernel"]
    return {f: getattr(k, f) for f in ("a", "b", "lam", "w_norm")}
  devices = np.array(jax.devices()[: math.prod(mesh_shape.values())])
  mesh = Mesh(devices.reshape(tuple(mesh_shape.values())), tuple(mesh_shape))
  k = dj.shardings(tree, {"kernel": spec}, mesh=mesh)["kernel"]
  assert k.w == NamedSharding(mesh, spec)
  return {f: getattr(k, f).spec for f in ("a", "b", "lam", "w_norm")}


DERIVATION_CASES = [
  (
    "dense",
    (16, 8),
    P("data", "model"),
    dj.Rule(2),
    None,
    dict(a=P("data", None), b=P(None, "model"), lam=P(), w_norm=P("data")),
  ),
  (
    "short-spec",
    (16, 8),
    P("model"),
    dj.Rule(2),
    None,
    dict(a=P("model", None), b=P(None, None), lam=P(), w_norm=P("model")),
  ),
  ("replicated", (16, 8), P(), dj.Rule(2), None, dict(a=P(None, None), b=P(None, None), lam=P(), w_norm=P(None))),
  (
    "tuple-entry",
    (16, 8),
    P(("data", "model"), None),
    dj.Rule(2),
    None,
    dict(a=P(("data", "model"), None), b=P(None, None), lam=P(), w_norm=P(("data", "model"))),
  ),
  (
    "scan-stacked",
    (4, 16, 8),
    P("stage", "data", "model"),
    dj.Rule(2, stack_axes=1),
    None,
    dict(a=P("stage", "data", None), b=P("stage", None, "model"), lam=P("stage"), w_norm=P("stage", "data")),
  ),
  (
    "dense-general-out",
    (16, 4, 8),
    P("data", "model", None),
    dj.Rule(2, in_axes=0),
    None,
    dict(a=P("data", None), b=P(None, "model"), lam=P(), w_norm=P("data")),
  ),
  # (heads, head_dim, embed): heads split to one per device, head_dim split:
  # each device's rows of the flattened input stay contiguous -> combined.
  (
    "dense-general-in-combined",
    (4, 8, 16),
    P("model", "data", None),
    dj.Rule(2, out_axes=-1),
    {"data": 2, "model": 4},
    dict(a=P(("model", "data"), None), b=P(None, ("model", "data")), lam=P(), w_norm=P(("model", "data"))),
  ),
  # two heads per device: not contiguous after flattening -> the first split axis only.
  (
    "dense-general-in-first",
    (4, 8, 16),
    P("model", "data", None),
    dj.Rule(2, out_axes=-1),
    {"data": 4, "model": 2},
    dict(a=P("model", None), b=P(None, "model"), lam=P(), w_norm=P("model")),
  ),
  # heads over a mesh axis of size 1 split nothing: head_dim's axis is the one to follow.
  (
    "dense-general-in-size-one-axis",
    (4, 8, 16),
    P("model", "data", None),
    dj.Rule(2, out_axes=-1),
    {"data": 8, "model": 1},
    dict(a=P("data", None), b=P(None, "data"), lam=P(), w_norm=P("data")),
  ),
  (
    "dense-general-in-no-mesh",
    (4, 8, 16),
    P("model", "data", None),
    dj.Rule(2, out_axes=-1),
    None,
    dict(a=P("model", None), b=P(None, None), lam=P(), w_norm=P("model")),
  ),
  (
    "conv",
    (3, 3, 8, 16),
    P(None, None, "model", "data"),
    dj.Rule(2, out_axes=-1),
    {"data": 2, "model": 4},
    dict(a=P("model", None), b=P(None, "data"), lam=P(), w_norm=P("model")),
  ),
  (
    "conv-window-split",
    (2, 3, 8, 16),
    P("data", None, "model", None),
    dj.Rule(2, out_axes=-1),
    {"data": 2, "model": 4},
    dict(a=P("data", None), b=P(None, "data"), lam=P(), w_norm=P("data")),
  ),
  # in_axes=(1, 0): the flattened input runs over axis 1 first, so "data" leads.
  (
    "in-axes-reordered-combined",
    (4, 8, 16),
    P("model", "data", None),
    dj.Rule(2, in_axes=(1, 0)),
    {"data": 8, "model": 1},
    dict(a=P(("data", "model"), None), b=P(None, ("data", "model")), lam=P(), w_norm=P(("data", "model"))),
  ),
  (
    "in-axes-reordered-first",
    (4, 8, 16),
    P("model", "data", None),
    dj.Rule(2, in_axes=(1, 0)),
    {"data": 2, "model": 4},
    dict(a=P("data", None), b=P(None, "data"), lam=P(), w_norm=P("data")),
  ),
  # FSDP: w split along its input axis only. b takes the same mesh axis, so it and its
  # optimizer moments are not replicated on the devices that share out w (issue 16) ...
  (
    "fsdp-in-only",
    (16, 8),
    P("data", None),
    dj.Rule(2),
    {"data": 8},
    dict(a=P("data", None), b=P(None, "data"), lam=P(), w_norm=P("data")),
  ),
  (
    "fsdp-out-only",
    (16, 8),
    P(None, "data"),
    dj.Rule(2),
    {"data": 8},
    dict(a=P("data", None), b=P(None, "data"), lam=P(), w_norm=P("data")),
  ),
  # ... unless that mesh axis does not divide it (out = 12 over 8): b stays replicated.
  (
    "fsdp-in-only-indivisible",
    (16, 12),
    P("data", None),
    dj.Rule(2),
    {"data": 8},
    dict(a=P("data", None), b=P(None, None), lam=P(), w_norm=P("data")),
  ),
  # Tensor parallel beside data parallel: w is replicated over "data", so its "model" axis
  # holds the activations' features; each factor follows its own side only (issue 21).
  (
    "tp-column",
    (16, 8),
    P(None, "model"),
    dj.Rule(2),
    {"data": 2, "model": 4},
    dict(a=P(None, None), b=P(None, "model"), lam=P(), w_norm=P(None)),
  ),
  (
    "tp-row",
    (16, 8),
    P("model", None),
    dj.Rule(2),
    {"data": 2, "model": 4},
    dict(a=P("model", None), b=P(None, None), lam=P(), w_norm=P("model")),
  ),
  # The same kernel split over the whole mesh (the other mesh axis has size 1): FSDP's case.
  (
    "tp-column-whole-mesh",
    (16, 8),
    P(None, "model"),
    dj.Rule(2),
    {"data": 1, "model": 8},
    dict(a=P("model", None), b=P(None, "model"), lam=P(), w_norm=P("model")),
  ),
]


@pytest.mark.parametrize(
  "shape,spec,rule,mesh_shape,want", [c[1:] for c in DERIVATION_CASES], ids=[c[0] for c in DERIVATION_CASES]
)
def test_derived_specs(shape, spec, rule, mesh_shape, want):
  got = _specs(shape, spec, rule, mesh_shape)
  assert {f: tuple(s) for f, s in got.items()} == {f: tuple(s) for f, s in want.items()}


def test_paper_init_residuals_follow_a_and_b():
  tree = abstract_wrap({"kernel": jnp.ones((16, 8))}, {"kernel": dj.Rule(2, init="paper")})
  k = dj.shardings(tree, {"kernel": P("data", "model")})["kernel"]
  assert (k.res_a, k.res_b) == (P("data", None), P(None, "model"))


def test_specs_use_the_mesh_set_with_set_mesh():
  tree = abstract_wrap({"kernel": jnp.ones((4, 8, 16))}, {"kernel": dj.Rule(2, out_axes=-1)})
  with jax.set_mesh(Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))):
    k = dj.shardings(tree, {"kernel": P("model", "data", None)})["kernel"]
  assert k.a == P(("model", "data"), None)


def test_plain_leaves_and_kernels_keep_their_shardings():
  mesh, base_sh, *_ = mesh_setup((2, 4))
  sh = dj.shardings(abstract_wrap(PARAMS, RULES), SPECS, mesh=mesh)
  assert sh["Dense_0"]["bias"] == base_sh["Dense_0"]["bias"]
  assert sh["Dense_1"]["kernel"].w == base_sh["Dense_1"]["kernel"]
  assert sh["Dense_1"]["kernel"].a == NamedSharding(mesh, P("model", None))


# ------------------------------------------- derived shardings, as compiled (issue 21)

# Each mesh with the MLP's kernel specs. FSDP: the kernels are split over the whole mesh (the
# factor of a kernel's unsplit side takes its mesh axes); TP: they are replicated over "data"
# (each factor follows its own side only, as qwix's LoRA); FSDP x TP: split on both sides.
COST_MESHES = {
  "fsdp": ((8,), ("data",), (P("data", None), P(None, "data"))),
  "tp": ((2, 4), ("data", "model"), (P(None, "model"), P("model", None))),
  "fsdp-x-tp": ((2, 4), ("data", "model"), (P("data", "model"), P("model", "data"))),
}
COST_BATCH = 4096  # abstract, so free: activations much larger than the adapters, as in real runs
Cost = collections.namedtuple("Cost", "collectives collective_bytes arguments temp")


def _hlo_collectives():
  spec = importlib.util.spec_from_file_location("hlo_collectives", ROOT / "benchmarks" / "hlo_collectives.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def cost_shardings(mesh_name, variant):
  """The MLP's shardings on a COST_MESHES mesh: ``dj.shardings``' (``"derived"``), or each 2-D
  kernel's factors from their own side of ``w`` only (``"own-side"``), or with the factor of an
  unsplit side taking the other side's mesh axes (``"other-side"``)."""
  shape, names, kspecs = COST_MESHES[mesh_name]
  mesh = Mesh(np.array(jax.devices()[: math.prod(shape)]).reshape(shape), names)
  base = {k: {"kernel": NamedSharding(mesh, s), "bias": NamedSharding(mesh, P())} for k, s in zip(PARAMS, kspecs)}
  sh = dj.shardings(abstract_wrap(PARAMS, RULES), base)
  if variant == "derived":
    return mesh, sh
  for node, (i, o) in zip(sh.values(), kspecs):
    if variant == "other-side":
      i, o = (o if i is None else i), (i if o is None else o)
    specs = {"a": P(i, None), "b": P(None, o), "w_norm": P(i)}
    node["kernel"] = node["kernel"].replace(**{f: NamedSharding(mesh, s) for f, s in specs.items()})
  return mesh, sh


def compiled_cost(mesh_name, variant):
  """Collectives (count, bytes), argument and temporary bytes per device of the compiled
  gradient step (the collectives are there; the optimizer update is elementwise where the
  adapters lie)."""
  mesh, sh = cost_shardings(mesh_name, variant)
  t_sh, f_sh = dj.split(sh)
  trainable, frozen = dj.split(abstract_wrap(PARAMS, RULES))
  batch = NamedSharding(mesh, P(mesh.axis_names[0]))
  x = jax.ShapeDtypeStruct((COST_BATCH, X.shape[1]), X.dtype, sharding=batch)
  y = jax.ShapeDtypeStruct((COST_BATCH, Y.shape[1]), Y.dtype, sharding=batch)
  fn = jax.jit(jax.grad(loss_fn), in_shardings=(t_sh, f_sh, batch, batch), out_shardings=t_sh)
  compiled = fn.lower(trainable, frozen, x, y).compile()
  kinds = _hlo_collectives().collectives(compiled.as_text())["by_kind"].values()
  mem = compiled.memory_analysis()
  count, nbytes = sum(k["count"] for k in kinds), sum(k["bytes"] for k in kinds)
  return Cost(count, nbytes, mem.argument_size_in_bytes, mem.temp_size_in_bytes)


def test_fsdp_factor_of_the_unsplit_side_is_split():
  """FSDP (issue 16): the batch lies over w's mesh axes and w is gathered for the matmul, so
  the factor of w's unsplit side is split there too: it (with its gradient and moments) is not
  held whole on every device, for moves and temporaries the size of the factors, not of the
  activations."""
  derived, own = compiled_cost("fsdp", "derived"), compiled_cost("fsdp", "own-side")
  assert cost_shardings("fsdp", "derived")[1]["Dense_0"]["kernel"].b.spec == P(None, "data")
  assert derived.arguments < own.arguments
  activation = COST_BATCH // 8 * 64 * 4  # Dense_0's float32 output on one device
  assert derived.collective_bytes - own.collective_bytes < activation / 10
  assert derived.temp - own.temp < activation / 10


def test_tp_factors_follow_their_own_side():
  """Tensor parallel beside data parallel (issue 21): the input of a column-parallel kernel is
  replicated over "model", so an `a` split there costs activation-sized collectives and
  temporaries (more than the few bytes of `a` it saves): each factor follows its own side."""
  derived, other = compiled_cost("tp", "derived"), compiled_cost("tp", "other-side")
  assert cost_shardings("tp", "derived")[1]["Dense_0"]["kernel"].a.spec == P(None, None)
  assert derived.collectives < other.collectives
  assert derived.collective_bytes < other.collective_bytes
  assert derived.temp < other.temp
  activation = COST_BATCH // 2 * 16 * 4  # Dense_0's float32 output on one device
  assert other.collective_bytes - derived.collective_bytes > activation
  assert derived.arguments - other.arguments < activation / 10


def test_a_side_split_only_over_size_1_mesh_axes_counts_as_unsplit():
  """MaxText's rules name mesh axes of size 1 (``("tensor",)`` on an FSDP-only mesh): under FSDP the
  factor of that side takes the other side's axes, as for an unsplit side."""
  from delora_jax import _sharding  # noqa: PLC0415

  sizes = {"fsdp": 8, "tensor": 1}
  for out_entry in (None, "tensor", ("tensor",)):
    specs = _sharding.kernel_specs("w", (64, 128), P("fsdp", out_entry), (-2,), (-1,), sizes)
    assert specs["a"] == P("fsdp", None) and specs["b"] == P(None, "fsdp"), out_entry
  specs = _sharding.kernel_specs("w", (64, 128), P("fsdp", "tensor"), (-2,), (-1,), {"fsdp": 4, "tensor": 2})
  assert specs["b"] == P(None, "tensor")  # split for real: its own side


def test_fsdp_x_tp_factors_follow_their_own_side():
  """Kernels split on both sides: every factor has its own side's mesh axes (no choice to make)."""
  variants = [cost_shardings("fsdp-x-tp", v)[1] for v in ("derived", "own-side", "other-side")]
  assert variants[0] == variants[1] == variants[2]


# ------------------------------------------------------------------------ wrap


def assert_same_init(got, want):
  """Same keys, same values whatever the sharding (norms up to summation order)."""
  for path, fields in got.items():
    for f, x in fields.items():
      if f in ("a", "b", "lam"):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want[path][f]), err_msg=f"{path}.{f}")
      else:
        np.testing.assert_allclose(np.asarray(x), np.asarray(want[path][f]), rtol=1e-6, err_msg=f"{path}.{f}")


def test_wrap_on_sharded_params_builds_adapters_in_place():
  mesh, base_sh, params, *_ = mesh_setup((2, 4))
  rules = {"Dense_0/kernel": dj.Rule(4, init="paper"), "Dense_1/kernel": dj.Rule(4, init="random")}
  tree = dj.wrap(params, rules, key=jax.random.key(7))
  assert jax.tree.leaves(shardings_of(tree)) == jax.tree.leaves(dj.shardings(tree, base_sh))
  assert tree["Dense_0"]["kernel"].res_a.sharding == NamedSharding(mesh, P("data", None))
  assert tree["Dense_0"]["kernel"].w is params["Dense_0"]["kernel"]
  assert_same_init(dj.adapters(tree), dj.adapters(dj.wrap(PARAMS, rules, key=jax.random.key(7))))


def test_sharded_wrap_of_a_multi_axis_kernel():
  mesh = make_mesh((2, 4))
  w = jax.random.normal(jax.random.key(3), (4, 8, 16))  # (heads, head_dim, embed)
  spec = NamedSharding(mesh, P("model", "data", None))
  rule = dj.Rule(2, out_axes=-1)
  tree = dj.wrap({"o": jax.device_put(w, spec)}, {"o": rule})
  k, want = tree["o"], dj.shardings(tree, {"o": spec})["o"]
  assert (k.a.sharding, k.w_norm.sharding) == (want.a, want.w_norm)
  assert want.a.spec == P(("model", "data"), None)
  plain = dj.wrap({"o": w}, {"o": rule})["o"]
  np.testing.assert_array_equal(np.asarray(k.a), np.asarray(plain.a))
  np.testing.assert_allclose(np.asarray(k.w_norm), np.asarray(plain.w_norm), rtol=1e-6)


# ------------------------------------------------- quantized base (Rule(quantize=...))

# id: (kernel shape, kernel spec on the (2, 4) mesh, rule, want values spec, want scale spec). The
# scale: whole axes split as the kernel's, per-channel input axes (size 1) unsplit, a tiled axis
# (n // tile) split as the kernel's where the mesh size divides it, else unsplit.
QUANT_CASES = [
  ("per-channel", (64, 32), P("data", "model"), dj.Rule(2, quantize="int8"), P(None, "model")),
  ("tiled-divides", (64, 32), P("data", "model"), dj.Rule(2, quantize="nf4", tile_size=16), P("data", "model")),
  ("tiled-does-not-divide", (64, 32), P("model", "data"), dj.Rule(2, quantize="nf4", tile_size=32), P(None, "data")),
  (
    "stacked-per-channel",
    (2, 64, 32),
    P("data", "model"),
    dj.Rule(2, stack_axes=1, quantize="int4"),
    P("data", None, None),
  ),
  (
    "stacked-tiled",
    (2, 64, 32),
    P("data", "model", None),
    dj.Rule(2, stack_axes=1, quantize="nf4", tile_size=16),
    P("data", "model", None),
  ),
  (
    "stacked-inside-tiled",  # MaxText's param_scan_axis=1: the layer axis between input and output
    (64, 2, 32),
    P("model", "data", None),
    dj.Rule(2, stack_axes=(1,), quantize="nf4", tile_size=16),
    P("model", "data", None),
  ),
  (
    "n-d-tiled",
    (8, 16, 12),
    P("data", "model"),
    dj.Rule(2, out_axes=-1, quantize="int8", tile_size=4),
    P(None, "model", None),
  ),
]


@pytest.mark.parametrize("shape,spec,rule,want", [c[1:] for c in QUANT_CASES], ids=[c[0] for c in QUANT_CASES])
def test_quantized_base_shardings_agree_with_the_abstract_wrap(shape, spec, rule, want):
  """`shardings` of a concrete quantized tree: values as the kernel, the scale by the rule above, the adapters as
  for the full-precision kernel; an abstract wrap of a kernel carrying the same sharding gives the same."""
  mesh = make_mesh((2, 4))
  tree = dj.wrap({"k": jax.random.normal(jax.random.key(0), shape)}, {"k": rule})
  k = dj.shardings(tree, {"k": spec}, mesh=mesh)["k"]
  assert (k.w.values, k.w.scale) == (NamedSharding(mesh, spec), NamedSharding(mesh, want))
  plain = dj.shardings(
    dj.wrap({"k": jnp.ones(shape)}, {"k": dataclasses.replace(rule, quantize=None, tile_size=None)}),
    {"k": spec},
    mesh=mesh,
  )["k"]
  assert (k.a, k.b, k.lam, k.w_norm) == (plain.a, plain.b, plain.lam, plain.w_norm)
  abstract = dj.wrap({"k": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))}, {"k": rule})
  assert jax.tree.leaves(shardings_of(abstract)) == jax.tree.leaves(k)
  assert jax.tree.leaves(dj.shardings(abstract)) == jax.tree.leaves(k)  # read from the tree itself


def test_quantized_tree_placed_with_derived_shardings_applies_as_on_one_device():
  """Dense_0 (16, 64) over ("data", "model"): nf4 in 4 tiles, its scale split over data=2 too; Dense_1 (64, 24)
  over ("model", "data"): int8 per channel (int values into the dot, the output scaled), its scale over data."""
  rules = {
    "Dense_0/kernel": dj.Rule(4, init="random", quantize="nf4", tile_size=4),
    "Dense_1/kernel": dj.Rule(4, init="random", quantize="int8"),
  }
  mesh, base_sh, *_ = mesh_setup((2, 4))
  tree = dj.wrap(PARAMS, rules)
  sh = dj.shardings(tree, base_sh)
  assert [sh[m]["kernel"].w.scale.spec for m in sh] == [P("data", "model"), P(None, "data")]
  placed = jax.device_put(tree, sh)
  assert jax.tree.leaves(shardings_of(placed)) == jax.tree.leaves(sh)
  fn = jax.jit(lambda t, x: dj.apply(MODEL, {"params": t}, x, strict=True))
  got = fn(placed, jax.device_put(X, NamedSharding(mesh, P("data"))))
  assert rel(got, fn(tree, X)) < RTOL


@pytest.mark.parametrize("scheme,tile", [("nf4", 4), ("int8", None), ("int4", 4)])
def test_wrap_quantizes_a_sharded_kernel_in_place(scheme, tile):
  """A kernel already split over the mesh is quantized where it lies: the values keep its sharding (nf4's table
  lookup included), the scale its derived one; the values equal those of the unsharded kernel."""
  mesh, base_sh, params, *_ = mesh_setup((2, 4))
  rule = dj.Rule(4, init="random", quantize=scheme, tile_size=tile)
  q = dj.wrap(params, {"Dense_0/kernel": rule})["Dense_0"]["kernel"].w
  want = dj.shardings(dj.wrap(PARAMS, {"Dense_0/kernel": rule}), base_sh)["Dense_0"]["kernel"].w
  assert q.values.sharding == params["Dense_0"]["kernel"].sharding == NamedSharding(mesh, P("data", "model"))
  assert q.scale.sharding.is_equivalent_to(want.scale, 2)
  np.testing.assert_array_equal(q.values, dj.wrap(PARAMS, {"Dense_0/kernel": rule})["Dense_0"]["kernel"].w.values)


INIT_CASES = [
  ("dense", (16, 64), P("data", "model"), dj.Rule(4, init="paper")),
  ("reordered-3d", (4, 8, 16), P("model", "data", None), dj.Rule(2, in_axes=(1, 0))),
  ("stacked-3d", (4, 16, 8), P("model", None, "data"), dj.Rule(2, stack_axes=1, init="random")),
]


@pytest.mark.parametrize("shape,spec,rule", [c[1:] for c in INIT_CASES], ids=[c[0] for c in INIT_CASES])
def test_adapter_init_never_gathers_the_kernel(shape, spec, rule):
  """The compiled initialisation of a sharded kernel moves only in-sized vectors."""
  w = jax.device_put(jax.random.normal(jax.random.key(0), shape), NamedSharding(make_mesh((2, 4)), spec))
  in_axes, out_axes = rule.layout("k", shape)
  out_sh = _wrap._derived_shardings("k", w, rule, in_axes, out_axes)
  hlo = _wrap._compiled(rule, in_axes, out_axes, out_sh).lower(w, jax.random.key(0), lam=jnp.float32(rule.lam))
  hlo = hlo.compile().as_text()
  assert big_collectives(hlo, math.prod(shape) // 2) == {}
  assert big_collectives(hlo, 1) != {}  # the norm's partial sums are reduced: the parser sees it


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)], ids=str)
def test_mesh_training_matches_one_device(shape, reference):
  ref_losses, ref_tree, ref_initial = reference
  mesh, base_sh, params, batch, x, y = mesh_setup(shape)
  tree = dj.wrap(params, RULES)
  sh = dj.shardings(tree, base_sh)
  # Adapters are born in the derived shardings, with the values one device gives.
  assert jax.tree.leaves(shardings_of(tree)) == jax.tree.leaves(sh)
  assert_same_init(dj.adapters(tree), ref_initial)
  t_sh, f_sh = dj.split(sh)
  trainable, frozen = dj.split(tree)
  opt_state = OPT.init(trainable)  # mu/nu follow the adapters; put the scalar counts on the mesh
  s_sh = jax.tree.map(lambda a: a.sharding if len(a.sharding.device_set) > 1 else NamedSharding(mesh, P()), opt_state)
  opt_state = jax.device_put(opt_state, s_sh)
  fn = jax.jit(
    step,
    in_shardings=(t_sh, s_sh, f_sh, batch, batch),
    out_shardings=(t_sh, s_sh, NamedSharding(mesh, P())),
    donate_argnums=(0, 1),
  )
  hlo = fn.lower(trainable, opt_state, frozen, x, y).compile().as_text()
  losses = []
  for _ in range(STEPS):
    trainable, opt_state, loss = fn(trainable, opt_state, frozen, x, y)
    losses.append(float(loss))
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  trained = dj.combine(trainable, frozen)
  assert_adapters_close(trained, ref_tree)
  assert jax.tree.leaves(shardings_of(trained)) == jax.tree.leaves(sh)
  # No kernel-sized collective beyond those the frozen base step itself needs.
  biases = {k: params[k]["bias"] for k in params}
  kernels = {k: params[k]["kernel"] for k in params}
  base_hlo = jax.jit(frozen_base_step).lower(biases, kernels, x, y).compile().as_text()
  assert extra_collectives(hlo, base_hlo) == {}


def test_collective_check_flags_a_dense_weight_gradient():
  """Control: full fine-tuning reduces kernel-sized gradients, which the check reports."""
  _, _, params, _, x, y = mesh_setup((8, 1))
  biases = {k: params[k]["bias"] for k in params}
  kernels = {k: params[k]["kernel"] for k in params}
  base_hlo = jax.jit(frozen_base_step).lower(biases, kernels, x, y).compile().as_text()
  full_hlo = jax.jit(full_finetune_step).lower(params, x, y).compile().as_text()
  assert extra_collectives(full_hlo, base_hlo) != {}


def test_pmap_training_matches_one_device(reference):
  ref_losses, ref_tree, _ = reference
  n = jax.device_count()
  tree = dj.wrap(PARAMS, RULES)
  trainable, frozen = dj.split(tree)
  opt_state = OPT.init(trainable)
  # Adapters, optimizer state and frozen base are broadcast (placed on every device once);
  # the batch is split.
  everywhere = NamedSharding(Mesh(jax.local_devices(), ("batch",)), P())
  trainable, opt_state, frozen = jax.device_put((trainable, opt_state, frozen), everywhere)
  fn = jax.pmap(pmap_step, axis_name="batch", in_axes=(None, None, None, 0, 0), out_axes=None, donate_argnums=(0, 1))
  xs, ys = X.reshape(n, -1, X.shape[-1]), Y.reshape(n, -1, Y.shape[-1])
  losses = []
  for _ in range(STEPS):
    trainable, opt_state, loss = fn(trainable, opt_state, frozen, xs, ys)
    losses.append(float(loss))
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  assert_adapters_close(dj.combine(trainable, frozen), ref_tree)


# ------------------------------------------------------------- docs, example


def _doc_blocks():
  text = (ROOT / "docs" / "distributed.md").read_text()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_recipes_run():
  """The pmap and mesh recipes of docs/distributed.md, as written (multi-process: see
  test_multiprocess.py)."""
  blocks = [b for b in _doc_blocks() if "jax.distributed" not in b]
  assert len(blocks) >= 2
  ns = {}
  for block in blocks:
    exec(compile(block, "docs/distributed.md", "exec"), ns)  # noqa: S102
  assert ns["losses"][-1] < ns["losses"][0]


def test_mesh_example_runs():
  mod = runpy.run_path(str(ROOT / "examples" / "mesh_finetune.py"))
  losses = mod["main"](steps=4, mesh_shape=(2, 4), verbose=False)
  assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]


# ---------------------------------------------------------------------- errors


def test_error_base_shardings_structure_mismatch():
  tree = abstract_wrap(PARAMS, RULES)
  bad = {"Dense_0": SPECS["Dense_0"], "Dense_1": {"kernel": P("model", "data")}}
  with pytest.raises(ValueError, match=r"missing paths \['Dense_1/bias'\].*unwrap"):
    dj.shardings(tree, bad)


def test_error_base_shardings_of_the_adapted_tree():
  tree = abstract_wrap({"kernel": jnp.ones((8, 8))}, {"kernel": 2})
  with pytest.raises(ValueError, match=r"unexpected paths \['kernel/a'"):
    dj.shardings(tree, {"kernel": {"a": P(), "b": P(), "lam": P(), "w_norm": P(), "w": P()}})


def test_error_mesh_axis_does_not_divide():
  mesh = make_mesh((1, 8))
  tree = abstract_wrap({"layer": {"kernel": jnp.ones((16, 12))}}, {".*kernel": 2})
  with pytest.raises(
    ValueError,
    match=r"layer/kernel: mesh axes \('model',\) \(size 8\) do not "
    r"divide axis 1 \(size 12\)",
  ):
    dj.shardings(tree, {"layer": {"kernel": P(None, "model")}}, mesh=mesh)


def test_error_mesh_axis_does_not_divide_a_plain_leaf():
  mesh = make_mesh((8, 1))
  tree = abstract_wrap({"kernel": jnp.ones((16, 8)), "bias": jnp.ones(6)}, {"kernel": 2})
  with pytest.raises(ValueError, match=r"bias: mesh axes \('data',\) \(size 8\) do not divide"):
    dj.shardings(tree, {"kernel": P(), "bias": P("data")}, mesh=mesh)


def test_error_unknown_mesh_axis():
  tree = abstract_wrap({"kernel": jnp.ones((16, 8))}, {"kernel": 2})
  with pytest.raises(
    ValueError,
    match=r"kernel: .* names mesh axis 'tensor', but the mesh has "
    r"axes \('data', 'model'\)",
  ):
    dj.shardings(tree, {"kernel": P("tensor")}, mesh=make_mesh((2, 4)))


def test_error_spec_longer_than_array():
  tree = abstract_wrap({"kernel": jnp.ones((16, 8))}, {"kernel": 2})
  with pytest.raises(
    ValueError,
    match=r"kernel: PartitionSpec .* has 3 entries but the parameter "
    r"has shape \(16, 8\)",
  ):
    dj.shardings(tree, {"kernel": P("data", None, None)})


def test_error_mesh_axis_used_twice():
  tree = abstract_wrap({"kernel": jnp.ones((16, 8))}, {"kernel": 2})
  with pytest.raises(ValueError, match=r"kernel: .* uses mesh axis 'data' twice"):
    dj.shardings(tree, {"kernel": P("data", "data")})


@pytest.mark.parametrize("leaf", [None, "data", 3], ids=["None", "str", "int"])
def test_error_leaf_is_not_a_sharding(leaf):
  tree = abstract_wrap({"kernel": jnp.ones((16, 8)), "bias": jnp.ones(8)}, {"kernel": 2})
  with pytest.raises(
    TypeError,
    match=r"bias: `base_shardings` leaf is a .*; expected a "
    r"jax.sharding.NamedSharding, PartitionSpec",
  ):
    dj.shardings(tree, {"kernel": P(), "bias": leaf})


def test_error_mesh_argument_type():
  tree = abstract_wrap({"kernel": jnp.ones((16, 8))}, {"kernel": 2})
  with pytest.raises(TypeError, match="`mesh` must be a jax.sharding.Mesh"):
    dj.shardings(tree, {"kernel": P()}, mesh=(2, 4))


def test_error_tree_not_adapted():
  with pytest.raises(ValueError, match="`shardings` expects a tree adapted by `delora_jax.wrap`"):
    dj.shardings({"kernel": jnp.ones((16, 8))}, {"kernel": P()})
