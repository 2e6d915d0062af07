#!/usr/bin/env bash
# Several ranks on one GPU: each rank made to look like its own host to NCCL (otherwise NCCL
# refuses with "Duplicate GPU detected"). Used as
#   torchrun --standalone --nproc_per_node N --no-python scripts/one_gpu_rank.sh python launch/train.py ...
# by scripts/gpu_check.sh and the benchmarks' --accelerator cuda.
export NCCL_HOSTID="host${RANK:?torchrun sets RANK}" LOCAL_RANK=0 CUDA_VISIBLE_DEVICES=0 NCCL_SOCKET_IFNAME=lo
exec "$@"
