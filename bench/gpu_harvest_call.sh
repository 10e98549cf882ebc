#!/usr/bin/env bash
# Issue 13's GPU check in one call on a lent GPU machine (a device session's `run`), under 7 minutes on an H100:
#
#     run(command="SAEKIT_COMMIT=<commit> bash bench/gpu_harvest_call.sh", timeout_s=540)
#
# The three bounds add up to 400 s, under 7 minutes with the environment step:
# 1. tests/gpu/test_ring_cuda.py: the ring buffer's streams, with the overlap on, deliver every harvested token
#    exactly once (checksums equal) under a slow consumer, a slow producer and a rewind, and each wait knocked
#    out in turn is seen (~1 min; bounded by RING_TIMEOUT_S, default 100 s).
# 2. python -m bench --case 'harvest/gemma2-2b/*': the bare truncated forward, the harvester, the harvester
#    feeding the SAE's training step (Gemma-2-2B-shaped random weights, layer 20, context 1024, bf16, random
#    token rows: no hub, no `datasets`), each checked before it is timed (bounded by BENCH_TIMEOUT_S, default
#    190 s; no new case after BENCH_MINUTES, default 2.5).
# 3. python -m bench --case 'sweep/gemma2-2b/*': the bare forward again (the baseline of this run) and the
#    Salmon sweep, 12 SAEs (d_sae 16384 and 65536 x target L0 20 ... 640, batch 2048) trained by sae.sweep.Sweep
#    from one harvest of the same model, checked (8 steps: every member finite, fed the same batch, pulled
#    toward its own target) before it is timed; then one line: its tokens/s over the bare forward's and the
#    projected hours of the paper's 49M tokens per SAE (bounded by SWEEP_TIMEOUT_S, default 110 s; no new case
#    after SWEEP_MINUTES, default 1.5).
# Writes under $OUT (bench/results when unset), all stamped alike:
#   env-<stamp>.txt          GPU (read-only nvidia-smi queries), library versions, commit ($SAEKIT_COMMIT, else git)
#   ring-<stamp>.log / .xml  the ring test's output and its JUnit report
#   harvest-<stamp>.log      the bench's output (its summary table last, so a reply's tail shows it)
#   harvest-<stamp>.json     every bench figure, rewritten after each case (a run cut short keeps its cases)
#   sweep-<stamp>.log / .json  the same for the sweep stage
# Copy the fetched files into bench/results/ to commit them. The exit status is the first failing step's.
# On the CPU, the same script with tiny sizes (the ring test skips itself without CUDA):
#     HARVEST_SIZE=tiny OUT=/tmp/harvest bash bench/gpu_harvest_call.sh
# Extra arguments go to `python -m bench` (e.g. --repeat-s 0.5).
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${OUT:-bench/results}"
size="${HARVEST_SIZE:-gemma2-2b}"
stamp="$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$out"
unset TRITON_INTERPRET  # the kernels compile for the device
export PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
    echo "commit ${SAEKIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --format=csv --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
        2>&1 || echo "no nvidia-smi"
    "$py" -c "import sys, torch, triton, transformers, tokenizers, numpy
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
      triton.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'numpy',
      numpy.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} > "$out/env-$stamp.txt" 2>&1
cat "$out/env-$stamp.txt"

timeout "${RING_TIMEOUT_S:-100}" "$py" -m pytest -q -p no:cacheprovider -rs tests/gpu/test_ring_cuda.py \
    --junitxml "$out/ring-$stamp.xml" 2>&1 | tee "$out/ring-$stamp.log"
ring=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT_S:-190}" "$py" -m bench --case "harvest/$size/*" --json "$out/harvest-$stamp.json" \
    --max-minutes "${BENCH_MINUTES:-2.5}" "$@" 2>&1 | tee "$out/harvest-$stamp.log"
bench=${PIPESTATUS[0]}

timeout "${SWEEP_TIMEOUT_S:-110}" "$py" -m bench --case "sweep/$size/*" --json "$out/sweep-$stamp.json" \
    --max-minutes "${SWEEP_MINUTES:-1.5}" "$@" 2>&1 | tee "$out/sweep-$stamp.log"
sweep=${PIPESTATUS[0]}
"$py" - "$out/sweep-$stamp.json" <<'PY' 2>&1 | tee -a "$out/sweep-$stamp.log"
import json, sys
for r in json.load(open(sys.argv[1]))["cases"]:
    if r.get("members") and r.get("status") == "ok":
        print(f"{r['case']}: {r['tokens_per_s']:,.0f} tokens/s through all {r['members']} SAEs, "
              f"{r.get('speedup_vs_reference') or float('nan'):.2f} x the bare forward's; {r['paper_tokens_per_sae'] / 1e6:.0f}M "
              f"tokens per SAE: {r['projected_hours_paper']:.2f} h for the whole sweep")
PY

echo "ring test exit $ring, bench exit $bench, sweep exit $sweep (124: timed out); files in $out: *-$stamp.*"
[ "$ring" -ne 0 ] && exit "$ring"
[ "$bench" -ne 0 ] && exit "$bench"
exit "$sweep"
