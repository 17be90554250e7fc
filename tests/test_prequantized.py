"""Models a user already quantized (qwix PTQ and QAT, gemma's int wrappers) are refused, clearly.

delora_jax adapts floating kernels and quantizes a base itself (``Rule(quantize=...)``); a kernel that
arrives quantized, or a model whose ops qwix or gemma replaced, would otherwise be merged (``w + ΔW``)
or run without its quantized ops. Every case is a ``TypeError`` at wrap (or apply) naming the path, what
was found and the fix. qwix and gemma are not dependencies: this file runs where they are installed
(conftest.py MAIN_STACK_ONLY).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx
from gemma import peft as gemma_peft
from gemma.gm.nn import _layers as gemma_layers
from gemma.gm.nn import _quantization as gemma_quantization

import delora_jax
import delora_jax.nnx

pytestmark = [
  # qwix's NNX code, not ours: its `VariableState`, `.value` and `iter_modules` uses.
  pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore:The 'm.iter_modules\\(\\)' method is deprecated:DeprecationWarning"),
]
X = jax.random.normal(jax.random.key(0), (4, 32))
FIX = re.escape("Pass the float model and use Rule(quantize='int8'|'int4'|'nf4', tile_size=...)")


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="out")(nn.gelu(nn.Dense(16, name="hidden")(x)))


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(32, 16, rngs=rngs)
    self.out = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.gelu(self.hidden(x)))


class GemmaBlock(nn.Module):
  """gemma-style: gemma's own Einsum (weight `w`) and a Dense."""

  @nn.compact
  def __call__(self, x):
    h = gemma_layers.Einsum(shape=(32, 16), name="proj")("bd,df->bf", x)
    return nn.Dense(8, name="out")(nn.gelu(h))


def _qwix_linen(provider="ptq", module_path=".*"):
  """(qwix-quantized model, its PTQ params, the float model, the float params)."""
  model = LinenMLP()
  fp = model.init(jax.random.key(1), X)["params"]
  if provider == "qt":
    return (
      qwix.quantize_model(model, qwix.QtProvider([qwix.QtRule(module_path=module_path, weight_qtype="int8")])),
      None,
      model,
      fp,
    )
  qm = qwix.quantize_model(
    model, qwix.PtqProvider([qwix.QuantizationRule(module_path=module_path, weight_qtype="int8")])
  )
  return qm, qwix.quantize_params(fp, jax.eval_shape(qm.init, jax.random.key(1), X)["params"]), model, fp


def _qarray_error(path):
  return re.escape(f"{path}: rules key") + ".*" + re.escape("a qwix QArray (int8 qvalue of shape") + ".*" + FIX


@pytest.mark.parametrize(
  "key",
  [".*kernel", "hidden/kernel", ".*qvalue", ".*kernel/array/scale", delora_jax.Modules(".*hidden")],
  ids=["kernel", "exact_path", "qvalue", "scale", "modules"],
)
@pytest.mark.parametrize("quantize", [None, "int8"], ids=["plain", "quantize_int8"])
def test_qwix_ptq_linen_params_refused(key, quantize):
  """Whatever selects a qwix-quantized kernel (the kernel, a leaf inside it, its module) is refused."""
  _, qp, _, _ = _qwix_linen()
  with pytest.raises(TypeError, match=_qarray_error("hidden/kernel")):
    delora_jax.wrap(qp, {key: delora_jax.Rule(4, quantize=quantize)})


def test_qwix_ptq_abstract_params_refused():
  """Abstract PTQ params (jax.eval_shape of the quantized model's init, as a pod plan gets them) too."""
  qm, _, _, _ = _qwix_linen()
  abstract = jax.eval_shape(qm.init, jax.random.key(1), X)["params"]
  with pytest.raises(TypeError, match=_qarray_error("hidden/kernel")):
    delora_jax.wrap(abstract, {".*kernel": 4})


def test_qwix_ptq_kernels_left_unselected_still_wrap():
  """Only selected kernels are checked: the float kernel of a partly quantized model adapts as usual."""
  _, qp, _, _ = _qwix_linen(module_path="hidden")
  tree = delora_jax.wrap(qp, {"out/kernel": 4})
  assert list(delora_jax.adapters(tree)) == ["out/kernel"]
  assert tree["hidden"]["kernel"].array.qvalue is qp["hidden"]["kernel"].array.qvalue


@pytest.mark.parametrize("provider", ["ptq", "qt"])
def test_qwix_linen_model_with_float_params_refused(provider):
  """A qwix-quantized Linen model with a float adapted tree: apply (and like=) refuse it; before, apply ran
  the adapted layers without qwix's ops (PTQ: the float model's output; QAT: no fake-quant, no gradient)."""
  qm, _, _, fp = _qwix_linen(provider)
  tree = delora_jax.wrap(fp, {".*kernel": 4})
  fix = "qwix.quantize_model.*" + FIX
  with pytest.raises(TypeError, match=re.escape("delora_jax.apply: `model` was transformed by ") + fix):
    delora_jax.apply(qm, {"params": tree}, X)
  with pytest.raises(TypeError, match=re.escape("delora_jax.wrap(like=...): `model` was transformed by ") + fix):
    delora_jax.wrap(fp, {".*kernel": 4}, like=(qm, X))


