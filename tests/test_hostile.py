"""Hostile adapter files (issue 21: S3, M1, M2, M3, L4, L5, L6) and the bf16 PEFT round trip.

A PEFT folder is often downloaded: its config's regexes, numbers and tensors are untrusted.
Each case must be a clear ValueError or correct, fast, and without large allocations.
No torch: these run on every CI stack.
"""

import contextlib
import json
import re
import signal

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import delora_jax
from delora_jax.peft import _config, _load

#: 60-character torch module names: `(.|.)*Z` would take ~2^60 steps on them in Python's re.
LONG = "model.layers.0.self_attn." + "q" * 28 + "."
NAMES = {"lin0/kernel": LONG + "lin0", "lin1/kernel": LONG + "lin1"}
EVIL = "(.|.)*Z"


def _params():
  rng = np.random.default_rng(0)
  return {
    "lin0": {"kernel": jnp.asarray(rng.standard_normal((8, 6), np.float32))},
    "lin1": {"kernel": jnp.asarray(rng.standard_normal((6, 4), np.float32))},
  }


@contextlib.contextmanager
def _deadline(seconds):
  """Fails (instead of hanging) if the block runs longer: Python's re matcher is interruptible."""

  def stop(*_):
    raise TimeoutError(f"still matching after {seconds} s: the config regex backtracks")

  old = signal.signal(signal.SIGALRM, stop)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


# Each config holds the catastrophic regex under one key; none of the names contains "Z", so the
# regex selects nothing and the rules are those of the rest of the config.
REDOS = {
  "target_modules": ({"target_modules": f"{EVIL}|.*lin0"}, {"lin0/kernel": 8}),
  "exclude_modules": (
    {"target_modules": ["lin0", "lin1"], "exclude_modules": EVIL},
    {"lin0/kernel": 8, "lin1/kernel": 8},
  ),
  "rank_pattern": ({"target_modules": ["lin0"], "rank_pattern": {EVIL: 2, "lin0": 3}}, {"lin0/kernel": 3}),
  "lambda_pattern": ({"target_modules": ["lin1"], "lambda_pattern": {EVIL: 2.0}}, {"lin1/kernel": 8}),
  "modules_to_save": ({"target_modules": ["lin0"], "modules_to_save": [EVIL]}, {"lin0/kernel": 8}),
  "layers_pattern": (
    {"target_modules": ["lin0"], "layers_to_transform": [0], "layers_pattern": [EVIL, "layers"]},
    {"lin0/kernel": 8},
  ),
}


@pytest.mark.parametrize("case", list(REDOS), ids=list(REDOS))
def test_catastrophic_regexes_are_matched_in_linear_time(case):
  (config, want), params = REDOS[case], _params()
  with _deadline(10.0):
    got = delora_jax.peft.rules(config, params, module_names=NAMES)
  assert {re.sub(r"\\", "", p): r.rank for p, r in got.items()} == want


def test_catastrophic_rank_pattern_in_a_folder_loads(tmp_path):
  tree = delora_jax.wrap(_params(), {"lin0/kernel": delora_jax.Rule(4, init="random")})
  out = delora_jax.peft.export(tree, tmp_path / "a", module_names=NAMES)
  params = _params()
  delora_jax.peft.load(out, params, module_names=NAMES)  # compiles the checks
  _edit(out, config=lambda c: c.update(rank_pattern={EVIL: 2, **c["rank_pattern"]}))
  with _deadline(10.0):
    back = delora_jax.peft.load(out, params, module_names=NAMES)
  np.testing.assert_array_equal(back["lin0"]["kernel"].a, tree["lin0"]["kernel"].a)


