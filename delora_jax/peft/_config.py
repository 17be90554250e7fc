"""PEFT ``DeloraConfig`` semantics: reading, validating, and which modules it adapts."""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import re2

from delora_jax.peft._names import CONFIG

#: Keys that describe the file, not the adapter: ignoring them cannot change results.
METADATA = (
  "task_type",
  "peft_type",
  "auto_mapping",
  "peft_version",
  "base_model_name_or_path",
  "revision",
  "inference_mode",
)
#: Keys delora_jax reproduces.
SUPPORTED = (
  "r",
  "delora_lambda",
  "module_dropout",
  "target_modules",
  "exclude_modules",
  "bias",
  "init_weights",
  "layers_to_transform",
  "layers_pattern",
  "rank_pattern",
  "lambda_pattern",
  "modules_to_save",
)
DEFAULTS: dict[str, Any] = {
  "r": 8,
  "delora_lambda": 15,
  "module_dropout": 0.0,
  "target_modules": None,
  "exclude_modules": None,
  "bias": "none",
  "init_weights": True,
  "layers_to_transform": None,
  "layers_pattern": None,
  "rank_pattern": {},
  "lambda_pattern": {},
  "modules_to_save": None,
}
BIASES = ("none", "all", "delora_only")
#: The largest ``r`` / ``rank_pattern`` value a config may hold (XLA indexes array dimensions with int32).
MAX_RANK = 2**31 - 1
#: How PEFT runs a ``rank_pattern``/``lambda_pattern`` key, a ``modules_to_save`` name and a
#: ``layers_pattern`` (``{}``: the config's string), here on RE2 (:func:`linear`).
KEY, SAVED, LAYER = r"(.*\.)?({})$", r"(^|.*\.){}($|\..*)", r"(?:^|.*?\.){}\.(?P<idx>\d+)\."
#: PEFT's heads of sequence-classification models, kept out of ``all-linear`` for SEQ_CLS.
SEQ_CLS_HEADS = ("score", "classifier")

