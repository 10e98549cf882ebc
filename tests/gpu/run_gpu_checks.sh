#!/usr/bin/env bash
# The whole GPU check in one call, from the repository root of a checkout on a machine with a CUDA GPU:
#
#     bash tests/gpu/run_gpu_checks.sh            (extra arguments go to pytest, e.g. -x or -k bf16)
#
# It runs the kernels compiled for the device (never the interpreter) in fp32 and bf16 against the reference:
# tests/gpu (H100 tiles, bf16 equivalence and bounds), and the device-agnostic kernel tests, which on a GPU
# run compiled too: outputs and every gradient on odd shapes with NaN-poisoned buffers, the Hypothesis
# properties, the compute_dtype tests (fp16 and bf16), and the sparse train step against the dense reference
# step (fp32 trajectory; fp16 and bf16 forked steps). Needs torch, triton, pytest, hypothesis, numpy; no
# `datasets`, no install: the checkout runs with PYTHONPATH=.
set -euo pipefail
cd "$(dirname "$0")/../.."
unset TRITON_INTERPRET
export PYTHONPATH=. CI=true
"${PYTHON:-python3}" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider -rs \
    tests/gpu tests/test_kernels.py tests/test_kernels_properties.py tests/test_kernels_mixed.py \
    tests/test_sparse_step.py tests/test_sparse_adam.py tests/test_reference.py tests/test_kernels_compile.py "$@"
