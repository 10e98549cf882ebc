#!/usr/bin/env bash
# Issue 12's first GPU call: compiled equivalence of every kernel first, then the step against the dense reference at
# 65k latents, the fused encode against a plain bf16 GEMM, the step at 2^20 (and the widest dense reference, 262k),
# peak memory and the targets; each stage under its own time bound, about 7 minutes in all on an H100:
#
#     run(command="COMMIT=<hash> bash bench/gpu_first_call.sh", timeout_s=540)
#
# Stages, bounds and outputs: bench/first_call.py. Everything lands in $OUT (bench/results/first-call when unset):
# first-call.log (this output), env.txt, pytest.xml, bench.json (the bench stages merged), static.json. Copy them to
# bench/results/ here after fetching. Runs the checkout as it is (PYTHONPATH=. first, no install); the interpreter is
# ${PYTHON:-python3}. Extra arguments go to bench/first_call.py, e.g. --only bc, or a rehearsal on a CPU:
#
#     PYTHON=.venv/bin/python OUT=/tmp/first-call bash bench/gpu_first_call.sh --tiny
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/first-call}"
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CI=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET  # compiled kernels on the GPU; on a CPU (--tiny) the bench and the tests switch it on
"${PYTHON:-python3}" -m bench.first_call --out "$out" "$@" 2>&1 | tee "$out/first-call.log"
exit "${PIPESTATUS[0]}"
