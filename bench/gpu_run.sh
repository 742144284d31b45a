#!/usr/bin/env bash
# The one device run behind bench/README.md's GPU table: installs the carried pydantic wheels
# (the GPU machine has torch, numpy, pandas, pyarrow, pyyaml, scipy, pillow but no pydantic), then
# runs bench/gpu_session.py. Run from a folder holding src/, bench/, whl/ and data/prepared/:
#   OUT=/some/dir bash bench/gpu_run.sh
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install --quiet --no-index --no-deps --target /tmp/pydeps whl/*.whl
export PYTHONPATH=/tmp/pydeps:$PWD/src:$PWD/bench
python3 -m pytest -q -p no:cacheprovider tests/integration/test_training_speed.py -k cuda 2>&1 | tail -5 || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 bench/gpu_session.py --out "$OUT" --data-root . --budget-s "${BUDGET_S:-300}" "$@" 2>&1 | tee "$OUT/session.log"
cd /tmp/imagegen-gpu-session/pipeline 2>/dev/null && tar czf "$OUT/pipeline.tgz" ./*.log metrics plots || true
