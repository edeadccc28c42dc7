#!/usr/bin/env bash
# Shard conversion as a SLURM job array, then one finalize job that writes manifest.json.
#
#   INDEX=s3://bucket/pretrain_index.csv OUT=s3://bucket/shards TASKS=64 CPUS=8 \
#     bash launch/prep_slurm.sh [more himae-prep flags, e.g. --source-rate 25 --target-rate 100]
#
# Each array task builds every TASKS-th shard (its index is SLURM_ARRAY_TASK_ID; the task count is
# passed as --num-tasks), so the tasks are independent; the finalize job runs once all of them
# succeeded, verifies every shard and writes the manifest. The shards are identical to a
# one-machine run with the same flags. A failed task k is re-run alone with the same arguments:
#   sbatch --array=k --wrap "himae-prep <same flags> --num-tasks $TASKS", then the finalize job.
set -euo pipefail
: "${INDEX:?set INDEX to the pretraining index CSV (local or s3://)}"
: "${OUT:?set OUT to the output folder or s3:// prefix}"
TASKS=${TASKS:-16}
CPUS=${CPUS:-8}
SBATCH=${SBATCH:-sbatch}
cd "$(dirname "$0")/.."
PREP=${PREP:-$PWD/.venv/bin/himae-prep}
args=(--index "$INDEX" --out "$OUT" --workers "$CPUS" --num-tasks "$TASKS" "$@")
array_job=$("$SBATCH" --parsable --array="0-$((TASKS - 1))" --cpus-per-task="$CPUS" --job-name=himae-prep \
  --wrap "$(printf '%q ' "$PREP" "${args[@]}")")
"$SBATCH" --parsable --dependency="afterok:${array_job}" --job-name=himae-prep-finalize \
  --wrap "$(printf '%q ' "$PREP" "${args[@]}" --finalize)"
echo "[prep_slurm] submitted array job $array_job ($TASKS tasks) and its finalize job"
