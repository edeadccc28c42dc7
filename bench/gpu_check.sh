#!/usr/bin/env bash
# One command for a session with a GPU: the kernel tests on CUDA with compiled kernels, the trainer
# tests, bench/bench_masked_mse.py, the trainer's bf16 segments/s from local tars (eager and
# --compile) beside the same model fed from memory, syncs and kernel launches per step, a 2-process
# NCCL run and a kill-and-resume under --deterministic. Needs no network. Every step runs even when an
# earlier one fails; each step's status and numbers go to summary.md (a Markdown table for
# bench/RESULTS.md) in one results folder, at most 8 files.
#
#   bash bench/gpu_check.sh [--dry-run] [--results DIR] [--scratch DIR]
#
#   --dry-run    check that everything imports and print what would run (works on CPU)
#   --results    results folder (default gpu_results/<UTC time>; on the device tool: $OUT)
#   --scratch    synthetic data and trainer runs (default /tmp/himae_gpu_check)
# Environment: PYTHON (default .venv/bin/python if present, else python3), SCALE (himae-synth
# --scale, default 0.3), STEPS (trainer steps, default 60), MICRO_BATCH (default 256), NUM_WORKERS
# (loader workers per rank, default 2; the shards must number at least ranks x workers), BENCH_ARGS
# (extra bench_masked_mse.py flags, default none: the full grid).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
RES="gpu_results/$(date -u +%Y%m%dT%H%M%SZ)"
SCRATCH="/tmp/himae_gpu_check"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --results) RES="$2"; shift ;;
    --scratch) SCRATCH="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
SCALE="${SCALE:-0.3}"; STEPS="${STEPS:-60}"; MB="${MICRO_BATCH:-256}"; WORKERS="${NUM_WORKERS:-2}"
LOG_EVERY=$(( STEPS >= 6 ? STEPS / 3 : 1 ))  # segments/s is taken between the first and the last log record
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
PORT=$((29500 + RANDOM % 1000))

# himae-synth / himae-prep: the installed CLIs, or the same entry points through $PY (PYTHONPATH)
synth() { if command -v himae-synth >/dev/null 2>&1; then himae-synth "$@"
          else "$PY" -c 'import sys; from data_prep.synth_cohort import main; sys.argv[0] = "himae-synth"; main()' "$@"; fi; }
prep()  { if command -v himae-prep >/dev/null 2>&1; then himae-prep "$@"
          else "$PY" -c 'import sys; from data_prep.convert import main; sys.argv[0] = "himae-prep"; main()' "$@"; fi; }
trun()  { local n="$1"; shift; "$PY" -m torch.distributed.run --nproc_per_node="$n" --master_addr=127.0.0.1 \
            --master_port=$((PORT++)) "$@"; }
TRAIN_ARGS=(--micro-batch "$MB" --log-every "$LOG_EVERY" --num-workers "$WORKERS" --loss-impl auto)
KERNEL_TESTS=(tests/test_fused_kernels.py tests/test_masking.py tests/test_kernel_compile.py tests/test_objective_sync.py)

if [ "$DRY" = 1 ]; then
  echo "gpu_check --dry-run: python $PY, $NGPU GPU(s) visible, results would go to $RES, data to $SCRATCH"
  fail=0
  "$PY" - <<'EOF' || fail=1
import importlib, sys
need = ["torch", "triton", "deepspeed", "webdataset", "numpy", "scipy", "pytest", "kernels.masked_mse_triton",
        "kernels.aot", "himae_dist.train", "himae_dist.objective", "data_prep.synth_cohort", "data_prep.convert"]
bad = []
for name in need:
    try:
        mod = importlib.import_module(name)
        print(f"  ok   {name} {getattr(mod, '__version__', '')}")
    except Exception as e:  # noqa: BLE001
        bad.append(name)
        print(f"  FAIL {name}: {type(e).__name__}: {e}")
