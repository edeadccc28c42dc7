#!/usr/bin/env bash
# Two-rank pretraining on one CPU machine (gloo).   Usage: bash launch/train_cpu.sh SHARDS OUT [trainer flags...]
set -euo pipefail
data=$1 out=$2; shift 2
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python}" -m himae_dist.torchrun --nproc_per_node="${NPROC:-2}" -m himae_dist.train --data "$data" --out "$out" --num-workers 0 "$@"