@pytest.mark.parametrize(
  "key, pattern, why",
  [
    ("target_modules", r"(lin)\1", r"invalid escape sequence: \\1"),
    ("target_modules", r"(?=.*lin0).*", r"invalid perl operator: \(\?="),
    ("exclude_modules", r".*(?<!x)lin0", r"\(\?<"),
    ("exclude_modules", r".*lin0\Z", r"invalid escape sequence: \\Z"),
    ("rank_pattern", r"lin0++", r"bad repetition operator: \+\+"),
    ("lambda_pattern", r"(?>lin)0", r"invalid perl operator: \(\?>"),
    ("rank_pattern", r"lin0{,3}", r"RE2 reads `\{,n\}` and `\[:name:\]` differently"),
    ("target_modules", r".*[[:alpha:]]0", r"RE2 reads `\{,n\}` and `\[:name:\]` differently"),
  ],
  ids=["backreference", "lookahead", "lookbehind", "backslash_Z", "possessive", "atomic", "brace_comma", "posix_class"],
)
def test_regexes_re2_cannot_run_are_refused_naming_key_and_pattern(key, pattern, why):
  config = {"target_modules": ["lin0"], key: pattern}
  shown = f"`{key}`"
  if key.endswith("_pattern"):
    config[key], shown = {pattern: 2}, f"`{key}[{pattern!r}]`"
  with pytest.raises(
    ValueError, match=re.escape(f"{shown} holds the regex {pattern!r}, which delora_jax refuses: ")
  ) as e:
    delora_jax.peft.rules(config, _params(), module_names=NAMES)
  assert re.search(why, str(e.value)) and "Rewrite the pattern" in str(e.value)