#: PEFT 0.21's TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING (``target_modules=None``).
DEFAULT_TARGETS: dict[str, Any] = {
  "t5": ["q", "v"],
  "mt5": ["q", "v"],
  "bart": ["q_proj", "v_proj"],
  "gpt2": ["c_attn"],
  "bloom": ["query_key_value"],
  "blip-2": ["q", "v", "q_proj", "v_proj"],
  "opt": ["q_proj", "v_proj"],
  "gptj": ["q_proj", "v_proj"],
  "gpt_neox": ["query_key_value"],
  "gpt_neo": ["q_proj", "v_proj"],
  "bert": ["query", "value"],
  "roberta": ["query", "value"],
  "xlm-roberta": ["query", "value"],
  "electra": ["query", "value"],
  "deberta-v2": ["query_proj", "value_proj"],
  "deberta": ["in_proj"],
  "layoutlm": ["query", "value"],
  "llama": ["q_proj", "v_proj"],
  "llama4": ["q_proj", "v_proj"],
  "chatglm": ["query_key_value"],
  "gpt_bigcode": ["c_attn"],
  "mpt": ["Wqkv"],
  "RefinedWebModel": ["query_key_value"],
  "RefinedWeb": ["query_key_value"],
  "falcon": ["query_key_value"],
  "btlm": ["c_proj", "c_attn"],
  "codegen": ["qkv_proj"],
  "mistral": ["q_proj", "v_proj"],
  "mixtral": ["q_proj", "v_proj"],
  "stablelm": ["q_proj", "v_proj"],
  "phi": ["q_proj", "v_proj", "fc1", "fc2"],
  "gemma": ["q_proj", "v_proj"],
  "gemma2": ["q_proj", "v_proj"],
  "gemma3_text": ["q_proj", "v_proj"],
  "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
  "qwen2": ["q_proj", "v_proj"],
  "qwen3": ["q_proj", "v_proj"],
  "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
  "rwkv": ["key", "value", "receptance", "output"],
  "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def _plain(x: Any) -> Any:
  """JSON-like copy of a config value (sets -> sorted lists, enums -> their value)."""
  if isinstance(x, (set, frozenset)):
    return sorted(_plain(v) for v in x)
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  value = getattr(x, "value", None)  # PeftType / TaskType enums
  return value if isinstance(value, str) and not isinstance(x, str) else x


def plain(cfg: dict, source: str) -> dict:
  """:func:`_plain` of a whole config; a ValueError (not a RecursionError) for one nested too deeply."""
  try:
    return _plain(cfg)
  except RecursionError:
    raise ValueError(
      f"{source} nests its values too deeply to read; a DeloraConfig's values are numbers, "
      "strings, lists of strings and {pattern: number} objects."
    ) from None


def read(config: Any) -> tuple[dict, str]:
  """``(config dict, where it came from)`` of a folder, a json file, a dict or a DeloraConfig."""
  if isinstance(config, (str, os.PathLike)):
    path = os.path.abspath(os.fspath(config))
    file = os.path.join(path, CONFIG) if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise ValueError(
        f"{file!r} does not exist; `config` must be a PEFT adapter folder, its {CONFIG}, a dict or a peft.DeloraConfig."
      )
    try:
      with open(file) as fh:
        cfg = json.load(fh)
    except (OSError, ValueError, RecursionError) as e:
      raise ValueError(
        f"{file!r} is unreadable ({type(e).__name__}: {e}); write it with "
        "PeftModel.save_pretrained or delora_jax.peft.export."
      ) from e
    source = file
  elif isinstance(config, Mapping):
    cfg, source = dict(config), "the config dict"
  elif callable(getattr(config, "to_dict", None)):
    cfg, source = config.to_dict(), f"the {type(config).__name__}"
  else:
    raise TypeError(
      "`config` must be a PEFT adapter folder, an adapter_config.json path, a dict "
      f"or a peft.DeloraConfig; got {type(config).__name__}."
    )
  if not isinstance(cfg, Mapping):
    raise ValueError(f"{source} holds a {type(cfg).__name__}, expected a JSON object of DeloraConfig fields.")
  return check(plain(dict(cfg), source), source), source


def _bad(source: str, key: str, want: str, got: Any, fix: str = "") -> ValueError:
  return ValueError(f"{source}: `{key}` must be {want}; got {got!r}.{' ' + fix if fix else ''}")


_RE2 = re2.Options()
_RE2.log_errors = False


@functools.lru_cache(maxsize=4096)
def _compiled(regex: str) -> Any:
  return re2.compile(regex, _RE2)


def linear(regex: str, source: str = "", key: str = "", shown: str | None = None) -> Any:
  """``regex`` compiled by RE2, which matches in time linear in the module name.

  Config patterns come from downloaded files, and Python's ``re`` (which PEFT
  uses) backtracks: ``(.|.)*Z`` takes ~2^n steps on an n-character name. RE2
  reads Python's syntax the same way, except for what it refuses (a
  ``ValueError`` naming ``source``, ``key`` and the pattern ``shown``) and two
  constructs it reads differently, ``{,n}`` and ``[:name:]``, refused too.
  """
  if "{," in regex or "[:" in regex:
    why = "RE2 reads `{,n}` and `[:name:]` differently from Python's re"
  else:
    try:
      return _compiled(regex)
    except re2.error as e:
      why = f"RE2 cannot compile it ({e.args[0].decode() if isinstance(e.args[0], bytes) else e})"
  raise ValueError(
    f"{source}: `{key}` holds the regex {shown or regex!r}, which delora_jax refuses: {why}. "
    "Config patterns run on RE2 so that a downloaded config cannot hang the loader (Python's re, and PEFT, can "
    "take exponential time); RE2 has no backreferences, lookaround ((?=, (?!, (?<=, (?<!), atomic groups, "
    "possessive repeats (a++), \\Z (write $) or repeats over 1000. Rewrite the pattern without them (write "
    "{0,n} for {,n}, and \\: for a ':' after '['), or list the module names instead."
  )


def _regex(source: str, key: str, pattern: Any, template: str = "{}") -> None:
  """Checks a config regex, run as ``template`` with the pattern in place of ``{}``."""
  if not isinstance(pattern, str):
    raise _bad(source, key, "a regex string", pattern)
  regex = template.replace("{}", pattern)
  try:
    if "{," not in regex and "[:" not in regex:  # those are refused below (Python warns on "[:")
      re.compile(regex)
  except re.error as e:
    raise ValueError(
      f"{source}: `{key}` holds {pattern!r}, which is not a valid regular "
      f"expression ({e}). Fix the pattern (PEFT would fail on it too)."
    ) from None
  linear(regex, source, key, pattern)


def _names(source: str, key: str, value: Any, *, regex_ok: bool = True, template: str | None = None) -> None:
  """Checks a module list; a str is a regex (``regex_ok``), a list holds regexes run as ``template``."""
  if value is None:
    return
  if isinstance(value, str):
    if regex_ok and value != "all-linear":
      _regex(source, key, value, template or "{}")
    return
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise _bad(source, key, "null, a regex string or a list of module names", value)
  for i, v in enumerate(value):
    if template:
      _regex(source, f"{key}[{i}]", v, template)


def _number(source: str, key: str, value: Any, *, integer: bool = False) -> None:
  # finite, and no OverflowError from float() of a 400-digit JSON integer
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300
  if ok and integer:
    ok = 0 < value <= MAX_RANK and float(value).is_integer()
  if not ok:
    want = "a positive integer" if integer else "a finite number"
    fix = f'Write e.g. "{key}": 8 (at most {MAX_RANK}).' if integer else f'Write e.g. "{key}": 15.'
    raise _bad(source, key, want, value, fix)


def check(cfg: dict, source: str) -> dict:
  """``cfg`` with defaults filled in; a ``ValueError`` naming ``source`` and the key if malformed."""
  if cfg.get("peft_type", "DELORA") != "DELORA":
    raise ValueError(
      f"{source} has peft_type {cfg.get('peft_type')!r}, expected 'DELORA'. Only "
      "PEFT DeLoRA adapters (peft.DeloraConfig) can be read as DeLoRA."
    )
  unknown = sorted(k for k in cfg if k not in METADATA and k not in SUPPORTED)
  if unknown:
    raise ValueError(
      f"{source} has keys delora_jax does not support: {unknown}. They are not "
      "DeloraConfig fields of PEFT 0.21, so whether ignoring them changes results "
      "is unknown; remove them if they are yours and do not affect the adapter."
    )
  cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k in METADATA}}
  _number(source, "r", cfg["r"], integer=True)
  _number(source, "delora_lambda", cfg["delora_lambda"])
  _number(source, "module_dropout", cfg["module_dropout"])
  if not 0.0 <= cfg["module_dropout"] < 1.0:
    raise _bad(source, "module_dropout", "a probability in [0, 1)", cfg["module_dropout"])
  _names(source, "target_modules", cfg["target_modules"])
  _names(source, "exclude_modules", cfg["exclude_modules"])
  _names(source, "modules_to_save", cfg["modules_to_save"], regex_ok=False, template=SAVED)
  if isinstance(cfg["modules_to_save"], str):
    raise _bad(source, "modules_to_save", "null or a list of module names", cfg["modules_to_save"])
  if cfg["bias"] not in BIASES:
    raise _bad(source, "bias", f"one of {BIASES}", cfg["bias"])
  if not isinstance(cfg["init_weights"], bool):
    raise _bad(source, "init_weights", "true or false (DeLoRA has no other initialisation)", cfg["init_weights"])
  _check_layers(cfg, source)
  _check_patterns(cfg, source)
  cfg["r"] = int(cfg["r"])
  cfg["rank_pattern"] = {k: int(v) for k, v in cfg["rank_pattern"].items()}
  return cfg


