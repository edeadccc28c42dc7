"""launch/prep_slurm.sh against a stand-in sbatch that runs the array tasks and the finalize job here."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from data_prep.convert import ConvertParams, convert_pretrain
from tests.h5_inputs import random_index

ROOT = Path(__file__).resolve().parents[1]

FAKE_SBATCH = r"""#!/usr/bin/env bash
# Runs what it is given: an --array=0-N job as N+1 tasks with SLURM's variables, anything else once.
set -euo pipefail
array="" wrap=""
for a in "$@"; do
  case "$a" in --array=*) array="${a#--array=}" ;; esac
done
while [ $# -gt 0 ]; do [ "$1" = "--wrap" ] && wrap="$2"; shift; done
echo "$wrap" >> "$SBATCH_LOG"
if [ -n "$array" ]; then
  last="${array#0-}"
  for i in $(seq 0 "$last"); do
    SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=$((last + 1)) SLURM_ARRAY_TASK_MIN=0 bash -c "$wrap" >/dev/null
  done
else
  bash -c "$wrap" >/dev/null
fi
echo 4242
"""


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_slurm_array_then_finalize_equals_one_run(tmp_path):
    index = random_index(tmp_path, n=240)
    fake = tmp_path / "sbatch"
    fake.write_text(FAKE_SBATCH)
    fake.chmod(0o755)
    prep = tmp_path / "himae-prep"
    prep.write_text(f"#!/bin/sh\nexec {sys.executable} -m data_prep.convert \"$@\"\n")
    prep.chmod(0o755)
    env = {**os.environ, "SBATCH": str(fake), "SBATCH_LOG": str(tmp_path / "log"), "PREP": str(prep),
           "INDEX": str(index), "OUT": str(tmp_path / "slurm"), "TASKS": "3", "CPUS": "1",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["bash", str(ROOT / "launch" / "prep_slurm.sh"), "--samples-per-shard", "30"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "submitted array jobs 4242 (read) and 4242 (build) of 3 tasks" in out.stdout
    log = (tmp_path / "log").read_text().splitlines()
    assert len(log) == 3 and log[0] == log[1] and "--finalize" in log[2] and "--num-tasks 3" in log[2]
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "one"), samples_per_shard=30, workers=1))
    assert _hashes(tmp_path / "slurm") == _hashes(tmp_path / "one")
