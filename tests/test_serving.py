"""The serving route (issue 24, item 3): a DeLoRA update of rank r is exactly a rank-r LoRA, so
``delora_jax.peft.export_lora`` writes a PEFT LoRA folder whose outputs, applied as a LoRA server applies
them (``x @ W + (x @ A.T) @ B.T * lora_alpha / r``, read back from the files), equal the DeLoRA model's:
Linen, NNX, and a stacked kernel whose layer axis is not leading (as MaxText scans). MaxText's own model:
tests/test_maxtext.py (Python >= 3.12). No torch here: the files are read with safetensors' numpy API.
"""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import delora_jax
import delora_jax.nnx

RTOL = 1e-5


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def read_lora(folder):
  """{module name: ΔW (in, out)} as a LoRA server computes it from the folder."""
  cfg = json.loads((pathlib.Path(folder) / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "LORA"
  tensors = load_file(str(pathlib.Path(folder) / "adapter_model.safetensors"))
  out = {}
  for key, a in tensors.items():
    if key.endswith(".lora_A.weight"):
      name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
      r = a.shape[0]
      scale = cfg["alpha_pattern"].get("^" + name, cfg["lora_alpha"]) / cfg["rank_pattern"].get("^" + name, cfg["r"])
      b = tensors[key.replace("lora_A", "lora_B")]
      assert b.shape[1] == r
      out[name] = (b.astype(np.float64) @ a.astype(np.float64)).T * scale
  return out


def scrambled(tree_or_model, seed=5):
  """Adapters away from their start (b = 0 would export zeros)."""
  ads = delora_jax.adapters(tree_or_model)
  keys = iter(jax.random.split(jax.random.key(seed), 3 * len(ads)))
  new = {
    p: {
      **v,
      **{
        f: jax.random.normal(next(keys), v[f].shape, v[f].dtype) * (3.0 if f == "lam" else 0.3)
        for f in ("a", "b", "lam")
      },
    }
    for p, v in ads.items()
  }
  return delora_jax.with_adapters(tree_or_model, new) if not isinstance(tree_or_model, nnx.Module) else new


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="down")(jax.nn.gelu(nn.Dense(24, name="up")(x)))


def test_linen_lora_folder_gives_the_delora_outputs(tmp_path):
  x = jax.random.normal(jax.random.key(0), (5, 12))
  params = MLP().init(jax.random.key(1), x)["params"]
  tree = scrambled(delora_jax.wrap(params, {".*/kernel": delora_jax.Rule(4, 2.0)}))
  folder = delora_jax.peft.export_lora(tree, tmp_path / "lora", module_names={"up/kernel": "up", "down/kernel": "down"})
  lora = read_lora(folder)
  served = jax.tree.map(lambda v: v, params)
  for name in ("up", "down"):
    served[name]["kernel"] = np.asarray(params[name]["kernel"], np.float64) + lora[name]
  want = delora_jax.apply(MLP(), {"params": tree}, x, strict=True)
  assert rel(MLP().apply({"params": jax.tree.map(jnp.float32, served)}, x), want) < RTOL
  assert rel(MLP().apply({"params": params}, x), want) > 1e-2  # the adapters matter


class NNXMLP(nnx.Module):
  def __init__(self):
    self.up = nnx.Linear(12, 24, rngs=nnx.Rngs(0))
    self.down = nnx.Linear(24, 8, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


def test_nnx_lora_folder_gives_the_delora_outputs(tmp_path):
  x = jax.random.normal(jax.random.key(0), (5, 12))
  adapted = delora_jax.nnx.wrap(NNXMLP(), {delora_jax.Modules("up|down"): delora_jax.Rule(4, 2.0)})
  for path, new in scrambled(adapted).items():
    ad = getattr(adapted, path.split("/")[0]).kernel_delora
    for f in ("a", "b", "lam"):
      getattr(ad, f).set_value(new[f])
  folder = delora_jax.peft.export_lora(adapted, tmp_path / "lora", module_names=lambda p: p.split("/")[0])
  lora = read_lora(folder)
  served = delora_jax.nnx.unwrap(adapted)
  for name in ("up", "down"):
    k = getattr(served, name).kernel
    k.set_value(jnp.asarray(np.asarray(k.get_value(), np.float64) + lora[name], jnp.float32))
  want = adapted(x)
  assert rel(served(x), want) < RTOL
  assert rel(delora_jax.nnx.unwrap(adapted)(x), want) > 1e-2


def test_stacked_kernel_with_its_layer_axis_inside_gives_one_lora_module_per_layer(tmp_path):
  # (in, layers, out), the layer axis at position 1 as MaxText stores scanned kernels; each layer's
  # slice is used by its own matmul.
  n_in, n_layers, n_out = 10, 3, 6
  w = jax.random.normal(jax.random.key(2), (n_in, n_layers, n_out))
  x = jax.random.normal(jax.random.key(3), (4, n_in))
  tree = scrambled(
    delora_jax.wrap({"w": w}, {"w": delora_jax.Rule(2, 1.5, in_axes=(0,), out_axes=(2,), stack_axes=(1,))})
  )

  def run(params):
    return jnp.stack([x @ params["w"][:, i, :] for i in range(n_layers)])

  want = run(delora_jax.merge(tree))  # the DeLoRA weights (merge == factorised apply: test_stacked.py)
  folder = delora_jax.peft.export_lora(tree, tmp_path / "lora", module_names={"w": "layers.{}.proj"})
  lora = read_lora(folder)
  assert sorted(lora) == [f"layers.{i}.proj" for i in range(n_layers)]
  served = np.asarray(w, np.float64).copy()
  for i in range(n_layers):
    served[:, i, :] += lora[f"layers.{i}.proj"]
  assert rel(run({"w": jnp.asarray(served, jnp.float32)}), want) < RTOL
  assert rel(run({"w": w}), want) > 1e-2


def test_importing_delora_jax_imports_no_integration_target():
  code = (
    "import sys, delora_jax, delora_jax.nnx, delora_jax.integrations.maxtext; "
    "print(sorted(m for m in ('maxtext', 'tunix', 'qwix', 'torch') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
  assert out.stdout.strip() == "[]", out


def test_quantized_base_lora_folder_gives_the_delora_outputs_on_the_dequantized_base(tmp_path):
  """QDeLoRA served: the LoRA folder holds the adapters only; a server applying it to the base it holds (here the
  dequantized base, what `delora_jax.unwrap` returns) gives the QDeLoRA model's outputs."""
  x = jax.random.normal(jax.random.key(0), (5, 12))
  params = MLP().init(jax.random.key(1), x)["params"]
  tree = scrambled(delora_jax.wrap(params, {".*/kernel": delora_jax.Rule(4, 2.0, quantize="nf4", tile_size=4)}))
  folder = delora_jax.peft.export_lora(tree, tmp_path / "lora", module_names={"up/kernel": "up", "down/kernel": "down"})
  lora, base = read_lora(folder), delora_jax.unwrap(tree)
  for name in ("up", "down"):
    base[name]["kernel"] = np.asarray(base[name]["kernel"], np.float64) + lora[name]
  want = delora_jax.apply(MLP(), {"params": tree}, x, strict=True)
  with jax.enable_x64(True):
    got = MLP().apply({"params": base}, np.asarray(x, np.float64))
  assert rel(got, want) < RTOL


def test_to_maxtext_lora_refuses_what_maxtext_lora_cannot_hold():
  """MaxText's LoRA holds `<module>/kernel_lora_a/_b` with one layer axis: a kernel not named 'kernel', or with two
  stacked axes, is a clear error naming its path (to_maxtext_lora reads no MaxText; a plain config stands in)."""
  import types  # noqa: PLC0415

  from delora_jax.integrations import maxtext as dl_maxtext  # noqa: PLC0415

  cfg = types.SimpleNamespace(
    lora=types.SimpleNamespace(enable_lora=True, lora_rank=2, lora_module_path="", lora_alpha=4.0), param_scan_axis=1
  )
  w = jax.random.normal(jax.random.key(0), (6, 4))
  tree = delora_jax.wrap({"proj": {"w": w}}, {"proj/w": delora_jax.Rule(2, init="random")})
  with pytest.raises(ValueError, match=r"proj/w: MaxText's LoRA adapts module kernels named 'kernel'"):
    dl_maxtext.to_maxtext_lora(tree, cfg)
  w4 = jax.random.normal(jax.random.key(0), (2, 3, 6, 4))
  tree = delora_jax.wrap({"m": {"kernel": w4}}, {"m/kernel": delora_jax.Rule(2, init="random", stack_axes=2)})
  with pytest.raises(ValueError, match=r"m/kernel: 2 stacked axes; MaxText's LoRA stacks one layer axis"):
    dl_maxtext.to_maxtext_lora(tree, cfg)
  tree = delora_jax.wrap({"m": {"kernel": w}}, {"m/kernel": delora_jax.Rule(2, init="random")})
  got = dl_maxtext.to_maxtext_lora(tree, cfg)
  f = delora_jax.to_lora(tree)["m/kernel"]
  np.testing.assert_array_equal(got["m/kernel_lora_a"], f["lora_a"])
  np.testing.assert_allclose(got["m/kernel_lora_b"] * 2.0, f["lora_b"], rtol=1e-7)  # alpha / r = 2
