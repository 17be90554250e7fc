"""Collectives of a compiled XLA program, read from its HLO text (``compiled.as_text()``).

Each collective instruction is counted as many times as it runs: an instruction
in a ``while`` body (``nn.scan``, ``lax.scan``) counts the loop's trip count
(``known_trip_count`` in its ``backend_config``) times, nested loops multiply,
other called computations (fusions, calls, conditional branches) count once
per call site. A loop without a known trip count counts once and is reported.

Bytes of one instruction: per device, the larger of its operands' and its
result's sizes, i.e. the gathered buffer of an ``all-gather``, the buffer that
is reduced (before scattering) of a ``reduce-scatter``, the buffer of an
``all-reduce``, ``all-to-all`` or ``collective-permute``. Asynchronous forms
(``*-start``) are counted, their ``*-done`` halves not; a start's result tuple
that repeats the operands is counted for its outputs only.
"""

from __future__ import annotations

import collections
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(
  r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)="
  r"%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s4": 1,
  "u4": 1,
}


def shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  """``[(dtype, dims)]`` of every array type written in ``text``."""
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(text) if dt in _BYTES]


def nbytes(arrays) -> int:
  total = 0
  for dt, dims in arrays:
    n = 1
    for d in dims:
      n *= d
    total += n * _BYTES[dt]
  return total


def _operands(line: str, start: int) -> str:
  """The text inside the parentheses that open at ``line[start - 1]``."""
  depth = 1
  for i in range(start, len(line)):
    depth += {"(": 1, ")": -1}.get(line[i], 0)
    if depth == 0:
      return line[start:i]
  return line[start:]


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """``{name: instruction lines}`` of every computation, and the entry's name."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and not line[:1].isspace():
        current = m.group(2)
        comps[current] = [line]  # the header: parameter types
        if m.group(1):
          entry = current
    elif line.rstrip() == "}":
      current = None
    else:
      comps[current].append(line)
  if entry is None:
    raise ValueError("hlo_collectives: no ENTRY computation in the HLO text.")
  return comps, entry


def _types(lines: list[str]) -> dict[str, list]:
  """``{instruction or parameter name: its arrays}`` within one computation."""
  out = {}
  header = lines[0][: lines[0].rfind("->")]
  for name, ty in re.findall(r"([\w.\-]+): ((?:\([^()]*\))|[^,()]+)", header):
    out[name] = shapes(ty)
  for line in lines[1:]:
    m = _NAME.match(line)
    if m:
      rest = line[m.end() :]
      out[m.group(1)] = shapes(rest[: _type_end(rest)])
  return out


def _type_end(rest: str) -> int:
  """Where the result type that starts ``rest`` ends (a tuple type is parenthesised)."""
  rest_s = rest.lstrip()
  off = len(rest) - len(rest_s)
  if rest_s.startswith("("):
    depth = 0
    for i, ch in enumerate(rest_s):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return off + i + 1
  return off + (rest_s.find(" ") if " " in rest_s else len(rest_s))


def _multiplicities(comps: dict[str, list[str]], entry: str) -> tuple[dict[str, int], list[str]]:
  """How many times each computation runs per step, and the loops of unknown trip count."""
  edges = collections.defaultdict(list)
  unknown = []
  for name, lines in comps.items():
    for line in lines[1:]:
      trip = 1
      if re.search(r"\swhile\(", line):
        m = _TRIP.search(line)
        if m:
          trip = int(m.group(1))
        else:
          unknown.append(_NAME.match(line).group(1))
      called = _CALLS.findall(line)
      for b in _BRANCHES.findall(line):
        called += [c.strip().lstrip("%") for c in b.split(",")]
      for c in called:
        edges[name].append((c, trip if re.search(r"body=%?" + re.escape(c) + r"\b", line) else 1))
  mult = collections.Counter()

  def visit(name, times):
    mult[name] += times
    for child, factor in edges.get(name, ()):
      if child in comps:
        visit(child, times * factor)

  visit(entry, 1)
  return dict(mult), unknown


def collectives(hlo: str) -> dict:
  """``{"ops": [...], "by_kind": {kind: {"count", "bytes"}}, "unknown_trip_loops": [...]}``.

  ``ops`` lists every collective instruction: its kind, result arrays
  ``[(dtype, dims)]``, operand arrays, bytes per execution and ``times`` (runs
  per step); ``by_kind`` sums ``times`` and ``times * bytes`` over them.
  """
  comps, entry = _computations(hlo)
  mult, unknown = _multiplicities(comps, entry)
  ops = []
  for name, lines in comps.items():
    times = mult.get(name, 0)
    types = None
    for line in lines[1:]:
      m = _OP.search(line)
      if not m or not times:
        continue
      types = types if types is not None else _types(lines)
      names = re.findall(r"%?([\w.\-]+)", _operands(line, m.end()))
      operands = [a for n in names for a in types.get(n, [])]
      result = shapes(m.group(1))
      if m.group(3) and result[: len(operands)] == operands and len(result) > len(operands):
        result = result[len(operands) :]  # async start: (operands..., outputs...)
      ops.append(
        dict(
          kind=m.group(2), result=result, operands=operands, bytes=max(nbytes(result), nbytes(operands)), times=times
        )
      )
  by_kind = {k: {"count": 0, "bytes": 0} for k in KINDS}
  for op in ops:
    by_kind[op["kind"]]["count"] += op["times"]
    by_kind[op["kind"]]["bytes"] += op["times"] * op["bytes"]
  return dict(ops=ops, by_kind=by_kind, unknown_trip_loops=unknown)
