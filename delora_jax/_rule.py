"""`Rule`: how one group of kernels is adapted, and kernel-layout resolution."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

INITS = ("peft", "random", "paper")
QUANTIZE = ("int8", "int4", "nf4")
NORMS = ("float32", "base")


def _as_axes(value: Any, name: str) -> tuple[int, ...] | None:
  if value is None:
    return None
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return (int(value),)
  if isinstance(value, Sequence) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
    if not value:
      raise ValueError(f"`{name}` must name at least one axis; got an empty sequence.")
    return tuple(int(v) for v in value)
  raise TypeError(f"`{name}` must be an int or a sequence of ints; got {value!r}.")


def _as_stack(value: Any) -> int | tuple[int, ...]:
  """``stack_axes`` as an int (that many leading axes) or a sorted tuple of positions that are not
  the leading ones (leading positions become their count, the one layout of leading stacks)."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    if value < 0:
      raise ValueError(
        f"`stack_axes` must be an int >= 0 (the number of leading stacked axes) or a tuple of axis "
        f"positions; got {value!r}. Use e.g. Rule(8, stack_axes=1) or Rule(8, stack_axes=(1,))."
      )
    return int(value)
  if (
    isinstance(value, Sequence)
    and not isinstance(value, str)
    and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
  ):
    pos = [int(v) for v in value]
    if any(v < 0 for v in pos):
      raise ValueError(
        f"`stack_axes`={tuple(value)!r}: stacked axis positions count from the first axis of the "
        "stored kernel and must be >= 0. Use e.g. Rule(8, stack_axes=(1,)) for (embed, layers, ...)."
      )
    if len(set(pos)) != len(pos):
      raise ValueError(f"`stack_axes`={tuple(value)!r} repeats an axis; name each stacked axis once.")
    out = tuple(sorted(pos))
    return len(out) if out == tuple(range(len(out))) else out
  raise ValueError(
    f"`stack_axes` must be an int >= 0 (the number of leading stacked axes) or a tuple of axis "
    f"positions; got {value!r}. Use e.g. Rule(8, stack_axes=1) or Rule(8, stack_axes=(1,))."
  )


def stack_positions(stack_axes: int | tuple[int, ...]) -> tuple[int, ...]:
  """The positions a normalised ``Rule.stack_axes`` names."""
  return tuple(range(stack_axes)) if isinstance(stack_axes, int) else tuple(stack_axes)


def _as_slices(value: Any, stack_axes: int | tuple[int, ...]) -> tuple[int, ...] | None:
  if value is None:
    return None
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (value,)
  if (
    not isinstance(value, Sequence)
    or isinstance(value, str)
    or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
  ):
    raise TypeError(
      f"`slices` must be None or a sequence of slice indices (ints); got {value!r}. "
      "Use e.g. Rule(8, stack_axes=1, slices=(0, 2))."
    )
  n_stack = len(stack_positions(stack_axes))
  out = tuple(sorted({int(v) for v in value}))
  if not out or out[0] < 0:
    raise ValueError(f"`slices` must name at least one slice, each index >= 0; got {value!r}.")
  if n_stack < 1:
    raise ValueError(
      f"`slices`={out} selects slices of a stacked kernel, but stack_axes="
      f"{stack_axes}. Give stack_axes >= 1 (layers under nn.scan) or their positions "
      "(e.g. stack_axes=(1,)), or drop `slices`."
    )
  return out


