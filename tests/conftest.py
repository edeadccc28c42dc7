"""Shared fixtures: a tiny synthetic cohort, its converted shards, and the seed reference folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton kernels run on CPU tensors through the interpreter in these tests. It must be set before
# any kernel module is imported (triton.jit reads it at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

SEED_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "seed_reference"


def pytest_collection_modifyitems(config, items):
    """Multi-process (`slow`) tests first, in file order: the longest jobs start first, so neither xdist
    worker is left alone with a long launch at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


@pytest.fixture(scope="session", autouse=True)
def _children_use_session_tmpdir(tmp_path_factory):
    """What launched processes leave in the temp folder (torchrun's `torchelastic_*` log folders, which it
    never removes; `pymp-*` folders of killed workers) lands in pytest's basetemp, not in /tmp. Only where
    the folder is short: children put AF_UNIX sockets under it (TMPDIR/pymp-xxxxxxxx/listener-xxxxxxxx,
    34 more bytes), and a socket path must fit in 107 bytes."""
    tmp = tmp_path_factory.mktemp("t")  # (pytest-of-<user>/pytest-N/popen-gwK/t0)
    if len(str(tmp)) <= 64:
        os.environ["TMPDIR"] = str(tmp)


@pytest.fixture(scope="session", autouse=True)
def _probe_pool_stops_with_the_session():
    """joblib's reusable loky workers (the probe's parallel outer folds) stop at their parent's normal exit.
    An xdist worker process may end without that exit hook, and they would outlive the session by up to
    loky's 300 s idle timeout: stop them here."""
    yield
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    if loky is not None and loky._executor is not None:
        loky._executor.shutdown(wait=True, kill_workers=True)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    from data_prep.synth_cohort import generate

    out = tmp_path_factory.mktemp("cohort")
    generate(out, scale=0.01, seed=3, segments_per_shard=200)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_cohort, tmp_path_factory) -> Path:
    from data_prep.convert import ConvertParams, convert_pretrain

    out = tmp_path_factory.mktemp("shards")
    convert_pretrain(str(tiny_cohort / "pretrain_index.csv"), ConvertParams(str(out), samples_per_shard=64))
    return out


@pytest.fixture(scope="session")
def one_node_run(tiny_shards, tmp_path_factory) -> Path:
    """The uninterrupted 1 x 2 trainer run (tests.test_train_resume.TWO_NODE_ARGS) that restarted, preempted
    and 2-node runs must equal bitwise; made once for every test file that compares with it."""
    from tests.test_train_distributed import _run_trainer
    from tests.test_train_resume import TWO_NODE_ARGS, _ok

    out = tmp_path_factory.mktemp("1x2")
    _ok(_run_trainer(tiny_shards, out, TWO_NODE_ARGS))
    return out


@pytest.fixture
def seed_reference() -> Path:
    if not SEED_REFERENCE.is_dir():
        pytest.skip(f"seed reference material not found at {SEED_REFERENCE} (only beside a project checkout)")
    return SEED_REFERENCE
