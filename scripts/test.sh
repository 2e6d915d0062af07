#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: unit tests plus real multi-process jobs
# (deepspeed launcher, torchrun, mpirun; gloo on CPU). Tests marked "slow" are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest tests "$@"
