#!/usr/bin/env bash
# delora_jax vs PEFT on one GPU, in one call: our bench.py (1B Llama, bf16, batch 4, seq 1024)
# then the PEFT anchor benchmarks/peer_peft_torch.py 1b 4 1024. Both JSONs go to $OUT
# (default benchmarks/out). Run from anywhere:  bash benchmarks/gpu_compare.sh
#
# DELORA_BENCH_SMOKE=1 runs the tiny config instead (seconds, works on a CPU) and skips the
# PEFT anchor, saying why; use it to check the wrapper without a GPU.
# Extra arguments are passed to bench.py (e.g. --modes lora,delora --steps 20);
# PEER_PEFT_TORCH=/path/to/peer_peft_torch.py to use another anchor than benchmarks/peer_peft_torch.py.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$repo/benchmarks/out}"
mkdir -p "$out"
py="${PYTHON:-python}"

if [[ "${DELORA_BENCH_SMOKE:-0}" == 1 ]]; then
  size=tiny
  "$py" "$repo/benchmarks/bench.py" --config tiny --batch 2 --seq 32 --steps 1 --warmup 0 \
    --out "$out/delora_jax_tiny.json" "$@"
else
  size=1b
  "$py" "$repo/benchmarks/bench.py" --config 1b --dtype bfloat16 --batch 4 --seq 1024 --scan \
    --steps 10 --warmup 3 --out "$out/delora_jax_1b.json" "$@"
fi

peer=""
for cand in ${PEER_PEFT_TORCH:-} "$repo/benchmarks/peer_peft_torch.py"; do
  if [[ -f "$cand" ]]; then peer="$cand"; break; fi
done
if [[ -z "$peer" ]]; then
  echo "gpu_compare: PEFT anchor not found (benchmarks/peer_peft_torch.py); skipped." >&2
elif ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_compare: torch sees no CUDA device; skipped the PEFT anchor (it needs a GPU)." >&2
elif [[ "$size" == tiny ]]; then
  echo "gpu_compare: smoke mode; skipped the PEFT anchor (it only runs the 1b config)." >&2
else
  # The anchor writes $OUT/peer_1b.json itself.
  OUT="$out" "$py" "$peer" 1b 4 1024
fi
echo "gpu_compare: results in $out (delora_jax_$size.json$([[ -f "$out/peer_1b.json" ]] && echo ', peer_1b.json'))"
