#!/usr/bin/env bash
# The GPU suite: the GPU tests and every GPU benchmark, merged into one JSON and one markdown table of goals.
#
#   bash benchmarks/gpu_suite.sh [--out DIR] [--dry-run] [--only PART,PART...]
#
# Parts, in this order, each stopped at its own cap (`timeout`); on one H100/H200 the caps add up to 8 minutes:
#   tests                pytest -rs tests/gpu                                                      CAP_TESTS=90
#   dequant              bench_dequant.py: 7B-layer shapes, torch / bnb / triton vs a copy          CAP_DEQUANT=20
#   matmul               bench_matmul.py: M = 1, 16, 512, 4096; forward and input gradient          CAP_MATMUL=60
#   train_smollm2-135m   bench_train_step.py: ours vs PEFT + bnb, time and CUDA max allocated      CAP_TRAIN=55
#   train_gemma3-270m    the same for Gemma-3-270M                                                  CAP_TRAIN_BIG=70
#   sst2                 examples/sst2.py --device cuda: the main job, its wall time and accuracy   CAP_SST2=180
# The models' one-time GGUF conversion runs beside the tests. Then benchmarks/gpu_report.py writes
# OUT/gpu_suite.json and OUT/gpu_suite.md (default OUT: benchmarks/results/gpu_suite); logs in OUT/logs/PART.log.
#
# --dry-run: the same parts on this CPU at tiny sizes (TRITON_INTERPRET=1, --device cpu, a 2-layer stand-in model,
# 1-2 steps, the SST-2 job on 16 rows). It checks the plumbing end to end in about 2 minutes; its numbers mean
# nothing. --only runs a subset (e.g. --only dequant,matmul) and still writes the report.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
OUT=benchmarks/results/gpu_suite
DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --only) ONLY=",$2,"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (use --out DIR, --dry-run, --only PART,...)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT/logs" && OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/parts.jsonl "$OUT"/tests.xml "$OUT"/dequant.json "$OUT"/matmul.json "$OUT"/train_*.json
rm -rf "$OUT/sst2"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1

# part NAME CAP_SECONDS COMMAND...: runs COMMAND under `timeout`, logs it, appends a line to parts.jsonl.
part() {
  local name=$1 cap=$2
  shift 2
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then return 0; fi
  echo "=== $name (cap ${cap} s): $*"
  local start rc seconds
  start=$(date +%s%N)
  timeout -k 10 "$cap" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  seconds=$(( ($(date +%s%N) - start) / 1000000 ))
  "$PY" -c 'import json, sys; n, rc, ms, cap, *cmd = sys.argv[1:]; print(json.dumps({"part": n, "rc": int(rc),
    "seconds": int(ms) / 1000, "cap_s": int(cap), "command": cmd}))' "$name" "$rc" "$seconds" "$cap" "$@" \
    >>"$OUT/parts.jsonl"
  tail -n 3 "$OUT/logs/$name.log" | sed 's/^/    /'
  echo "    -> exit $rc after $(( seconds / 1000 )) s"
}

SHAPES="4096x4096 4096x11008 11008x4096"
if [ "$DRY" = 1 ]; then
  TINY="$OUT/tiny-llama"
  if [ -z "$ONLY" ] || [[ "$ONLY" == *",train_tiny,"* ]] || [[ "$ONLY" == *",sst2,"* ]]; then
    [ -f "$TINY/config.json" ] || timeout 120 "$PY" benchmarks/make_tiny_model.py "$TINY" \
      >"$OUT/logs/tiny_model.log" 2>&1 || { echo "could not build the stand-in model: see $OUT/logs/tiny_model.log" >&2
                                            exit 1; }
  fi
  part tests 120 "$PY" -m pytest -rs -q -p no:cacheprovider tests/gpu --junitxml="$OUT/tests.xml"
  part dequant 120 env TRITON_INTERPRET=1 "$PY" benchmarks/bench_dequant.py --device cpu --shapes 128x256 \
    --copy-mb 8 --out "$OUT/dequant"
  part matmul 120 env TRITON_INTERPRET=1 "$PY" benchmarks/bench_matmul.py --device cpu --shapes 32x64 --m 1 16 512 \
    --copy-mb 8 --out "$OUT/matmul"
  part train_tiny 150 "$PY" benchmarks/bench_train_step.py --device cpu --model "$TINY" --sides peer ours \
    --batch-size 1 --seq-len 16 --steps 1 --warmup 0 --wait-idle 0 --threads 2 --out "$OUT/train_tiny"
  part sst2 150 "$PY" examples/sst2.py --device cpu --model "$TINY" --limit 16 --max-steps 2 --out "$OUT/sst2"
  "$PY" benchmarks/gpu_report.py "$OUT" --dry-run
else
  # The models' one-time GGUF -> HF conversion (CPU work, cached) runs beside the GPU tests, not inside the
  # training-step parts' caps.
  timeout 150 "$PY" -c 'from train.models import resolve; [resolve(m) for m in ("smollm2-135m", "gemma3-270m")]' \
    >"$OUT/logs/convert_models.log" 2>&1 &
  convert=$!
  part tests "${CAP_TESTS:-90}" "$PY" -m pytest -rs -q -p no:cacheprovider tests/gpu --junitxml="$OUT/tests.xml"
  part dequant "${CAP_DEQUANT:-20}" "$PY" benchmarks/bench_dequant.py --device cuda --shapes $SHAPES \
    --out "$OUT/dequant"
  part matmul "${CAP_MATMUL:-60}" "$PY" benchmarks/bench_matmul.py --device cuda --shapes $SHAPES \
    --m 1 16 512 4096 --out "$OUT/matmul"
  wait "$convert" || echo "model conversion failed or timed out: see $OUT/logs/convert_models.log"
  for model in smollm2-135m gemma3-270m; do
    cap=${CAP_TRAIN:-55}
    [ "$model" = gemma3-270m ] && cap=${CAP_TRAIN_BIG:-70}
    part "train_$model" "$cap" "$PY" benchmarks/bench_train_step.py --device cuda --model "$model" \
      --sides peer ours --batch-size 16 --seq-len 256 --steps 8 --warmup 2 --wait-idle 0 --out "$OUT/train_$model"
  done
  part sst2 "${CAP_SST2:-180}" "$PY" examples/sst2.py --device cuda --out "$OUT/sst2"
  "$PY" benchmarks/gpu_report.py "$OUT"
fi