@dataclasses.dataclass(frozen=True)
class Rule:
  """How the kernels matched by one pattern are adapted.

  Args:
    rank: adapter rank ``r`` (PEFT's ``r``), a positive int. As in PEFT it may
      exceed ``min(in, out)`` of a kernel (the update then has rank
      ``min(in, out)``; the bound still holds).
    lam: initial bound λ (PEFT's ``delora_lambda``, default 15). Finite in the adapter
      ``dtype``; not 0 with ``init="peft"`` (``b = 0`` and ``λ = 0`` give zero gradients
      forever).
    init: ``"peft"`` (PEFT's default ``init_weights=True``: ``a``
      Kaiming-uniform, ``b`` zeros, so the model is unchanged at step 0),
      ``"random"`` (PEFT's ``init_weights=False``: ``b`` Kaiming-uniform too)
      or ``"paper"`` (random ``a`` and ``b`` with the initial update subtracted
      and kept frozen, so the model is unchanged at step 0 and the update grows
      smoothly; not expressible as a PEFT adapter file).
    dropout: PEFT's ``module_dropout``: dropout on the adapter branch's input.
    in_axes: axes of the stored kernel that are inputs (flattened, in order,
      to ``in``). Negative numbers count from the end.
    out_axes: axes that are outputs. If only one of ``in_axes``/``out_axes``
      is given, the other is every remaining non-stacked axis. If neither is
      given the kernel (without stacked axes) must be 2-D ``(in, out)``.
    stack_axes: the kernel's stacked (layer) axes; each slice gets its own
      independent adapter. An int ``n``: the ``n`` leading axes (layers under
      ``nn.scan`` with ``variable_axes={"params": 0}``, ``nn.vmap``), e.g. ``1`` for
      ``(layers, in, out)``. A tuple: the positions of the stacked axes in the stored
      kernel, e.g. ``(1,)`` for MaxText's default ``param_scan_axis=1`` (query
      ``(embed, layers, heads, head_dim)``, wi_0 ``(embed, layers, mlp)``) or
      ``nn.scan(..., variable_axes={"params": 1})``; ``(0,)`` is the same as ``1``.
      ``in_axes``/``out_axes`` count axes of the stored kernel, stacked ones
      included. The adapters keep the stacked axes where the kernel keeps them
      (``a (in, L, r)``, ``b (r, L, out)``, ``lam (1, L)``, ``w_norm (in, L)`` for
      ``(in, L, out)`` and ``stack_axes=(1,)``), so a scan that slices (or moves)
      that axis of every parameter slices kernel and adapters alike. A model
      call inside such a scan sees the kernel without its first stacked axes.
    dtype: dtype of ``a``, ``b``, ``lam`` and ``w_norm`` (default float32, also
      for bf16 base kernels).
    norm: how ``w_norm`` is computed from the base kernel. ``"float32"``
      (default): in float32, the most accurate value. ``"base"``: PEFT's value,
      the float32 norm rounded to the base kernel's dtype (PEFT computes
      ``torch.norm`` in the weight's dtype); differs from ``"float32"`` only for
      low-precision bases (bf16: ~1e-3 relative), where it makes a fresh adapter
      bit-compatible with one PEFT creates on the same weights.
    slices: for stacked kernels (``stack_axes`` not 0), the flat indices
      (row-major over the stacked axes, in position order) of the slices to adapt, e.g. ``(0, 2)``
      for PEFT's ``layers_to_transform=[0, 2]`` on a scanned model; ``None``
      adapts every slice. The other slices hold all-zero ``a``, ``b``, ``λ`` and
      ``w_norm``: their update is exactly zero, gets exactly zero gradient and
      stays zero under any optax optimizer.
    quantize: store the selected base kernels quantized (QDeLoRA): ``"int8"``, ``"int4"`` or
      ``"nf4"`` (4-bit NormalFloat indices), with float32 absmax scales as qwix computes them, one per
      output channel, or one per ``tile_size`` block. ``w_norm`` is computed from the
      full-precision kernel before quantization, so ``ΔW`` is the full-precision base's; no
      full-precision copy stays in the tree. ``merge``/``unwrap`` return float kernels (the
      dequantized base) in the original dtype. ``None`` (default): the kernel is kept as given.
    tile_size: with ``quantize``, one scale per block of ``tile_size`` entries along the kernel's
      innermost input axis (sub-channel quantization, qwix's ``tile_size``); must divide that
      axis. ``None``: one scale per output channel.

  Example:
    >>> import delora_jax
    >>> rule = delora_jax.Rule(8, lam=12.0)
    >>> rule.rank, rule.lam, rule.init, rule.dtype
    (8, 12.0, 'peft', 'float32')
    >>> first_layer_only = delora_jax.Rule(8, stack_axes=1, slices=(0,))  # under nn.scan
    >>> attn_out = delora_jax.Rule(8, out_axes=-1)  # (heads, head_dim, embed)
    >>> scanned_query = delora_jax.Rule(8, in_axes=0, stack_axes=(1,))  # (embed, layers, heads, head_dim)
    >>> delora_jax.Rule(8, stack_axes=(0,)).stack_axes  # leading positions are a count
    1
    >>> qlora = delora_jax.Rule(8, quantize="nf4", tile_size=32)  # base stored as 4-bit NF4
    >>> qlora.quantize, qlora.tile_size
    ('nf4', 32)
  """

  rank: int
  lam: float = 15.0
  _: dataclasses.KW_ONLY
  init: str = "peft"
  dropout: float = 0.0
  in_axes: Any = None
  out_axes: Any = None
  stack_axes: Any = 0
  dtype: Any = "float32"
  norm: str = "float32"
  slices: Any = None
  quantize: str | None = None
  tile_size: int | None = None

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)):
      raise TypeError(f"`rank` must be a positive int; got {self.rank!r}.")
    if self.rank <= 0:
      raise ValueError(f"`rank` must be a positive int; got {self.rank}. Use e.g. Rule(8).")
    try:
      lam = float(self.lam)
    except (TypeError, ValueError):
      raise TypeError(f"`lam` must be a real number; got {self.lam!r}.") from None
    if not math.isfinite(lam):
      raise ValueError(f"`lam` must be finite; got {self.lam!r}. PEFT's default is 15.")
    object.__setattr__(self, "lam", lam)
    object.__setattr__(self, "rank", int(self.rank))
    if self.init not in INITS:
      raise ValueError(f"`init` must be one of {INITS}; got {self.init!r}.")
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float, np.floating, np.integer)):
      raise TypeError(
        f"`dropout` must be a probability in [0, 1) (PEFT's module_dropout); got "
        f"{self.dropout!r}. Use e.g. Rule(8, dropout=0.1)."
      )
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"`dropout` must be in [0, 1); got {self.dropout!r}.")
    object.__setattr__(self, "dropout", float(self.dropout))
    object.__setattr__(self, "in_axes", _as_axes(self.in_axes, "in_axes"))
    object.__setattr__(self, "out_axes", _as_axes(self.out_axes, "out_axes"))
    object.__setattr__(self, "stack_axes", _as_stack(self.stack_axes))
    try:
      dtype = jnp.dtype(self.dtype)
    except TypeError:
      raise TypeError(f"`dtype` must be a floating dtype; got {self.dtype!r}.") from None
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"`dtype` must be a floating dtype; got {dtype}.")
    object.__setattr__(self, "dtype", dtype.name)
    with np.errstate(over="ignore"):
      stored = np.asarray(lam, dtype=dtype)
    if not np.isfinite(stored):
      raise ValueError(
        f"`lam`={lam!r} overflows the adapter dtype {dtype.name} (it would be stored as "
        f"{stored}). Use a smaller λ (PEFT's default is 15) or a wider `dtype`."
      )
    if self.norm not in NORMS:
      raise ValueError(
        f"`norm` must be one of {NORMS}; got {self.norm!r}. Use 'base' for PEFT's w_norm on low-precision bases."
      )
    object.__setattr__(self, "slices", _as_slices(self.slices, self.stack_axes))
    _check_quantize(self.quantize, self.tile_size)
    if self.tile_size is not None:
      object.__setattr__(self, "tile_size", int(self.tile_size))
    if lam == 0.0 and self.init == "peft":
      raise ValueError(
        "`lam`=0 with init='peft' (b = 0) gives exactly zero gradients to a, b and λ, so the "
        "adapter could never train. Use a non-zero λ (PEFT's default is 15), or init='random'."
      )

  def layout(self, path: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Resolves ``(in_axes, out_axes)`` of a kernel of ``shape`` (see :meth:`kernel_layout`)."""
    return self.kernel_layout(path, shape)[:2]

  def kernel_layout(
    self, path: str, shape: tuple[int, ...]
  ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Resolves ``(in_axes, out_axes, stack)`` of a kernel of ``shape``, as :class:`DeloraKernel`
    stores them: negative axes and ``stack=()`` for leading stacked axes; positions in the
    stored kernel and the stacked positions for stacked axes elsewhere."""
    ndim = len(shape)
    fix = (
      "Declare the layout in the Rule, e.g. Rule(r, in_axes=..., out_axes=..., "
      "stack_axes=...), or let wrap infer it from the model: "
      "wrap(params, rules, like=(model, *example_args))."
    )
    stacks = stack_positions(self.stack_axes)
    positioned = isinstance(self.stack_axes, tuple)
    if positioned and stacks[-1] >= ndim:
      raise ValueError(
        f"{path}: stack_axes={self.stack_axes} names axis {stacks[-1]}, but the kernel of shape "
        f"{shape} has axes 0 to {ndim - 1}. Give the positions of its stacked (layer) axes in "
        "the stored kernel, e.g. Rule(r, stack_axes=(1,)) for (embed, layers, ...)."
      )
    n = ndim - len(stacks)
    if n < 2:
      raise ValueError(
        f"{path}: kernel of shape {shape} with stack_axes={self.stack_axes} leaves "
        f"{n} axis(es); expected at least 2 (inputs and outputs). {fix}"
      )
    body = [a for a in range(ndim) if a not in stacks]
    where = f"one of the stacked axes {stacks}" if positioned else f"one of the {len(stacks)} leading stacked axes"

    def norm(axes, name):
      out = []
      for ax in axes:
        if not -ndim <= ax < ndim:
          raise ValueError(f"{path}: `{name}` axis {ax} is out of range for kernel shape {shape}. {fix}")
        ax = ax % ndim
        if ax in stacks:
          raise ValueError(
            f"{path}: `{name}` axis {ax} is {where} (stack_axes={self.stack_axes}) of kernel shape {shape}. "
            f"An axis is stacked, input or output, never two of them. {fix}"
          )
        out.append(ax)
      if len(set(out)) != len(out):
        raise ValueError(f"{path}: `{name}`={axes} repeats an axis. {fix}")
      return out

    ins = norm(self.in_axes, "in_axes") if self.in_axes is not None else None
    outs = norm(self.out_axes, "out_axes") if self.out_axes is not None else None
    if ins is None and outs is None:
      if n != 2:
        raise ValueError(
          f"{path}: kernel of shape {shape} is {n}-D after its stacked axes "
          f"(stack_axes={self.stack_axes}), so which axes are inputs and which outputs is ambiguous; "
          f"expected a 2-D (in, out) kernel or a declared layout. {fix}"
        )
      ins, outs = [body[0]], [body[1]]
    elif ins is None:
      assert outs is not None  # the first branch took "both None"
      ins = [a for a in body if a not in outs]
    elif outs is None:
      outs = [a for a in body if a not in ins]
    if set(ins) & set(outs):
      raise ValueError(f"{path}: in_axes {tuple(ins)} and out_axes {tuple(outs)} overlap. {fix}")
    if sorted(ins + outs) != body or not ins or not outs:
      raise ValueError(
        f"{path}: in_axes {tuple(ins)} and out_axes {tuple(outs)} must together cover the "
        f"non-stacked axes {tuple(body)} of kernel shape {shape}, each side non-empty. {fix}"
      )
    if positioned:
      return tuple(ins), tuple(outs), stacks
    return tuple(a - ndim for a in ins), tuple(a - ndim for a in outs), ()


def _check_quantize(quantize: Any, tile_size: Any) -> None:
  if quantize is not None and quantize not in QUANTIZE:
    raise ValueError(
      f"`quantize` must be None or one of {QUANTIZE}; got {quantize!r}. Use e.g. Rule(8, quantize='nf4')."
    )
  if tile_size is None:
    return
  if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)):
    raise TypeError(f"`tile_size` must be a positive int or None; got {tile_size!r}. Use e.g. tile_size=32.")
  if tile_size <= 0:
    raise ValueError(f"`tile_size` must be a positive int or None; got {tile_size}. Use e.g. tile_size=32.")
  if quantize is None:
    raise ValueError(
      f"`tile_size`={tile_size} is given without `quantize`: tiles are blocks of quantization scales. "
      "Give both, e.g. Rule(8, quantize='int4', tile_size=32), or drop tile_size."
    )