from kernels.aot import ptxas_path
print(f"  ptxas: {ptxas_path() or 'missing (the compile test will skip)'}")
sys.exit(1 if bad else 0)
EOF
  "$PY" bench/bench_masked_mse.py --dry-run || fail=1
  for cli in himae-synth himae-prep; do
    if command -v "$cli" >/dev/null 2>&1; then echo "  ok   $cli on PATH"; else echo "  note $cli not on PATH: called through $PY"; fi
  done
  cat <<EOF
would run, each step logged, failures recorded and the next step run:
  1 kernel tests on CUDA:  HIMAE_TEST_DEVICE=cuda TRITON_INTERPRET=0 $PY -m pytest -q ${KERNEL_TESTS[*]}
  2 trainer tests:         TRITON_INTERPRET=0 $PY -m pytest -q tests/test_train_distributed.py
  3 kernel benchmark:      $PY bench/bench_masked_mse.py   (B 256/1024/4096, L 250/1000, fp32/bf16/fp16)
  4 data:                  himae-synth --out $SCRATCH/cohort --scale $SCALE; himae-prep --index $SCRATCH/cohort/pretrain_index.csv --out $SCRATCH/shards --source-rate 25 --target-rate 100 (L=1000)
  5 trainer from tars:     torchrun --nproc_per_node=1 -m himae_dist.train --data $SCRATCH/shards --precision bf16 --steps $STEPS ${TRAIN_ARGS[*]}
                           (again with --precision fp32 if bf16 fails)
  6 model from memory:     torchrun --nproc_per_node=1 bench/gpu_model_from_memory.py --precision bf16 --length 1000 ${TRAIN_ARGS[*]}
  7 NCCL, 2 processes:     torchrun --nproc_per_node=2 -m himae_dist.train ... --steps 20   (needs 2 GPUs; $NGPU visible)
  9 compiled from tars:    torchrun --nproc_per_node=1 -m himae_dist.train ... --precision bf16 --compile true
 10 per-step profile:      torchrun --nproc_per_node=1 bench/gpu_step_profile.py --data $SCRATCH/shards [--compile]
                           (syncs per step under set_sync_debug_mode, device kernels per step from torch.profiler)
  8 kill + resume:         --deterministic, final weights bitwise equal to an uninterrupted run
  -> $RES/summary.md (Markdown table for bench/RESULTS.md) and logs
EOF
  [ "$fail" = 0 ] && echo "dry run: everything imports" || echo "dry run: FAILED imports above"
  exit "$fail"
fi

