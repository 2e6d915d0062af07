#!/usr/bin/env bash
# The main job on the embedded default: tiny LLaMA, Shakespeare, 4 pipeline stages on CPU,
# CheckFree recovery of two injected stage failures. Extra arguments go to launch/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/deepspeed --num_gpus 4 launch/train.py --deepspeed_config ds_configs/checkfree.json \
  --model tiny --steps 40 --fail_at 1:15 --fail_at 2:25 --output_dir out "$@"