def as_rule(value: Any, pattern: Any) -> Rule:
  if isinstance(value, Rule):
    return value
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return Rule(int(value))
  raise TypeError(f"rules[{pattern!r}] must be a delora_jax.Rule or an int rank; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Modules:
  """A rules key that selects modules by path, as qwix's ``LoraRule(module_path=...)`` and MaxText's
  ``lora_module_path`` do, instead of parameters by path.

  ``pattern`` is matched with ``re.fullmatch`` against each parameter's *module path*: its path
  without the last name (``layers/0/attn/q_proj`` for ``layers/0/attn/q_proj/w``; a Linen
  module's path in its params dict). Every kernel the matched modules hold directly is adapted with
  the rule: each floating array with two axes or more, but those named ``bias`` (1-D biases and
  scales have fewer axes). A module holding another 2-D array it does not contract needs a parameter
  path key instead (with ``like=``, such an array is an error naming it). A string
  key keeps selecting parameters by their full path, as before; both kinds may be mixed in one
  rules dict (the first key that selects a kernel wins). A ``Modules`` key whose pattern matches
  no module holding a kernel is a ``ValueError`` listing module paths that do.

  Args:
    pattern: a regex over module paths, e.g. qwix's ``".*q_proj|.*k_proj|.*down_proj"``.

  Example:
    >>> import jax.numpy as jnp, delora_jax
    >>> params = {"attn": {"q_proj": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}},
    ...           "mlp": {"down_proj": {"kernel": jnp.ones((8, 4))}}}
    >>> tree = delora_jax.wrap(params, {delora_jax.Modules(".*q_proj|.*down_proj"): 2})
    >>> sorted(delora_jax.adapters(tree))  # the kernels of both modules, not the bias
    ['attn/q_proj/kernel', 'mlp/down_proj/kernel']
  """

  pattern: str

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise TypeError(
        f"delora_jax.Modules: `pattern` must be a regex string over module paths, e.g. '.*q_proj'; "
        f"got {self.pattern!r}."
      )

  def __repr__(self) -> str:
    return f"delora_jax.Modules({self.pattern!r})"

  def selects(self, regex: Any, path: str) -> bool:
    """Whether the parameter at ``path`` belongs to a module that ``regex`` (this pattern) matches."""
    return regex.fullmatch(path.rpartition("/")[0]) is not None


def is_module_kernel(path: str, leaf: Any) -> bool:
  """What a :class:`Modules` key adapts in a module it matches: a floating array with two axes or
  more that is not named ``bias`` (Flax's name for biases, 2-D in ``nnx.LinearGeneral``)."""
  return (
    hasattr(leaf, "shape")
    and hasattr(leaf, "dtype")
    and jnp.issubdtype(leaf.dtype, jnp.floating)
    and leaf.ndim >= 2
    and path.rpartition("/")[2] != "bias"
  )
