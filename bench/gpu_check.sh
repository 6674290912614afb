#!/usr/bin/env bash
# The checks a lent GPU machine runs first, in one call: the CUDA tests (pytest -m gpu) and the engine
# bench on random:llama-3-8b (raw generate, eager and compiled engine in one run). Results go to $OUT.
#
#   bash bench/gpu_check.sh                      # on the GPU box, from the repository root
#   RUN_BENCH=0 bash bench/gpu_check.sh          # the tests alone
#
# Python packages the machine's image lacks travel as py3.12 wheels in .whl/ (docs/engine.md, "On a GPU",
# has the download command); they are installed into /tmp/site, beside the image's torch and transformers.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export LLAMA_LAB_CACHE="${LLAMA_LAB_CACHE:-/tmp/llama_lab-cache}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} 2>&1 | tee "$OUT/machine.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/server/test_gpu.py 2>&1 \
  | tee "$OUT/gpu_tests.log"
[ "${RUN_BENCH:-1}" = 1 ] || exit 0
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout "${BENCH_TIMEOUT:-330}" python3 -m bench.engine_bench ${BENCH_ARGS:---model random:llama-3-8b --impls raw,eager,compiled --quick} 2>&1 \
  | tee "$OUT/engine_bench.log"
