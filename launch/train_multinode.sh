#!/usr/bin/env bash
# Multi-node GPU pretraining with torchrun (NCCL). Run once per node with the same MASTER_ADDR.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash launch/train_multinode.sh s3://bucket/shards runs/big [flags...]
# The same trainer runs under the DeepSpeed launcher:
#   HOSTFILE=launch/hostfile.example bash launch/train_deepspeed.sh s3://bucket/shards /shared/runs/big
set -euo pipefail
data=$1 out=$2; shift 2
exec "${PYTHON:-python}" -m himae_dist.torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --nproc_per_node="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m himae_dist.train --data "$data" --out "$out" --ds-config "$(dirname "$0")/ds_config.json" \
  --zero-stage "${ZERO_STAGE:-0}" "$@"
