#!/usr/bin/env bash
# Pretraining under the DeepSpeed launcher, which starts the ranks of every node itself (pdsh/ssh).
#   HOSTFILE=launch/hostfile.example bash launch/train_deepspeed.sh s3://bucket/shards /shared/runs/big [flags...]
#   NPROC=8 bash launch/train_deepspeed.sh data/shards runs/one_node [flags...]      # one machine, no hostfile
# ZERO_STAGE (default 0) is passed as --zero-stage (launch/ds_config.json leaves the stage to it):
# ZeRO shards optimizer state, which for a 1.2 M-parameter model (15 MB with Adam) only adds
# collectives and a host sync per step.
# OUT must be on storage every node sees (the trainer checks at start).
set -euo pipefail
data=$1 out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
if [ -n "${HOSTFILE:-}" ]; then
  where=(--hostfile "$HOSTFILE")
else
  nproc=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
  if [ "${nproc:-0}" -lt 1 ]; then
    echo "train_deepspeed.sh: error: set HOSTFILE (several nodes) or NPROC (ranks on this machine); nvidia-smi found no GPU to count" >&2
    exit 2
  fi
  where=(--num_gpus "$nproc")
fi
exec "${DEEPSPEED:-deepspeed}" "${where[@]}" --master_port "${MASTER_PORT:-29500}" --module himae_dist.train \
  --data "$data" --out "$out" --ds-config "$here/ds_config.json" --zero-stage "${ZERO_STAGE:-0}" "$@"
