#!/usr/bin/env bash
# Shard conversion as a SLURM job array submitted twice, then one finalize job that writes manifest.json.
#
#   INDEX=s3://bucket/pretrain_index.csv OUT=s3://bucket/shards SPILL=/shared/scratch/himae-spill \
#     TASKS=64 CPUS=8 bash launch/prep_slurm.sh [more himae-prep flags, e.g. --source-rate 25 --target-rate 100]
#
# The conversion reads each input file once (data_prep/external_shuffle.py): in the first array,
# task k reads every TASKS-th input file and spills its rows by destination shard into SPILL, a
# folder every task can read (default: OUT/.spill when OUT is a local path; required for s3://).
# The second array (afterok) builds each task's shards from everyone's spill; a task of the first
# array that finds every spill already there builds its shards at once. The finalize job verifies
# every shard, writes the manifest and removes the spill. The shards are identical to a
# one-machine run with the same flags. A failed task k is re-run alone with the same arguments,
#   sbatch --array=k --wrap "himae-prep <same flags> --num-tasks $TASKS",
# and, if it failed in the first (read) array, the build array was never started: submit the
# whole array once more, then the finalize job (tasks whose shards are done only verify them).
set -euo pipefail
: "${INDEX:?set INDEX to the pretraining index CSV (local or s3://)}"
: "${OUT:?set OUT to the output folder or s3:// prefix}"
TASKS=${TASKS:-16}
CPUS=${CPUS:-8}
SBATCH=${SBATCH:-sbatch}
cd "$(dirname "$0")/.."
PREP=${PREP:-$PWD/.venv/bin/himae-prep}
args=(--index "$INDEX" --out "$OUT" --workers "$CPUS" --num-tasks "$TASKS")
if [ -n "${SPILL:-}" ]; then
  args+=(--spill-dir "$SPILL")
elif [[ "$OUT" == *://* && " $* " != *" --spill-dir"* ]]; then
  echo "prep_slurm.sh: OUT=$OUT is remote: set SPILL to a folder on a filesystem every task can read" >&2
  exit 2
fi
args+=("$@")
read_job=$("$SBATCH" --parsable --array="0-$((TASKS - 1))" --cpus-per-task="$CPUS" --job-name=himae-prep-read \
  --wrap "$(printf '%q ' "$PREP" "${args[@]}")")
build_job=$("$SBATCH" --parsable --dependency="afterok:${read_job}" --array="0-$((TASKS - 1))" \
  --cpus-per-task="$CPUS" --job-name=himae-prep-build --wrap "$(printf '%q ' "$PREP" "${args[@]}")")
"$SBATCH" --parsable --dependency="afterok:${build_job}" --job-name=himae-prep-finalize \
  --wrap "$(printf '%q ' "$PREP" "${args[@]}" --finalize)"
echo "[prep_slurm] submitted array jobs $read_job (read) and $build_job (build) of $TASKS tasks, and the finalize job"