mkdir -p "$RES" "$SCRATCH"
RES="$(cd "$RES" && pwd)"
LAST="$SCRATCH/last_command.log"
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | \`$(basename "$4")\` |"); echo "[gpu_check] $1: $2 $3"; }
run_logged() {  # LOG CMD...: run, append output to LOG (and to $LAST, this command's alone), return its status
  local log="$1"; shift
  echo "\$ $*" >>"$log"
  "$@" >"$LAST" 2>&1
  local rc=$?
  cat "$LAST" >>"$log"
  return "$rc"
}
# the failing command's own error (several rows share a log): from $LAST, the last command run
first_error() { grep -E 'himae-train: error|gpu_model_from_memory: error|^[A-Za-z_.]*(Error|Exception): ' "$LAST" | grep -v ChildFailedError | tail -1 | cut -c1-200; }
pytest_counts() { grep -Eo '[0-9]+ (passed|failed|skipped|error|errors)' "$1" | tail -4 | paste -sd, - ; }

{ date -u; nvidia-smi 2>&1 | head -15; "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpus", torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
  "$PY" -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>&1 | tail -1; git log --oneline -1; } >"$RES/env.txt" 2>&1

# 1: kernel tests on the GPU, compiled (TRITON_INTERPRET=0: conftest only sets it when unset)
L1="$RES/kernel_tests.log"
if HIMAE_TEST_DEVICE=cuda TRITON_INTERPRET=0 run_logged "$L1" "$PY" -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}"; then
  row "kernel tests, CUDA, compiled" pass "$(pytest_counts "$L1")" "$L1"
else row "kernel tests, CUDA, compiled" FAIL "$(pytest_counts "$L1")" "$L1"; fi

# 2: trainer tests as written (their ranks use gloo; the fused test pins the interpreter)
L2="$RES/trainer_tests.log"
if TRITON_INTERPRET=0 run_logged "$L2" "$PY" -m pytest -q -p no:cacheprovider tests/test_train_distributed.py; then
  row "trainer tests" pass "$(pytest_counts "$L2")" "$L2"
else row "trainer tests" FAIL "$(pytest_counts "$L2")" "$L2"; fi

# 3: kernel benchmark
L3="$RES/bench_masked_mse.md"
# shellcheck disable=SC2086
if "$PY" bench/bench_masked_mse.py ${BENCH_ARGS:-} >"$L3" 2>"$SCRATCH/bench.err"; then
  r=$(grep -E '^\| 4096 \| 1000 \| bf16 ' "$L3" | awk -F'|' '{gsub(/ /,""); print "B=4096 L=1000 bf16: fused "$7" ms, "$9" eager, "$12" of floor"}')
  row "bench_masked_mse.py" pass "${r:-see table}" "$L3"
else cat "$SCRATCH/bench.err" >>"$L3"; row "bench_masked_mse.py" FAIL "$(tail -1 "$SCRATCH/bench.err")" "$L3"; fi

# 4-6: trainer from local tars, and the same model fed from memory
L5="$RES/train_e2e.log"
seg_per_s() {  # metrics.jsonl -> segments/s between the first and last log record
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
a, b = recs[0], recs[-1]
print(f"{(b['step'] - a['step']) * int(sys.argv[2]) / (b['elapsed_s'] - a['elapsed_s']):.0f}" if len(recs) > 1 else "n/a")
EOF
}
data_ok=0
if run_logged "$L5" synth --out "$SCRATCH/cohort" --scale "$SCALE" && \
   run_logged "$L5" prep --index "$SCRATCH/cohort/pretrain_index.csv" --out "$SCRATCH/shards" \
     --source-rate 25 --target-rate 100 --workers 8; then data_ok=1  # 25 Hz cohort -> L=1000 at 100 Hz, as pretraining
else row "synthetic tars" FAIL "himae-synth/himae-prep failed" "$L5"; fi
if [ "$data_ok" = 1 ]; then
  for prec in bf16 fp32; do
    rm -rf "$SCRATCH/run_$prec"
    if run_logged "$L5" trun 1 -m himae_dist.train --data "$SCRATCH/shards" --out "$SCRATCH/run_$prec" \
         --precision "$prec" --steps "$STEPS" "${TRAIN_ARGS[@]}"; then
      row "trainer $prec, 1 GPU, local tars" pass "$(seg_per_s "$SCRATCH/run_$prec/metrics.jsonl" "$MB") segments/s" "$L5"
      break
    else
      row "trainer $prec, 1 GPU, local tars" FAIL "$(first_error "$L5")" "$L5"
    fi
  done
fi
L6="$RES/model_from_memory.log"
for prec in bf16 fp32; do
  if run_logged "$L6" trun 1 bench/gpu_model_from_memory.py --precision "$prec" --length 1000 "${TRAIN_ARGS[@]}"; then
    row "same model fed from memory, $prec" pass "$(grep -o '"segments_per_s": [0-9.]*' "$L6" | tail -1 | cut -d' ' -f2) segments/s" "$L6"
    break
  else row "same model fed from memory, $prec" FAIL "$(first_error "$L6")" "$L6"; fi
done

# 7: two processes over NCCL (one GPU each: NCCL refuses two ranks on one GPU)
L7="$RES/train_e2e.log"  # one log for every trainer run: the device tool returns at most 8 files
if [ "$NGPU" -lt 2 ]; then
  echo "skipped: $NGPU GPU(s) visible; NCCL needs one GPU per rank" >>"$L7"
  row "2-process NCCL run" skipped "$NGPU GPU visible, needs 2" "$L7"
elif [ "$data_ok" = 1 ] && run_logged "$L7" trun 2 -m himae_dist.train --data "$SCRATCH/shards" \
       --out "$SCRATCH/run_nccl" --steps 20 "${TRAIN_ARGS[@]}"; then
  row "2-process NCCL run" pass "$(grep -o 'world=2 device=cuda' "$L7" | head -1); $(seg_per_s "$SCRATCH/run_nccl/metrics.jsonl" $((2 * MB))) segments/s" "$L7"
else row "2-process NCCL run" FAIL "$(first_error "$L7")" "$L7"; fi

# 9-10: --compile (inductor) from the same tars; syncs and kernel launches per steady-state step, eager and compiled
L9="$RES/train_e2e.log"
if [ "$data_ok" = 1 ]; then
  rm -rf "$SCRATCH/run_compiled"
  if run_logged "$L9" trun 1 -m himae_dist.train --data "$SCRATCH/shards" --out "$SCRATCH/run_compiled" \
       --precision bf16 --steps "$STEPS" --compile true "${TRAIN_ARGS[@]}"; then
    row "trainer bf16 --compile, 1 GPU, local tars" pass "$(seg_per_s "$SCRATCH/run_compiled/metrics.jsonl" "$MB") segments/s (eager: row 5)" "$L9"
  else row "trainer bf16 --compile, 1 GPU, local tars" FAIL "$(first_error "$L9")" "$L9"; fi
  for c in "" --compile; do
    if run_logged "$L9" trun 1 bench/gpu_step_profile.py --data "$SCRATCH/shards" --micro-batch "$MB" --precision bf16 $c; then
      row "per step, bf16 ${c:-eager}" pass "$(grep '^{"compile"' "$L9" | tail -1 | tr -d '{}"')" "$L9"
    else row "per step, bf16 ${c:-eager}" FAIL "$(first_error "$L9")" "$L9"; fi
  done
fi

# 8: kill-and-resume under --deterministic on the GPU: final weights bitwise equal to an uninterrupted run
L8="$RES/train_e2e.log"
if [ "$data_ok" = 1 ]; then
  DARGS=(--data "$SCRATCH/shards" --steps 30 --save-every 10 --deterministic true "${TRAIN_ARGS[@]}")
  rm -rf "$SCRATCH/det_clean" "$SCRATCH/det_killed"
  if run_logged "$L8" trun 1 -m himae_dist.train --out "$SCRATCH/det_clean" "${DARGS[@]}" && \
     HIMAE_FAULT=kill:0:15 run_logged "$L8" trun 1 --max-restarts=1 -m himae_dist.train --out "$SCRATCH/det_killed" "${DARGS[@]}" && \
     run_logged "$L8" "$PY" -c 'import sys, torch
a, b = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in sys.argv[1:3])
diff = [k for k in a if not torch.equal(a[k], b[k])]
print("bitwise equal" if not diff else f"differ: {diff[:5]}")
sys.exit(1 if diff else 0)' "$SCRATCH/det_clean/himae_final.pt" "$SCRATCH/det_killed/himae_final.pt"
  then row "kill at 15 + resume, --deterministic" pass "final weights bitwise equal to the uninterrupted run" "$L8"
  else row "kill at 15 + resume, --deterministic" FAIL "$(tail -1 "$LAST")" "$L8"; fi
fi

{
  echo "### $(date -u +%Y-%m-%d), bench/gpu_check.sh on $(grep -m1 -o 'NVIDIA [A-Za-z0-9 ]*' "$RES/env.txt" || echo 'an unnamed GPU')"
  echo
  echo "\`$(grep -m1 '^torch' "$RES/env.txt")\`; synth scale $SCALE, micro-batch $MB, $STEPS steps."
  echo
  echo "| step | status | result | log |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  sed -n '/^run:/,$p' "$L3" 2>/dev/null
} >"$RES/summary.md"
echo "[gpu_check] wrote $RES/summary.md"
cat "$RES/summary.md"
grep -q '| FAIL |' "$RES/summary.md" && exit 1 || exit 0
