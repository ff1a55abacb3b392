#!/usr/bin/env bash
# GPU checks for a lent CUDA machine, in one go (a few minutes): the hot tier's tests on CUDA and the
# copy-bandwidth measurements. Wheels missing on that machine travel in .whl/ (see the README).
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
python3 scripts/gpu_check.py "$OUT/gpu_check.json"
