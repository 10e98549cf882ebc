#!/usr/bin/env bash
# The full GPU profile of `python -m bench`, in one call on a lent GPU machine (a device session's `run`):
#
#     run(command="bash bench/gpu_check.sh", timeout_s=600)
#
# Writes under $OUT (the folder that comes back; bench/results/ when OUT is unset), all stamped alike:
#   bench-<stamp>.json  every figure, rewritten after each case (a run cut short still leaves its cases)
#   bench-<stamp>.log   the terminal output; the summary table is printed last, so the reply's tail shows it
#   bench-<stamp>.png   step throughput vs d_sae (if matplotlib is there; else, after fetching:
#                       python -m bench --replot bench-<stamp>.json --plot bench-<stamp>.png)
#   env-<stamp>.txt     GPU state before the run (read-only nvidia-smi queries) and library versions
# and copies them into bench/results/ of the device's checkout, which does not come back: copy the fetched
# files into bench/results/ here. Extra arguments go to `python -m bench` (e.g. --case 'step/*').
# BENCH_MINUTES (default 8) bounds the time after which no new case starts, inside the 10-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
stamp="$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$out" bench/results
export PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --format=csv \
        --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu
    "${PYTHON:-python3}" -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, triton.__version__, transformers.__version__)"
} > "$out/env-$stamp.txt" 2>&1
"${PYTHON:-python3}" -m bench --json "$out/bench-$stamp.json" --plot "$out/bench-$stamp.png" \
    --max-minutes "${BENCH_MINUTES:-8}" "$@" 2>&1 | tee "$out/bench-$stamp.log"
status=${PIPESTATUS[0]}
if [ "$out" != bench/results ]; then
    cp "$out"/*-"$stamp".* bench/results/ 2>/dev/null || true
fi
exit "$status"
