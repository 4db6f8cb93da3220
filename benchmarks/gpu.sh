#!/usr/bin/env bash
# The one GPU check (no network, random weights, < 5 min on one GPU): the `gpu` tests, then
# bench_step.py for the paper backbones (RN101, ViT-B-16) at 416 px, batch 32, bf16, then
# `cmmasksd plan` for the same step (its memory estimate against bench_step's
# torch.cuda.max_memory_allocated), then one JSON summary on stdout (and in $OUT/summary.json).
#
#   benchmarks/gpu.sh                          # on a GPU machine
#   benchmarks/gpu.sh --device cpu --tiny      # the script itself on a CPU: tiny configs at 96 px
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/cmmasksd-gpu}
DEVICE=cuda
MODELS="cris-rn101 cris-vit-b-16"
PROFILES="paper-refcoco-rn101 paper-refcoco-vit-b-16"  # the same models, for the plan
SIZE=416 BATCH=32 STEPS=10
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) MODELS="cris-tiny-rn cris-tiny-vit"; PROFILES="debug debug"; SIZE=96 BATCH=8 STEPS=3; shift ;;
    *) echo "error: unknown argument $1 (expected --device DEVICE, --tiny)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
AMP=--amp
[ "$DEVICE" = cpu ] && AMP=""  # bf16 autocast on a CPU only pays with avx512_bf16

if [ "$DEVICE" = cuda ]; then
  "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider | tail -3 | tee "$OUT/gpu_tests.txt"
else
  echo "gpu tests: not run (device $DEVICE)" | tee "$OUT/gpu_tests.txt"
fi
for model in $MODELS; do
  "$PY" benchmarks/bench_step.py --model "$model" --size "$SIZE" --batch "$BATCH" --steps "$STEPS" \
    --device "$DEVICE" $AMP --json "$OUT/$model.json"
done
set -- $PROFILES
for model in $MODELS; do  # bench_step's `both` step: the default masks, the profile's model, batch $BATCH
  "$PY" -m cmmasksd.cli plan --config "$1" --size "$SIZE" --set optim.batch_size="$BATCH" \
    --set "model=$model" --set masksd.scorer=frozen --set masksd.centre=true --set masksd.fill=median \
    --json "$OUT/plan-$model.json" > /dev/null
  shift
done
"$PY" - "$OUT" $MODELS <<'PYTHON'
import json, sys
from pathlib import Path

out, models = Path(sys.argv[1]), sys.argv[2:]
summary = {"tests": (out / "gpu_tests.txt").read_text().strip().splitlines()[-1]}
for model in models:
    result = json.loads((out / f"{model}.json").read_text())
    steps = {row["variant"]: row for row in result["steps"]}
    plan = json.loads((out / f"plan-{model}.json").read_text())
    estimate_mb = plan["memory"][plan["precision"]]["plain"]["total"] * 1024
    measured_mb = steps["both"].get("peak_mem_mb")
    summary[model] = {
        "plan_estimate_mb": round(estimate_mb),
        "measured_peak_mb": measured_mb and round(measured_mb),
        "plan_ratio": measured_mb and round(estimate_mb / measured_mb, 3),
        "device": result["machine"]["device"],
        "step_s": {name: round(row["step_s"], 4) for name, row in steps.items()},
        "time_ratio_to_cris": {name: round(row["time_ratio"], 3) for name, row in steps.items()},
        "flop_ratio_to_cris": {name: round(row["flop_ratio"], 3) for name, row in steps.items()},
        "mfu": {name: row.get("mfu") for name, row in steps.items()},
        "eval_expressions_per_s": round(result["eval"]["expressions_per_s"], 1),
    }
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PYTHON