def _check_layers(cfg: dict, source: str) -> None:
  layers = cfg["layers_to_transform"]
  if (
    layers is not None
    and not (isinstance(layers, int) and not isinstance(layers, bool))
    and not (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
  ):
    raise _bad(source, "layers_to_transform", "null, a layer index or a list of them", layers)
  _names(source, "layers_pattern", cfg["layers_pattern"], template=LAYER)
  if isinstance(cfg["target_modules"], str) and layers is not None:
    raise ValueError(
      f"{source}: `layers_to_transform` cannot be used with a regex string "
      "`target_modules` (PEFT refuses it too); give a list of module names."
    )
  if cfg["layers_pattern"] and layers is None:
    raise ValueError(
      f"{source}: `layers_pattern` is set but `layers_to_transform` is not; set both or neither (PEFT refuses it too)."
    )


def _check_patterns(cfg: dict, source: str) -> None:
  for key, integer in (("rank_pattern", True), ("lambda_pattern", False)):
    if not isinstance(cfg[key], Mapping):
      raise _bad(
        source,
        key,
        "an object {module regex: value}",
        cfg[key],
        f'Write e.g. "{key}": {{"q_proj": {8 if integer else 15}}}.',
      )
    for pat, value in cfg[key].items():
      _regex(source, f"{key}[{pat!r}]", pat, KEY)
      _number(source, f"{key}[{pat!r}]", value, integer=integer)


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
  """The value PEFT picks for module ``name``: the first key with ``(.*\\.)?(key)$`` matching."""
  for key, value in patterns.items():
    if linear(KEY.replace("{}", key)).match(name):
      return value
  return default


def _listed(names: list[str], name: str) -> bool:
  return name in names or any(name.endswith("." + n) for n in names)


def _layer_index(cfg: dict, name: str) -> int | None:
  patterns = cfg["layers_pattern"]
  if not patterns:
    m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
  else:
    m = None
    for p in [patterns] if isinstance(patterns, str) else patterns:
      if m := linear(LAYER.replace("{}", p)).match(name):
        break
  return int(m.group("idx")) if m else None


def targeted(cfg: dict, name: str, targets: Any) -> bool:
  """Whether PEFT adapts module ``name`` (``targets``: the resolved ``target_modules``)."""
  ex = cfg["exclude_modules"]
  if ex and (linear(ex).fullmatch(name) if isinstance(ex, str) else _listed(ex, name)):
    return False
  if cfg["modules_to_save"] and any(linear(SAVED.replace("{}", m)).match(name) for m in cfg["modules_to_save"]):
    return False
  if isinstance(targets, str):
    return linear(targets).fullmatch(name) is not None
  if name in targets:
    return True
  if not any(name.endswith("." + t) for t in targets):
    return False
  layers = cfg["layers_to_transform"]
  if layers is None or layers == []:
    return True
  index = _layer_index(cfg, name)
  if index is None:
    return False
  return index == layers if isinstance(layers, int) else index in layers


def resolve_targets(cfg: dict, source: str, names: list[str], model_type: str | None) -> Any:
  """``target_modules`` made concrete: ``all-linear`` and ``None`` resolved."""
  targets = cfg["target_modules"]
  if isinstance(targets, str) and targets.lower() == "all-linear":
    heads = {"lm_head"} | (set(SEQ_CLS_HEADS) if cfg.get("task_type") == "SEQ_CLS" else set())
    return sorted(n for n in names if n not in heads)
  if targets is None:
    if model_type not in DEFAULT_TARGETS:
      raise ValueError(
        f"{source}: `target_modules` is null, so PEFT would pick its defaults for "
        f"the model's architecture; pass model_type= (one of "
        f"{sorted(DEFAULT_TARGETS)[:6]}...; got {model_type!r}) or set "
        "target_modules in the config."
      )
    targets = DEFAULT_TARGETS[model_type]
  return targets
