#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: unit tests plus real multi-process jobs
# (deepspeed launcher, torchrun, mpirun; gloo on CPU). Tests marked "slow" are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
# the 20 slowest tests are listed at the end: the suite must stay under 20 minutes on 2 cores
exec .venv/bin/python -m pytest tests --durations=20 "$@"
