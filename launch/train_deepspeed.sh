#!/usr/bin/env bash
# Pretraining under the DeepSpeed launcher, which starts the ranks of every node itself (pdsh/ssh).
#   HOSTFILE=launch/hostfile.example bash launch/train_deepspeed.sh s3://bucket/shards /shared/runs/big [flags...]
#   NPROC=8 bash launch/train_deepspeed.sh data/shards runs/one_node [flags...]      # one machine, no hostfile
# ZERO_STAGE (default 1) is passed as --zero-stage and must match launch/ds_config.json.
# OUT must be on storage every node sees (the trainer checks at start).
set -euo pipefail
data=$1 out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
if [ -n "${HOSTFILE:-}" ]; then
  where=(--hostfile "$HOSTFILE")
elif [ -n "${NPROC:-}" ]; then
  where=(--num_gpus "$NPROC")
elif command -v nvidia-smi >/dev/null; then
  where=(--num_gpus "$(nvidia-smi -L | wc -l)")
else
  echo "train_deepspeed.sh: error: set HOSTFILE (several nodes) or NPROC (ranks on this machine); no nvidia-smi to count GPUs" >&2
  exit 2
fi
exec "${DEEPSPEED:-deepspeed}" "${where[@]}" --master_port "${MASTER_PORT:-29500}" --module himae_dist.train \
  --data "$data" --out "$out" --ds-config "$here/ds_config.json" --zero-stage "${ZERO_STAGE:-1}" "$@"