def test_recommended_fix_matches_qwix_ptq_model():
  """The fix the errors give: the float model with Rule(quantize='int8') computes, at init (b = 0), the
  output of the user's qwix int8 PTQ model, factorised (strict=True)."""
  qm, qp, model, fp = _qwix_linen()
  tree = delora_jax.wrap(fp, {".*kernel": delora_jax.Rule(4, quantize="int8")})
  ours = delora_jax.apply(model, {"params": tree}, X, strict=True)
  np.testing.assert_allclose(ours, qm.apply({"params": qp}, X), rtol=1e-5, atol=1e-5)


def test_recommended_fix_matches_qwix_ptq_nnx_model():
  """The same on NNX: delora_jax.nnx.wrap of the float model with Rule(quantize='int8') gives, at b = 0, the
  output of the model quantized by qwix's int8 PTQ, factorised (strict=True)."""
  model = NnxMLP(nnx.Rngs(1))
  with jax.numpy_rank_promotion("allow"):  # qwix's NNX Linear adds the bias (out,) to (batch, out)
    theirs = qwix.quantize_model(
      model, qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype="int8")]), X
    )(X)
  ours = delora_jax.nnx.wrap(model, {".*kernel": delora_jax.Rule(4, quantize="int8")}, strict=True)(X)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("provider", ["ptq", "qt"])
def test_qwix_nnx_model_refused(provider):
  """qwix on an nnx.Linear model (PTQ: kernels become WithAux(QArray); QAT: float kernels, fake-quant ops)."""
  prov = qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype="int8")])
  if provider == "qt":
    prov = qwix.QtProvider([qwix.QtRule(module_path=".*", weight_qtype="int8")])
  with jax.numpy_rank_promotion("allow"):  # qwix's NNX Linear adds the bias (out,) to (batch, out)
    qm = qwix.quantize_model(NnxMLP(nnx.Rngs(1)), prov, X)
  msg = re.escape("delora_jax.nnx.wrap: `model` was transformed by qwix.quantize_model") + ".*" + FIX
  with pytest.raises(TypeError, match=msg):
    delora_jax.nnx.wrap(qm, {".*kernel": 4})
  if provider == "ptq":  # its state, wrapped as a tree
    with pytest.raises(TypeError, match=_qarray_error("hidden/kernel")):
      delora_jax.wrap(nnx.state(qm), {".*kernel": 4})


@pytest.mark.parametrize("dtype", [jnp.int4, jnp.int8], ids=["int4", "int8"])
@pytest.mark.parametrize(
  ("key", "path"), [(".*kernel", "out/kernel"), ("proj/.*kernel", "proj/_IntEinsum_0/kernel")], ids=["dense", "einsum"]
)
def test_gemma_int_wrapper_params_refused(dtype, key, path):
  """gemma's IntWrapper keeps int kernels with a separate scale: refused, naming it and the fix."""
  with jax.numpy_rank_promotion("allow"):  # gemma's IntDense adds the bias (out,) to (batch, out)
    params = gemma_quantization.IntWrapper(model=GemmaBlock(), dtype=dtype).init(jax.random.key(1), X)["params"]
  msg = re.escape(f"{path}: rules pattern {key!r} matched an integer array of dtype {jnp.dtype(dtype)}") + ".*"
  with pytest.raises(TypeError, match=msg + "already quantized .gemma.s IntWrapper.*" + FIX):
    delora_jax.wrap(params, {key: 4})
  with pytest.raises(TypeError, match=re.escape(f"{path}: Rule(quantize='int8') quantizes a floating-point")):
    delora_jax.wrap(params, {key: delora_jax.Rule(4, quantize="int8")})


def test_gemma_quantize_helper_params_refused():
  """gemma.peft.quantize (checkpoint params, in place: `kernel` int4 + `scale`)."""
  params = {"layer_0": {"attn": {"q_einsum": {"w": jnp.ones((2, 32, 16))}}}}
  q = gemma_peft.quantize(params, method="INT4", in_place_keys=True)
  with pytest.raises(TypeError, match=re.escape("layer_0/attn/q_einsum/kernel: rules pattern") + ".*int4.*" + FIX):
    delora_jax.wrap(q, {".*kernel": delora_jax.Rule(4, in_axes=1)})


def test_gemma_int_wrapper_model_with_float_params_refused():
  model = GemmaBlock()
  tree = delora_jax.wrap(model.init(jax.random.key(1), X)["params"], {".*(kernel|w)": 4})
  with pytest.raises(TypeError, match=re.escape("delora_jax.apply: `model` is gemma's IntWrapper") + ".*" + FIX):
    delora_jax.apply(gemma_quantization.IntWrapper(model=model), {"params": tree}, X)
