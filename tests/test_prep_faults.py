"""himae-prep under kill -9, SIGTERM and SIGINT: no pool worker outlives the job, a signal ends it
with one line and 128+signum, and a re-run finishes with the shards of an uninterrupted run.

Each test runs the real CLI (`python -m data_prep.convert --workers 2`) slowed by the test hook
HIMAE_TEST_SHARD_DELAY_S, signals it once a few shards are written, and kills whatever it started
in a `finally`, so a failing test leaves no process behind.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from data_prep.convert import TEST_SHARD_DELAY_ENV, ConvertParams, convert_pretrain, interrupted_line
from tests.h5_inputs import random_index
from tests.proc_tree import wait_gone

SHARD_DELAY_S = 0.25  # per shard and worker: 40 shards take ~5 s, far longer than it takes to signal
STARTUP_TIMEOUT_S = 60.0  # imports and planning before the first shard, on a loaded machine
GONE_TIMEOUT_S = 10.0
EXPECTED_LINE = ("himae-prep: interrupted by {sig}; shards written so far are kept (each is written under a temp "
                 "name, then renamed); run the same command to resume")


def _prep_command(index: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_prep.convert", "--index", str(index), "--out", str(out),
            "--samples-per-shard", "10", "--workers", "2", *extra]


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    """400 rows in 40 shards: enough shards that the job is still running when it is signalled."""
    return random_index(tmp_path_factory.mktemp("faults_in"), n=400, length=250, n_files=4)


def _tree_bytes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _kill_tree(proc: subprocess.Popen, known: list[psutil.Process]) -> None:
    """SIGKILL the job and every descendant it has or had (those seen earlier may be orphans now)."""
    procs = list(known)
    try:
        procs += psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in [*procs, proc]:
        try:
            p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _markers(out: Path) -> list[Path]:
    """The finished waves' markers; the job removes folders (downloads, the spill) while this looks."""
    try:
        return list(out.glob(".spill/*/*/done/*.json"))
    except FileNotFoundError:
        return []


