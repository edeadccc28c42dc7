"""Stress the elastic resume: tests/test_elastic_order.py's kill / shrink / grow cycle N times.

Once: shards of the tiny synthetic cohort (as tests/conftest.py's tiny_cohort / tiny_shards) and the
uninterrupted 1 x 2 reference run (deterministic, so shared by every iteration), with the test's
ARGS (8 steps, saves every 3, global batch 24, 4 canonical readers). Each iteration, in a fresh temp
folder with freshly made shards: a 2 x 1 job (two torchrun agents on loopback, c10d rendezvous)
loses node 1 (its agent SIGKILLed, `HIMAE_FAULT=killnode`) before a step that varies per iteration
(4, 5, 4, ...; the save at 3 is the last one); it resumes on 1 x 1, which is killed again before
step 7 (the save at 6 is the last one), and grows back to 2 x 1 to finish. An iteration passes
when every step's global batch holds the reference's keys in the reference's order (step -> keys, as
the test compares them: each step from the leg that ran it last), each leg exits as expected and
logs the world-size change and where the data stream goes on, and the final parameters equal the
reference's within the test's float-rounding tolerance. No process is left behind: the launcher
helper kills its trees on a timeout, and after each iteration any process still naming its folder is
reported (a FAIL) and killed.

    .venv/bin/python bench/stress_elastic.py [-n 3]

Ends with: `elastic resume: P passed, F failed of N` (exit 0 only if F == 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.ports import free_port  # noqa: E402
from tests.proc_tree import communicate_all, kill_tree  # noqa: E402
from tests.test_elastic_order import ARGS, _keys, _params  # noqa: E402
from tests.test_train_distributed import _run_trainer  # noqa: E402

SAVE_EVERY, STEPS = 3, 8  # as in ARGS
FIRST_KILLS = (4, 5)  # rank 1 of the 2-rank leg, before this step; cycled over the iterations
SECOND_KILL = 7  # rank 0 of the 1-rank leg


def _shards(folder: Path) -> Path:
    """The tests' tiny_shards fixture: scale-0.01 cohort (seed 3), 64 samples a shard."""
    from data_prep.convert import ConvertParams, convert_pretrain
    from data_prep.synth_cohort import generate

    generate(folder / "cohort", scale=0.01, seed=3, segments_per_shard=200)
    convert_pretrain(str(folder / "cohort" / "pretrain_index.csv"),
                     ConvertParams(str(folder / "shards"), samples_per_shard=64))
    return folder / "shards"


def _shard_hashes(shards: Path) -> list:
    """Per split, each shard's (samples, sha256): equal for equal shards in any folder."""
    m = json.loads((shards / "manifest.json").read_text())
    return [(split, s["n_samples"], s["sha256"]) for split, v in sorted(m["splits"].items()) for s in v["shards"]]


def _tail(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-400:]


def _leftovers(folder: Path) -> list[psutil.Process]:
    """Processes still running whose command line names this folder (trainer workers, launchers)."""
    me, found = os.getpid(), []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != me and str(folder) in " ".join(p.info["cmdline"] or ()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _nodes(shards: Path, out: Path, nodes: int, env_extra: dict) -> list[subprocess.CompletedProcess]:
    """`nodes` torchrun agents on loopback, one rank each (c10d rendezvous, as launch/train_slurm.sbatch), all
    writing to `out`; one node is a plain 1 x 1 torchrun. On a timeout every tree is killed (TimeoutExpired)."""
    if nodes == 1:
        return [_run_trainer(shards, out, ARGS, nproc=1, env_extra=env_extra)]
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env_extra)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=elastic-{port}", "-m",
         "himae_dist.train", "--data", str(shards), "--out", str(out), "--num-workers", "0",
         "--collective-timeout-s", "60", *ARGS],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for _ in range(nodes)]
    return communicate_all(procs, timeout=300)


