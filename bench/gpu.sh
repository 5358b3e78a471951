#!/usr/bin/env bash
# The GPU benchmark of issue 10 in one command, for a lent GPU machine (no internet): see bench/gpu.py.
#   bash bench/gpu.sh          # CUDA: images, CPU decode rate, model only, tagger tag end to end, GPU decode, torch.compile
#   bash bench/gpu.sh --dry    # the same logic on the CPU with tiny sizes (the tests run this)
# Results: $OUT/gpu-bench.{json,md} (or --out DIR). Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then py=$PYTHON
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi
# Bounded: the lent machine's session is short; 8 minutes is the promise, the budget inside is 7.
exec timeout --signal=TERM 480 "$py" -m bench.gpu "$@"