def _start_mid_run(index: Path, out: Path, in_pass: str = "write") -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start himae-prep and return once both workers run and, in pass "write", some shards are
    written (not all), or in pass "read" (waves of 100 rows, one file each) some waves are spilled
    and no shard is written yet: the job and its descendants, collected before any signal."""
    env = {**os.environ, TEST_SHARD_DELAY_ENV: str(SHARD_DELAY_S * (8 if in_pass == "read" else 1))}
    extra = ("--max-rows", "100") if in_pass == "read" else ()
    proc = subprocess.Popen(_prep_command(index, out, *extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            descendants = psutil.Process(proc.pid).children(recursive=True)
            finished_shards = [p for p in (out / "_parts").glob("*.json") if p.name != "plan.json"]
            waves = _markers(out)
            if len(descendants) >= 2 and (len(finished_shards) >= 2 if in_pass == "write" else len(waves) >= 1):
                break
            time.sleep(0.02)
        if in_pass == "read":
            assert not [p for p in (out / "_parts").glob("*.json") if p.name != "plan.json"], "pass 2 began already"
        assert proc.poll() is None, f"himae-prep ended before it was signalled: {proc.stderr.read().decode()}"
        assert len(descendants) >= 2, "himae-prep never started its two workers"
        assert not (out / "manifest.json").exists()
    except BaseException:
        _kill_tree(proc, descendants)
        raise
    return proc, descendants


def _signal_and_check(index: Path, out: Path, sig: signal.Signals) -> None:
    """Signal a mid-run job: exit 128+sig, the one line on stderr, no traceback, no process left."""
    proc, descendants = _start_mid_run(index, out)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=GONE_TIMEOUT_S)
        stderr = err.decode()
        assert proc.returncode == 128 + sig, stderr
        assert "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines() == [EXPECTED_LINE.format(sig=sig.name)] == [interrupted_line(sig)], stderr
        assert not wait_gone(descendants, GONE_TIMEOUT_S), "pool workers outlived the interrupted job"
    finally:
        _kill_tree(proc, descendants)


def test_kill_9_of_the_parent_takes_its_workers_with_it(index, tmp_path):
    """Workers block on the call queue forever if the parent vanishes: the kernel must kill them."""
    proc, descendants = _start_mid_run(index, tmp_path / "out")
    try:
        proc.kill()
        proc.wait(GONE_TIMEOUT_S)
        alive = wait_gone(descendants, GONE_TIMEOUT_S)
        assert not alive, f"still alive {GONE_TIMEOUT_S} s after kill -9 of the parent: {alive}"
    finally:
        _kill_tree(proc, descendants)


@pytest.mark.parametrize("in_pass", ["read", "write"])
def test_kill_9_in_either_pass_resumes_to_the_same_bytes(index, tmp_path, in_pass):
    """kill -9 while input files are read and spilled, or while shards are written: the re-run
    reads only the waves not yet spilled, writes only the shards not yet written, and gives the
    uninterrupted run's bytes (the spill removed)."""
    out, reference = tmp_path / "out", tmp_path / "reference"
    convert_pretrain(str(index), ConvertParams(str(reference), samples_per_shard=10))
    proc, descendants = _start_mid_run(index, out, in_pass)
    try:
        proc.kill()
        proc.wait(GONE_TIMEOUT_S)
        assert not wait_gone(descendants, GONE_TIMEOUT_S)
    finally:
        _kill_tree(proc, descendants)
    spilled = len(_markers(out))
    assert spilled >= 1 and not (out / "manifest.json").exists()
    rerun = subprocess.run(_prep_command(index, out, *(("--max-rows", "100") if in_pass == "read" else ())),
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    if in_pass == "read":  # 4 files, one per wave: only the waves without a marker are read again
        assert f"reading {4 - spilled} input file(s) once" in rerun.stdout, rerun.stdout
    else:
        assert "pass 1" not in rerun.stdout and "shards verified" in rerun.stdout, rerun.stdout
    assert _tree_bytes(out) == _tree_bytes(reference)


def test_sigterm_stops_cleanly_and_a_rerun_gives_the_uninterrupted_shards(index, tmp_path):
    """SIGTERM (a scheduler's stop) must keep finished shards intact and leave a resumable folder."""
    out, reference = tmp_path / "out", tmp_path / "reference"
    convert_pretrain(str(index), ConvertParams(str(reference), samples_per_shard=10))
    expected = _tree_bytes(reference)
    _signal_and_check(index, out, signal.SIGTERM)
    kept = {k: v for k, v in _tree_bytes(out).items()
            if not Path(k).name.startswith(".tmp-") and not k.startswith(".spill/")}  # spill: removed at the end
    assert "manifest.json" not in kept
    assert kept and all(expected.get(k) == v for k, v in kept.items()), "a final name holds other bytes"
    subprocess.run(_prep_command(index, out), check=True, capture_output=True, timeout=60)
    assert _tree_bytes(out) == expected  # temp files of the killed workers are gone too


def test_sigint_stops_cleanly(index, tmp_path):
    """Ctrl-C must end the job with one line and 130, not a KeyboardInterrupt traceback."""
    _signal_and_check(index, tmp_path / "out", signal.SIGINT)


def _has_loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the imports under way")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_starting_is_the_same_one_line(index, tmp_path, sig):
    """Ctrl-C in the second or more himae-prep spends importing numpy, pandas, h5py (before main()
    handles signals) ends with the one line and 128+signum too, not a KeyboardInterrupt traceback."""
    proc = subprocess.Popen(_prep_command(index, tmp_path / "out"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _has_loaded(proc.pid, "_multiarray_umath") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, "himae-prep ended before numpy was loaded"
        proc.send_signal(sig)  # numpy is being imported: pandas, h5py, scipy... are still to come
        _, err = proc.communicate(timeout=GONE_TIMEOUT_S)
    finally:
        _kill_tree(proc, [])
    assert proc.returncode == 128 + sig and err.decode().splitlines() == [interrupted_line(sig)], err.decode()
    assert not (tmp_path / "out").exists()
