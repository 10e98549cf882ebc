#!/usr/bin/env bash
# Issue 13's GPU check in one call on a lent GPU machine (a device session's `run`), under 7 minutes on an H100:
#
#     run(command="SAEKIT_COMMIT=<commit> bash bench/gpu_harvest_call.sh", timeout_s=540)
#
# 1. tests/gpu/test_ring_cuda.py: the ring buffer's streams, with the overlap on, deliver every harvested token
#    exactly once (checksums equal) under a slow consumer, a slow producer and a rewind, and each wait knocked
#    out in turn is seen (~1 min; bounded by RING_TIMEOUT_S, default 150 s).
# 2. python -m bench --case 'harvest/gemma2-2b/*': the bare truncated forward, the harvester, the harvester
#    feeding the SAE's training step (Gemma-2-2B-shaped random weights, layer 20, context 1024, bf16, random
#    token rows: no hub, no `datasets`), each checked before it is timed (bounded by BENCH_TIMEOUT_S, default
#    330 s; no new case after BENCH_MINUTES, default 4).
# Writes under $OUT (bench/results when unset), all stamped alike:
#   env-<stamp>.txt          GPU (read-only nvidia-smi queries), library versions, commit ($SAEKIT_COMMIT, else git)
#   ring-<stamp>.log / .xml  the ring test's output and its JUnit report
#   harvest-<stamp>.log      the bench's output (its summary table last, so a reply's tail shows it)
#   harvest-<stamp>.json     every bench figure, rewritten after each case (a run cut short keeps its cases)
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

timeout "${RING_TIMEOUT_S:-150}" "$py" -m pytest -q -p no:cacheprovider -rs tests/gpu/test_ring_cuda.py \
    --junitxml "$out/ring-$stamp.xml" 2>&1 | tee "$out/ring-$stamp.log"
ring=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT_S:-330}" "$py" -m bench --case "harvest/$size/*" --json "$out/harvest-$stamp.json" \
    --max-minutes "${BENCH_MINUTES:-4}" "$@" 2>&1 | tee "$out/harvest-$stamp.log"
bench=${PIPESTATUS[0]}

echo "ring test exit $ring, bench exit $bench (124: timed out); files in $out: *-$stamp.*"
[ "$ring" -ne 0 ] && exit "$ring"
exit "$bench"