# Benign patterns must select exactly what Python's re (and so PEFT) selects.
PATTERNS = [
  r".*lin0",
  r".*\.lin[01]",
  r"model\.layers\.\d+\..*",
  r"(?i).*LIN1",
  r"[^.]+",
  r"lin0|lin1",
  r".*?lin\w",
  r"(.*\.)?(lin0|x)",
  r".*\blin1",
  r"(?s).*",
  r".*q{28}\.lin0",
  r"(?:model|x)\..*",
  r"(?P<m>model)\..*\.lin1",
  r".*[.]lin[0-9]{1}",
  r"lin0",
  r"\.lin1",
  r".*(self_attn)\..*",
  r"(?m)^model.*lin0$",
  r"(?i:MODEL)\..*",
]
MODULES = ["lin0", "lin1", "model.layers.0.lin0", "model.layers.12.self_attn.lin1", LONG + "lin0", "x.lin1", "head"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_benign_regexes_select_what_pythons_re_selects(pattern):
  for name in MODULES:
    assert (_config.linear(pattern).fullmatch(name) is not None) == (re.fullmatch(pattern, name) is not None), name
    if not pattern.startswith("(?") or pattern.startswith(("(?:", "(?P", "(?i:")):  # no global flags inside
      key = rf"(.*\.)?({pattern})$"  # rank_pattern / lambda_pattern, as PEFT matches them
      assert _config.pattern_value({pattern: 2}, name, 8) == (2 if re.match(key, name) else 8), name
      saved = rf"(^|.*\.){pattern}($|\..*)"  # modules_to_save
      got = _config.targeted({**_config.DEFAULTS, "modules_to_save": [pattern]}, name, [name])
      assert got == (re.match(saved, name) is None), name


def _folder(tmp_path):
  tree = delora_jax.wrap(
    _params(), {"lin0/kernel": delora_jax.Rule(4, init="random"), "lin1/kernel": delora_jax.Rule(2, init="random")}
  )
  return tree, str(delora_jax.peft.export(tree, tmp_path / "adapter", module_names=NAMES))


def _edit(folder, config=None, tensors=None):
  if config:
    with open(f"{folder}/adapter_config.json") as f:
      cfg = json.load(f)
    config(cfg)
    with open(f"{folder}/adapter_config.json", "w") as f:
      json.dump(cfg, f)
  if tensors:
    ts = load_file(f"{folder}/adapter_model.safetensors")
    tensors(ts)
    save_file(ts, f"{folder}/adapter_model.safetensors")


def _set(field, fn):
  key = f"base_model.model.{LONG}lin0.{field}"
  return lambda ts: ts.update({key: fn(ts[key])})


def _poison(value):
  def fn(x):
    x = x.copy()
    x.reshape(-1)[1 % x.size] = value
    return x

  return fn


BAD_TENSORS = {
  "A_nan": (_set("delora_A", _poison(np.nan)), r"lin0.delora_A: 1 of 32 entries are NaN or inf"),
  "B_inf": (_set("delora_B", _poison(np.inf)), r"lin0.delora_B: 1 of 24 entries are NaN or inf"),
  "A_minus_inf": (_set("delora_A", _poison(-np.inf)), r"lin0.delora_A: 1 of 32 entries are NaN or inf"),
  "w_norm_nan": (_set("delora_w_norm", _poison(np.nan)), r"lin0.delora_w_norm: 1 of 8 entries are NaN or inf"),
  "lambda_nan": (_set("delora_lambda", _poison(np.nan)), r"lin0.delora_lambda: 1 of 1 entries are NaN or inf"),
  "A_int32": (_set("delora_A", lambda x: x.astype(np.int32)), r"lin0.delora_A: dtype int32 in the file, where PEFT"),
  "lambda_bool": (_set("delora_lambda", lambda x: x > 0), r"lin0.delora_lambda: dtype bool in the file, where PEFT"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS), ids=list(BAD_TENSORS))
@pytest.mark.parametrize("target", ["plain", "adapted"])
def test_nonfinite_or_non_float_tensors_are_refused_by_name(tmp_path, case, target):
  tree, folder = _folder(tmp_path)
  edit, msg = BAD_TENSORS[case]
  _edit(folder, tensors=edit)
  with pytest.raises(ValueError, match=msg):
    delora_jax.peft.load(folder, _params() if target == "plain" else tree, module_names=NAMES)


def test_nonfinite_or_int_extra_tensors_are_refused(tmp_path):
  params = {**_params(), "head": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  names = {**NAMES, "head/kernel": "head"}
  tree = delora_jax.wrap(params, {"lin0/kernel": delora_jax.Rule(4, init="random")})
  folder = str(delora_jax.peft.export(tree, tmp_path / "a", module_names=names, extra_trainable="head/.*"))
  ts = load_file(f"{folder}/adapter_model.safetensors")
  for key, value, msg in [
    ("base_model.model.head.bias", np.asarray([0.0, np.nan, 0.0], np.float32), r"head.bias: 1 of 3 entries are NaN"),
    ("base_model.model.head.weight", np.ones((3, 4), np.int64), r"head.weight: dtype int64 in the file, the tree's"),
  ]:
    save_file({**ts, key: value}, f"{folder}/adapter_model.safetensors")
    with pytest.raises(ValueError, match=msg):
      delora_jax.peft.load(folder, params, module_names=names)


def test_nan_stored_norm_is_a_base_mismatch():
  tree = delora_jax.wrap(_params(), {"lin0/kernel": 4})
  k = tree["lin0"]["kernel"]
  from delora_jax._lora import check_base_norms

  check_base_norms("lin0/kernel", k, k.w_norm, "a test")
  with pytest.raises(ValueError, match=r"differs from the norms of this tree's kernel in 1 of 8 entries"):
    check_base_norms("lin0/kernel", k, k.w_norm.at[3].set(jnp.nan), "a test")


RANKS = {  # the export's config: r = 4 (lin0), a rank_pattern entry 2 for lin1
  "r_huge": (lambda c: c.update(r=10**9), r"lin0: rank 1000000000 in adapter_config.json .* delora_A \(4, 8\)"),
  "pattern_huge": (
    lambda c: c.update(rank_pattern=dict.fromkeys(c["rank_pattern"], 10**9)),
    r"lin1: rank 1000000000 in adapter_config.json \(`r` or its rank_pattern entry\), but delora_A \(2, 6\)",
  ),
  "r_wrong": (lambda c: c.update(r=3), r"lin0: rank 3 in adapter_config.json .* delora_B \(6, 4\) in the file"),
}


@pytest.mark.parametrize("case", list(RANKS), ids=list(RANKS))
def test_ranks_that_disagree_with_the_tensors_are_refused_before_allocation(tmp_path, monkeypatch, case):
  _, folder = _folder(tmp_path)
  _edit(folder, config=RANKS[case][0])

  def no_wrap(*_, **__):
    raise AssertionError("peft.load wrapped (allocated adapters) before checking the ranks")

  monkeypatch.setattr(_load, "wrap", no_wrap)
  with pytest.raises(ValueError, match=RANKS[case][1]):
    delora_jax.peft.load(folder, _params(), module_names=NAMES)


@pytest.mark.parametrize(
  "config, msg",
  [
    ({"r": 10**300}, r"`r` must be a positive integer; got 10{300}\. Write e.g. \"r\": 8 \(at most 2147483647\)"),
    ({"rank_pattern": {"lin0": 2**31}}, r"`rank_pattern\['lin0'\]` must be a positive integer; got 2147483648"),
    ({"r": 10**9}, r"lin0/kernel: .* rank 1000000000, above min\(in, out\) = 6 of its kernel of shape \(8, 6\)"),
    ({"delora_lambda": 10**400}, r"`delora_lambda` must be a finite number; got 10{400}"),
  ],
  ids=["r_1e300", "pattern_2_31", "r_1e9", "lambda_400_digits"],
)
def test_astronomic_ranks_are_refused_by_rules(config, msg):
  with pytest.raises(ValueError, match=msg):
    delora_jax.peft.rules({"target_modules": ["lin0"], **config}, _params(), module_names=NAMES)


def test_deeply_nested_configs_are_a_value_error(tmp_path):
  deep = tmp_path / "adapter_config.json"
  deep.write_text('{"target_modules": ' + "[" * 100_000 + "]" * 100_000 + "}")
  nested = current = {}
  for _ in range(100_000):
    current["x"] = {}
    current = current["x"]
  for call in (
    lambda: delora_jax.peft.rules(deep, _params(), module_names=NAMES),
    lambda: delora_jax.peft.trainable(deep, _params(), module_names=NAMES),
    lambda: delora_jax.peft.rules({"target_modules": ["lin0"], "x": nested}, _params(), module_names=NAMES),
  ):
    with pytest.raises(ValueError, match=r"unreadable \(RecursionError|nests its values too deeply"):
      call()
  _, folder = _folder(tmp_path)
  (tmp_path / "adapter" / "adapter_config.json").write_text(deep.read_text())
  with pytest.raises(ValueError, match=r"peft.load: the adapter files .* are unreadable \(RecursionError"):
    delora_jax.peft.load(folder, _params(), module_names=NAMES)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_adapters_load_back_from_their_own_export(tmp_path, dtype):
  rules = {"lin0/kernel": delora_jax.Rule(4, dtype=dtype, init="random")}
  tree = delora_jax.wrap(_params(), rules)
  folder = delora_jax.peft.export(tree, tmp_path / "a", module_names=NAMES)
  back = delora_jax.peft.load(folder, tree, module_names=NAMES)  # same tree: bit for bit
  for f in ("a", "b", "lam", "w_norm"):
    got, want = getattr(back["lin0"]["kernel"], f), getattr(tree["lin0"]["kernel"], f)
    assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want)), f
  plain = delora_jax.peft.load(folder, _params(), module_names=NAMES)  # float32 adapters, same values
  np.testing.assert_array_equal(plain["lin0"]["kernel"].w_norm, np.asarray(tree["lin0"]["kernel"].w_norm, np.float32))
  other = {**_params(), "lin0": {"kernel": _params()["lin0"]["kernel"].at[2].multiply(1.02)}}
  with pytest.raises(ValueError, match=r"lin0/kernel: the base kernel differs .* in 1 of 8 entries .* tolerance"):
    delora_jax.peft.load(folder, other, module_names=NAMES)  # a row 2% off: more than one ulp of the dtype


def test_load_adapters_refuses_nonfinite_or_int_adapters_by_name(tmp_path):
  tree = delora_jax.wrap(_params(), {"lin0/kernel": delora_jax.Rule(4, init="random")})
  ads = delora_jax.adapters(tree)
  ads["lin0/kernel"]["b"] = ads["lin0/kernel"]["b"].at[0, 1].set(jnp.inf)
  path = delora_jax.save_adapters(tmp_path / "ckpt", delora_jax.with_adapters(tree, ads))
  with pytest.raises(ValueError, match=r"lin0/kernel: `b` in the checkpoint .* has 1 NaN or inf entries of 24"):
    delora_jax.load_adapters(path, tree)
  ok = delora_jax.save_adapters(tmp_path / "ok", tree)
  delora_jax.load_adapters(ok, tree)
  meta_file = next((tmp_path / "ok" / "delora_meta").glob("metadata*"))
  meta = json.loads(meta_file.read_text())
  meta["kernels"]["lin0/kernel"]["fields"]["a"]["dtype"] = "int32"
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(
    ValueError, match=r"lin0/kernel.*a.*int32\(8, 4\) in the checkpoint, float32\(8, 4\) in the target"
  ):
    delora_jax.load_adapters(ok, tree)
