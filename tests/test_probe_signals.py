"""Stopping himae-probe while its fold workers run: SIGKILL takes the workers with it (none is left
holding the caller's stdout), SIGTERM and SIGINT end it with one line and exit 128 + the signal."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from probes.evaluate import interrupted_line
from probes.nested_cv import TEST_FOLD_HOLD_ENV
from tests.proc_tree import wait_gone

pytestmark = pytest.mark.slow


def _marked(mark: str) -> list[psutil.Process]:
    """Every live process started with this environment marker (found after their parent is gone too)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("HIMAE_TEST_MARK") == mark and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _a_worker_started(pid: int) -> bool:
    """A loky worker (not only its resource tracker) is among the probe's children."""
    try:
        return any("popen_loky" in " ".join(c.cmdline()) for c in psutil.Process(pid).children())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def test_a_probe_killed_as_its_workers_start_leaves_none(tiny_cohort, tmp_path):
    """Killed while loky is still starting its workers (before any fold runs): each ties itself to the
    probe as it starts, and one that starts after the probe died ends at once."""
    mark = f"early-{os.getpid()}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "probes.evaluate", "--random-baselines", "1", "--h5", str(tiny_cohort / "downstream.h5"),
           "--out", str(tmp_path / "res"), "--folds", "2", "--inner-folds", "2", "--n-boot", "0",
           "--minirocket-kernels", "0", "--no-plots"]
    proc = subprocess.Popen(cmd, env={**os.environ, "HIMAE_TEST_MARK": mark, TEST_FOLD_HOLD_ENV: str(tmp_path),
                                      "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _a_worker_started(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the probe ended before it started workers"
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 15
        while (left := _marked(mark)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, [p.cmdline() for p in left]
    finally:
        for p in _marked(mark):
            p.kill()
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stopped_probe_leaves_no_worker_and_says_one_line(tiny_cohort, tmp_path, sig):
    hold = tmp_path / "hold"
    hold.mkdir()
    cmd = [sys.executable, "-m", "probes.evaluate", "--random-baselines", "1", "--h5", str(tiny_cohort / "downstream.h5"),
           "--out", str(tmp_path / "res"), "--folds", "2", "--inner-folds", "2", "--n-boot", "0",
           "--minirocket-kernels", "0", "--no-plots"]
    proc = subprocess.Popen(cmd, env={**os.environ, TEST_FOLD_HOLD_ENV: str(hold), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 120
        while len(list(hold.iterdir())) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and len(list(hold.iterdir())) == 2, proc.stderr.read()[-3000:] if proc.poll() else ""
        seen = psutil.Process(proc.pid).children(recursive=True)  # the 2 workers and loky's resource tracker(s)
        assert {int(p.name) for p in hold.iterdir()} <= {p.pid for p in seen}
        # loky's resource tracker shares our stderr and outlives the probe by a moment: its cleanup warnings
        # ("leaked semlock objects", once in a CI run) would follow the one line; it starts with them off
        trackers = [p for p in seen if "resource_tracker" in " ".join(p.cmdline())]
        assert trackers and all("-Wignore::UserWarning:joblib.externals.loky.backend.resource_tracker"
                                in p.cmdline() for p in trackers)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert not wait_gone(seen, 15), "fold workers outlived the probe"
        if sig != signal.SIGKILL:
            assert proc.returncode == 128 + sig and "Traceback" not in err, err[-3000:]
            assert err.strip().splitlines()[-1] == interrupted_line(sig), err[-3000:]
    finally:
        for p in [*seen, proc]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.wait(10)


@pytest.mark.parametrize("quiet", [False, True], ids=["as-loky-starts-it", "as-the-probe-starts-it"])
def test_the_resource_trackers_cleanup_note_is_off_even_under_a_users_w_flag(quiet):
    """The tracker's "leaked semlock" note at shutdown (what followed the interrupted line): a semaphore
    registered and never unregistered, as a killed worker leaves it; `-W default` as a user might run."""
    code = ("import probes.nested_cv as n\n" + ("n._quiet_loky_tracker()\n" if quiet else "")
            + "from joblib.externals.loky.backend import resource_tracker\n"
            + "resource_tracker.register('/himae-test-never-made', 'semlock')\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("leaked semlock" in proc.stderr) is not quiet, proc.stderr[-2000:]  # the control shows the note