def _iteration(folder: Path, want: dict, ref_params: dict, ref_hashes: list, first_kill: int, env: dict) -> list[str]:
    """The problems of one kill / shrink / grow cycle; empty when it passed."""
    shards = _shards(folder)
    problems = []
    if _shard_hashes(shards) != ref_hashes:
        problems.append("freshly made shards differ from the reference's (conversion not deterministic)")
    out = folder / "run"
    # (nodes x 1 rank each, fault): node 1 of a 2 x 1 job is lost (its agent SIGKILLed), the job resumes on
    # 1 x 1 (itself killed later), then grows back to 2 x 1
    legs = [(2, f"killnode:1:{first_kill}"), (1, f"kill:0:{SECOND_KILL}"), (2, None)]
    starts = [0, (first_kill // SAVE_EVERY) * SAVE_EVERY, (SECOND_KILL // SAVE_EVERY) * SAVE_EVERY, STEPS]
    got: dict[int, list[str]] = {}
    for i, (world, fault) in enumerate(legs):
        leg_env = dict(env, HIMAE_TEST_KEYS=str(folder / f"keys{i}"))
        if fault:
            leg_env["HIMAE_FAULT"] = fault
        try:
            runs = _nodes(shards, out, world, leg_env)
        except subprocess.TimeoutExpired:
            return problems + [f"leg {i} ({world} x 1, {fault or 'no fault'}) hung past 300 s (trees killed)"]
        log = "".join(p.stdout + p.stderr for p in runs)
        codes = [p.returncode for p in runs]
        if any(c != 0 for c in codes) != bool(fault) or (fault and not all(codes)):  # a lost node ends every node
            return problems + [f"leg {i} ({world} x 1, {fault or 'no fault'}) exited {codes}: {_tail(runs[0])}"]
        if i:
            for line in (f"world size {legs[i - 1][0]} -> {world}", f"the data stream goes on at global batch {starts[i]}"):
                if line not in log:
                    problems.append(f"leg {i}: no '{line}' in its log")
            if "new data stream" in log:
                problems.append(f"leg {i}: started a new data stream")
        try:
            leg = _keys(folder / f"keys{i}", world)
        except (OSError, ValueError) as e:
            return problems + [f"leg {i}: no readable keys log ({e})"]
        got.update({s: k for s, k in leg.items() if starts[i] <= s < starts[i + 1]})
    if got != want:
        if sorted(got) != sorted(want):
            problems.append(f"steps {sorted(got)} vs the reference's {sorted(want)}")
        bad = [s for s in sorted(want) if got.get(s) != want[s]]
        if bad:
            s = bad[0]
            diff = sum(a != b for a, b in zip(got.get(s, []), want[s]))
            problems.append(f"keys differ at steps {bad} (step {s}: {diff} of {len(want[s])} positions, "
                            f"{len(set(got.get(s, [])) ^ set(want[s]))} keys not in both)")
    try:
        params = _params(out)
        for k in ref_params:
            torch.testing.assert_close(params[k], ref_params[k], rtol=1e-4, atol=1e-5, msg=k)
    except (OSError, KeyError, RuntimeError) as e:
        problems.append(f"final weights: {str(e).splitlines()[0]}")
    except AssertionError as e:
        problems.append(f"final weights differ from the reference's: {str(e).splitlines()[0]}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3, help="iterations")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="stress_elastic_"))
    # the launchers' leftovers (torchelastic_* log folders, pymp-* of killed workers) land in root, removed
    # at the end; kept short, as children put AF_UNIX sockets under it (a socket path fits in 107 bytes)
    (root / "t").mkdir()
    env = {"TMPDIR": str(root / "t")} if len(str(root / "t")) <= 64 else {}
    passed = failed = 0
    try:
        t0 = time.monotonic()
        ref_dir = root / "ref"
        shards = _shards(ref_dir)
        p = _run_trainer(shards, ref_dir / "run", ARGS, nproc=2, env_extra=dict(env, HIMAE_TEST_KEYS=str(ref_dir / "keys")))
        if p.returncode != 0:
            print(f"reference 1 x 2 run failed (exit {p.returncode}): {_tail(p)}")
            print(f"elastic resume: 0 passed, {a.n} failed of {a.n}")
            return 1
        want = _keys(ref_dir / "keys", 2)
        if sorted(want) != list(range(STEPS)) or not all(len(k) == 24 for k in want.values()):
            print(f"reference keys log is not {STEPS} steps x 24 keys: steps {sorted(want)}")
            print(f"elastic resume: 0 passed, {a.n} failed of {a.n}")
            return 1
        ref_params, ref_hashes = _params(ref_dir / "run"), _shard_hashes(shards)
        print(f"reference 1 x 2 run: {STEPS} steps x 24 keys ({time.monotonic() - t0:.0f} s)", flush=True)
        for it in range(a.n):
            t = time.monotonic()
            first_kill = FIRST_KILLS[it % len(FIRST_KILLS)]
            folder = root / f"it{it}"
            folder.mkdir()
            try:
                problems = _iteration(folder, want, ref_params, ref_hashes, first_kill, env)
            except Exception as e:  # a broken iteration is a FAIL, not the end of the run
                problems = [f"{type(e).__name__}: {e}"]
            left = _leftovers(folder)
            if left:
                problems.append(f"{len(left)} process(es) left behind (killed): {[p.pid for p in left]}")
                kill_tree(*(p.pid for p in left))
            what = (f"node 1 of 2 x 1 lost before step {first_kill} -> 1 x 1, killed before step {SECOND_KILL} -> "
                    f"2 x 1 to step {STEPS}, "
                    f"{time.monotonic() - t:.0f} s")
            if problems:
                failed += 1
                print(f"iteration {it + 1}: FAIL ({what}): " + "; ".join(problems), flush=True)
            else:
                passed += 1
                print(f"iteration {it + 1}: PASS ({what}): every step's keys as the reference's, weights match",
                      flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        left = _leftovers(root)
        if left:
            print(f"killing {len(left)} process(es) left behind: {[p.pid for p in left]}")
            kill_tree(*(p.pid for p in left))
        shutil.rmtree(root, ignore_errors=True)
    print(f"elastic resume: {passed} passed, {failed} failed of {a.n}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
