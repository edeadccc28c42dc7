"""The shard conversion job (`himae-prep`): HDF5 -> format-v2 WebDataset tar shards + manifest.json.

Rows are split by patient into train/val, globally shuffled (index_plan), cut into shards of
`--samples-per-shard` (or as many as fit in `--shard-mb`), read once file by file and spilled
(external_shuffle), then preprocessed once (preprocess.py) and written in blocks (shard_format.py).
The work splits into tasks (`--num-tasks/--task-index`, or a SLURM array) that may run on
different machines: each reads its share of the input files, and builds its shards once every
task's spill is there (so the tasks run twice); `--finalize` then verifies every shard and writes
`manifest.json`. A single-task run does both passes and finalizes by itself.

A re-run verifies finished shards (size from one listing, then the S3 ETag its upload returned, else
the sha256 of its bytes) and rebuilds only what is missing or wrong. A re-run with other options or a changed source is
refused unless `--overwrite`: the shards on disk would silently describe other data.
"""

from __future__ import annotations

import os
import signal
import sys

from data_prep.interruption import Interrupted, exit_at_once_on_signals, stop_on_signals


def interrupted_line(signum: int) -> str:
    """The one line himae-prep ends with on SIGINT/SIGTERM, whenever it comes."""
    return (f"himae-prep: interrupted by {signal.Signals(signum).name}; shards written so far are kept (each is "
            f"written under a temp name, then renamed); run the same command to resume")


if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "himae-prep":  # the CLI, not an import
    exit_at_once_on_signals(interrupted_line)

import argparse  # noqa: E402 (the handler above comes first: these imports are the slow part of starting)
import contextlib
import errno
import hashlib
import json
import multiprocessing
import shutil
import time
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, as_completed, wait
from dataclasses import asdict

from data_prep import external_shuffle as shuffle
from data_prep.conversion_plan import (ConvertParams, check_against_existing as _check_against_existing,  # noqa: F401
                                       log as _log, open_source, prepare)
from data_prep.external_shuffle import SPLITS, ReadParams, SpillLayout
from data_prep.hdf5_sources import BadSamplePolicy
from data_prep.index_plan import rows_for_files
from data_prep.parent_death import exit_with_parent
from data_prep.preprocess import CONSTANT_POLICIES, LENGTH_POLICIES, NORMALIZE
from data_prep.shard_format import (DTYPES, MANIFEST, MEMBERS, PARTS, PLAN, ShardFormatError, part_name, read_shard_blocks,
                                   shard_name)
from data_prep.shard_writer import WriteParams, write_shard
from data_prep.storage import Folder, StorageError, is_remote, json_object, redact_secrets
from data_prep.wfdb_sources import add_wfdb_options


def _verify(out: Folder, rec: dict, listed: dict[str, dict], plan_id: str) -> str | None:
    """None if the shard on storage is the one the record describes; else why not. The record's sample
    count is checked against the shard whenever its bytes are read (always for an 'empty' one, which
    the manifest leaves out); on S3 the ETag the shard's own upload returned vouches for the rest."""
    if rec.get("plan_id") != plan_id:
        return "made by another conversion"
    info = listed.get(rec["url"])
    if info is None:
        return "missing"
    if int(info.get("size") or 0) != rec["bytes"]:
        return f"size {info.get('size')} bytes, expected {rec['bytes']}"
    if out.remote and rec["n_samples"] and shard_etag_matches(rec, info.get("ETag")):
        return None
    data = out.read_bytes(rec["url"], rec["bytes"])
    if hashlib.sha256(data).hexdigest() != rec["sha256"]:
        return "sha256 mismatch"
    try:
        n = sum(len(b) for b in read_shard_blocks(data, rec["url"]))
    except ShardFormatError:
        return "unreadable shard"
    return None if n == rec["n_samples"] else f"its record says {rec['n_samples']} samples, the shard holds {n}"


def shard_etag_matches(rec: dict, listed_etag: object) -> bool:
    """Whether the store's ETag proves the object is the one `rec` describes, without reading it.

    True when it equals the ETag the shard's own PUT returned (recorded as `etag`), or, for records
    without one, the md5 of its bytes. Any other ETag proves nothing: on SSE-KMS/SSE-C buckets a
    single-part ETag is 32 hex digits but not the md5, and a multipart one is not an md5 at all;
    then the caller reads the object and compares its sha256.
    """
    etag = str(listed_etag or "").strip('"')
    return bool(etag) and etag in (rec.get("etag"), rec.get("md5"))


_RECORD_FIELDS = {"url": str, "bytes": int, "sha256": str, "n_samples": int, "skipped": dict, "noted": dict}


def _verified_records(out: Folder, shards: list[tuple[str, int]], plan_id: str) -> tuple[dict, dict]:
    """List `_parts/` and the shard folders once; read and verify the records of `shards` in parallel."""
    parts = out.listing(PARTS)
    listed = {**out.listing("train"), **out.listing("val")}
    good, bad = {}, {}

    def check(sh: tuple[str, int]) -> tuple[tuple[str, int], dict | None, str]:
        name = part_name(*sh)
        if name not in parts:
            return sh, None, "no record"
        try:
            rec = json.loads(out.read_text(name))
            fields_ok = all(isinstance(rec[k], t) and not isinstance(rec[k], bool) for k, t in _RECORD_FIELDS.items())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            fields_ok = False
        if not fields_ok or rec["n_samples"] < 0 or rec["bytes"] < 0:
            return sh, None, "unreadable record"  # rebuilt like a missing one
        if (rec.get("split"), rec.get("index"), rec["url"]) != (*sh, shard_name(*sh)):
            return sh, None, f"its record names {rec['url']!r}"  # never trusted for what it claims: rebuilt
        why = _verify(out, rec, listed, plan_id)
        return sh, (rec if why is None else None), why or ""

    with ThreadPoolExecutor(16) as pool:
        for sh, rec, why in pool.map(check, shards):
            (good.__setitem__(sh, rec) if rec is not None else bad.__setitem__(sh, why))
    return good, bad


def run_task(source, p: ConvertParams, prep: dict | None = None) -> dict:
    """Build (or verify) this task's shards. Returns {(split, i): record}."""
    p.validate()
    prep = prep or prepare(source, p)
    record, layout = prep["record"], prep["layout"]
    out = Folder(p.out, p.storage_options, create=True)
    tmp_prefix = f".tmp-t{p.task_index}-"
    if (n := out.clean_temp_files(tmp_prefix) + shuffle.clean_temp_files(layout, p.task_index)):
        _log(f"removed {n} orphaned temp file(s) of a killed run")
    _check_against_existing(out, record, p.overwrite)
    out.write_text(PLAN, json.dumps(record, indent=2, sort_keys=True), tmp_prefix)
    mine = [sh for g in layout.task_groups(p.task_index) for sh in layout.shards_of(*g)]
    done, bad = _verified_records(out, mine, record["plan_id"])
    rebuilt = {sh: why for sh, why in bad.items() if why != "no record"}
    if done or rebuilt:
        _log(f"task {p.task_index}/{p.num_tasks}: {len(done)} of {len(mine)} shards verified"
             + (f"; rebuilding {len(rebuilt)}: " + ", ".join(f"{s}/{i} ({w})" for (s, i), w in list(rebuilt.items())[:5])
                if rebuilt else ""))
    todo = [sh for sh in mine if sh not in done]
    def finished() -> bool:
        return out.exists(MANIFEST) and json.loads(out.read_text(MANIFEST)).get("plan_id") == record["plan_id"]

    rp = ReadParams(source.reader(), prep["channels"], prep["preprocess"].fit_length, p.on_bad, p.storage_options)
    if todo or (p.num_tasks > 1 and not finished()):  # the other tasks' shards need this task's spill too
        _spill(source, prep, rp, p)
    if not todo:
        return done
    waiting = shuffle.missing_waves(prep["file_rows"], layout)
    if waiting:
        _log(f"task {p.task_index} of {p.num_tasks} spilled its input files; tasks {sorted(waiting)} have not yet, "
             f"so its {len(todo)} shard(s) wait: run the tasks again once every task has finished "
             f"(each then builds its shards from {layout.root}), then --finalize")
        return done
    wp = WriteParams(p.out, p.storage_options, source.kind, _signal_keys(p), prep["channels"], prep["preprocess"],
                     p.dtype, p.block_size, p.on_bad, record["plan_id"], tmp_prefix)
    _write(layout, todo, wp, p, done, prep["plan"])
    return done


def _signal_keys(p: ConvertParams) -> tuple[str, ...]:
    return tuple(k.strip() for k in p.signal_key.split("+"))


# Tests only: seconds a pool worker sleeps before each wave it reads and each shard it writes, so a test
# can signal the job mid-run.
TEST_SHARD_DELAY_ENV = "HIMAE_TEST_SHARD_DELAY_S"


def _init_pool_worker(parent_pid: int) -> None:
    """Pool worker setup: die with the parent, leave SIGINT/SIGTERM handling to it.

    A worker blocks on the call queue forever once its parent is gone (it holds the queue's write
    end itself), so the kernel SIGKILLs it when the parent dies (PR_SET_PDEATHSIG). A parent that
    died before prctl took effect is caught by comparing with the pid the parent passed in. Forked
    workers inherit the parent's Python signal handlers: SIGTERM goes back to the default (die),
    SIGINT is ignored (a terminal's Ctrl-C reaches the whole process group; the parent stops us).
    """
    exit_with_parent(parent=parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _spill_in_worker(task: int, wave: int, files: list[str], rows, layout: SpillLayout, rp: ReadParams) -> int:
    """Pass 1 of one wave as a pool worker runs it (the test delay is read here, never in the parent)."""
    delay = float(os.environ.get(TEST_SHARD_DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)
    return shuffle.spill_wave(task, wave, files, rows, layout, rp)


def _write_group(split: str, group: int, shards: list[int], layout: SpillLayout, wp: WriteParams) -> list[dict]:
    """Pass 2 of one group: load its spill, write the given shards of it; their records."""
    delay = float(os.environ.get(TEST_SHARD_DELAY_ENV) or 0)
    loaded = shuffle.load_group(layout, split, group)
    records = []
    for i in shards:
        if delay > 0:
            time.sleep(delay)
        want = min(layout.samples_per_shard, layout.n_split[SPLITS.index(split)] - i * layout.samples_per_shard)
        have = loaded[i][2]["rows"] if i in loaded else 0  # every planned shard has rows: none is an error
        if have != want:
            raise ValueError(f"spill {layout.root}: shard {split}/{i} has {have} of its {want} planned rows; "
                             f"the spill is incomplete (removed by hand?): delete {layout.root} and run again")
        rows, segs, counts = loaded[i]
        policy = BadSamplePolicy(wp.on_bad, Counter(counts["skipped"]), Counter(counts["noted"]))
        records.append(write_shard(split, i, rows, segs, counts["rows"], policy, wp))
    return records


def _shard_pool(workers: int) -> ProcessPoolExecutor:
    """The worker pool, its processes forked by the thread that first calls submit().

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so that thread must
    outlive the pool. CPython 3.11 (concurrent/futures/process.py): with the "fork" start method,
    `submit()` -> `_start_executor_manager_thread()` -> `_launch_processes()` forks all
    `max_workers` processes at once, in the thread calling the first submit() (here the main
    thread, which lives for the whole job), before the manager thread starts. The manager thread
    forks only in `_adjust_process_count()` after a worker exits on `max_tasks_per_child`, which
    is refused with fork (ValueError) and not used here; a worker that dies breaks the pool
    instead of being replaced. Under "spawn"/"forkserver" submit() spawns lazily and, with
    forkserver (the default from 3.14), the workers are the forkserver's children, not ours; so
    the start method is pinned to fork on Linux (where prctl exists).
    """
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool_worker, initargs=(os.getpid(),))


def _kill_pool_workers(pool: ProcessPoolExecutor) -> None:
    """SIGKILL the pool's workers: on an interrupt, waiting for their shards could take minutes.
    What they were writing is a temp file; the next run of the task removes it. (3.14 has
    `kill_workers()`; before, the pool's processes are only in `_processes`.)"""
    if hasattr(pool, "kill_workers"):
        pool.kill_workers()
        return
    procs = list(getattr(pool, "_processes", {}).values())
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.join(5)


def _in_pool(p: ConvertParams, jobs, fn, on_result) -> None:
    """Run fn(*job) for each job, in --workers processes (or inline), at most `workers` ahead of
    the results; on_result(result) in this process as each finishes."""
    with _shard_pool(p.workers) if p.workers > 1 else _Inline() as pool:
        futures: set = set()
        try:
            for job in jobs:
                futures.add(pool.submit(fn, *job))
                while len(futures) >= p.workers:
                    finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                    for f in finished:
                        on_result(f.result())
            for f in as_completed(futures):
                on_result(f.result())
        except (Interrupted, KeyboardInterrupt):
            # Kill rather than wait: the pool's __exit__ would wait for the running jobs. No cancel()
            # first: 3.11's manager thread then fails the pending futures itself (BrokenProcessPool),
            # and crashes with InvalidStateError on any future already cancelled.
            if p.workers > 1:
                _kill_pool_workers(pool)
            raise
        except BaseException:
            for f in futures:  # stop at the first error
                f.cancel()
            raise


def _spill(source, prep: dict, rp: ReadParams, p: ConvertParams) -> None:
    """Pass 1 for this task's waves without a marker: each reads its files once and spills their rows."""
    from tqdm import tqdm

    layout, plan = prep["layout"], prep["plan"]
    waves = shuffle.task_waves(prep["file_rows"], layout, p.task_index)
    todo = [w for w in range(len(waves)) if not layout.marker(p.task_index, w).exists()]
    if not todo:
        return
    rows_todo = sum(prep["file_rows"][f] for w in todo for f in waves[w])
    # every task spills to the same disk: check for what all of them still have to spill
    need = 0
    for t, ws in shuffle.missing_waves(prep["file_rows"], layout).items():
        of_t = shuffle.task_waves(prep["file_rows"], layout, t)
        need += sum(prep["file_rows"][f] for w in ws for f in of_t[w])
    shuffle.check_disk(layout, need)
    _log(f"pass 1: reading {sum(len(waves[w]) for w in todo)} input file(s) once ({rows_todo} rows, "
         f"{len(todo)} wave(s)), spilling to {layout.root}")

    def jobs():
        for b in range(0, len(todo), p.workers):  # one index pass per batch of `workers` waves
            batch = todo[b:b + p.workers]
            rows = rows_for_files(source, plan, {f for w in batch for f in waves[w]})
            for w in batch:
                yield p.task_index, w, waves[w], rows[rows["path"].isin(set(waves[w]))], layout, rp.for_files(waves[w])

    fn = _spill_in_worker if p.workers > 1 else shuffle.spill_wave
    with tqdm(total=rows_todo, unit="row", unit_scale=True, desc="himae-prep read", disable=None) as bar:
        _in_pool(p, jobs(), fn, lambda n: bar.update(n))


def _write(layout: SpillLayout, todo: list[tuple[str, int]], wp: WriteParams, p: ConvertParams, done: dict,
           plan) -> None:
    """Pass 2: the shards in `todo`, group by group, from the spill."""
    from tqdm import tqdm

    by_group: dict = {}
    for s, i in todo:
        by_group.setdefault(layout.group_of(s, i), []).append(i)
    sps = plan.samples_per_shard
    total = sum(min(sps, plan.n_split[s] - i * sps) for s, i in todo)
    jobs = [(s, g, shards, layout, wp) for (s, g), shards in sorted(by_group.items())]
    fn = _write_group
    with tqdm(total=total, unit="seg", unit_scale=True, desc="himae-prep write", disable=None, smoothing=0.1) as bar:
        def got(records: list[dict]) -> None:
            for rec in records:
                done[(rec["split"], rec["index"])] = rec
                bar.update(rec["n_rows"])

        _in_pool(p, jobs, fn, got)


class _Inline:
    """ProcessPoolExecutor's submit/as_completed interface, run in this process (workers=1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut


def finalize(source, p: ConvertParams, prep: dict | None = None, known: dict | None = None) -> dict:
    """Verify every shard of the plan and write manifest.json (last)."""
    prep = prep or prepare(source, p)
    record, plan, pre = prep["record"], prep["plan"], prep["preprocess"]
    out = Folder(p.out, p.storage_options, create=True)
    _check_against_existing(out, record, p.overwrite)
    known = dict(known or {})
    rest = [sh for sh in plan.all_shards() if sh not in known]
    good, bad = _verified_records(out, rest, record["plan_id"]) if rest else ({}, {})
    layout = prep["layout"]
    if bad:
        tasks = sorted({layout.task_of_group(*layout.group_of(*sh)) for sh in bad})
        sample = ", ".join(f"{s}/{i} ({w})" for (s, i), w in list(bad.items())[:5])
        unread = shuffle.missing_waves(prep["file_rows"], layout) if any(w == "no record" for w in bad.values()) else {}
        why = (f"; task(s) {sorted(unread)} have not read their input files yet, and every task's shards need them: "
               f"run every task again" if unread else f"; re-run task(s) {tasks}")
        raise ValueError(f"{out.url}: {len(bad)} shard(s) not finished or not intact: {sample}{why} "
                         f"of --num-tasks={p.num_tasks}, then --finalize")
    records = {**known, **good}
    stale = set(out.listing("train")) | set(out.listing("val"))
    stale -= {r["url"] for r in records.values()}
    for name in sorted(stale):
        out.remove(name)
    skipped: Counter = Counter(record["skipped_at_plan"])
    noted: Counter = Counter()
    splits = {}
    for split in ("train", "val"):
        recs = [records[(split, i)] for i in range(plan.n_shards(split))]
        for r in recs:
            skipped.update(r["skipped"])
            noted.update(r["noted"])
        splits[split] = {
            "n_samples": sum(r["n_samples"] for r in recs),
            "shards": [{k: r[k] for k in ("url", "n_samples", "bytes", "sha256")} for r in recs if r["n_samples"]],
            "planned_shards": len(recs),  # what `himae-prep verify` checks the list against
            "empty_shards": [i for i, r in enumerate(recs) if not r["n_samples"]],  # every row skipped: not listed
        }
    n = splits["train"]["n_samples"] + splits["val"]["n_samples"]
    if splits["train"]["n_samples"] == 0:
        raise ValueError(f"no usable training samples in {source.url} (skipped: {dict(skipped)})")
    manifest = {
        **{k: record[k] for k in ("format", "kind", "options", "source", "channels", "length_inferred_from",
                                  "preprocess", "n_rows", "split", "plan_id") + (("wfdb",) if "wfdb" in record else ())},
        "length": pre.output_length(), "dtype": p.dtype, "block_size": p.block_size, "members": MEMBERS, "on_bad": p.on_bad,
        "n_samples": n, "splits": splits, "skipped": dict(skipped), "noted": dict(noted),
    }
    out.write_text(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    # the spill (of any layout: an earlier --max-rows too) and the index copy are done with
    shutil.rmtree(p.spill_home(), ignore_errors=True)
    if p.spill_dir is None:
        with contextlib.suppress(OSError):
            os.rmdir(p.spill_base())  # the default <out>/.spill, if empty; a user's --spill-dir stays
    _log(f"{n} samples ({splits['train']['n_samples']} train, {splits['val']['n_samples']} val) of "
         f"[{record['channels']}, {manifest['length']}] {p.dtype} in {len(splits['train']['shards'])} + "
         f"{len(splits['val']['shards'])} shards -> {out.url}/{MANIFEST}" + (f"; skipped {dict(skipped)}" if skipped else ""))
    return manifest


def convert(index: str | None, downstream: str | None, p: ConvertParams, finalize_only: bool = False,
            wfdb: str | None = None) -> dict | None:
    """Run this task, and finalize when it is the only one. Returns the manifest when written."""
    p.validate()
    source = open_source(index, downstream, p, wfdb)
    prep = prepare(source, p)
    if finalize_only:
        return finalize(source, p, prep)
    done = run_task(source, p, prep)
    if p.num_tasks == 1:
        return finalize(source, p, prep, known=done)
    layout = prep["layout"]
    if len(done) == sum(len(layout.shards_of(*g)) for g in layout.task_groups(p.task_index)):
        _log(f"task {p.task_index} of {p.num_tasks} finished its shards; run --finalize once every task has")
    return None


def convert_pretrain(index_csv: str, p: ConvertParams) -> dict:
    return convert(index_csv, None, p)


def convert_downstream(h5_path: str, signal_key: str, p: ConvertParams) -> dict:
    return convert(None, h5_path, ConvertParams(**{**asdict(p), "signal_key": signal_key}))


def convert_wfdb(root: str, p: ConvertParams) -> dict:
    """WFDB records (a folder, a RECORDS file or an s3:// prefix) -> pretraining shards."""
    return convert(None, None, p, wfdb=root)


def _slurm_task(num_tasks: int | None) -> tuple[int | None, int | None]:
    """(task index, task count) from a SLURM array: the index is the array id itself, so re-submitting
    one failed task (`--array=7`) redoes task 7. The count comes from --num-tasks, or from the array
    only when it is a whole 0..N-1 array."""
    tid = os.environ.get("SLURM_ARRAY_TASK_ID")
    if tid is None:
        return None, None
    if num_tasks is None:
        env = {k: os.environ.get(f"SLURM_ARRAY_TASK_{k}") for k in ("MIN", "MAX", "COUNT")}
        if env["MIN"] != "0" or env["COUNT"] is None or env["MAX"] is None or int(env["MAX"]) + 1 != int(env["COUNT"]):
            raise ValueError(f"SLURM array task {tid} of a partial array ({env}): pass --num-tasks with the "
                             f"task count of the whole conversion")
        num_tasks = int(env["COUNT"])
    return int(tid), num_tasks


EPILOG = """\
other commands:
  himae-prep label DIR --out FILE.h5 [--channel ..] [--label-symbols V] ...
                        WFDB records with beat annotations -> the labelled HDF5 himae-probe reads
                        (himae-prep label --help)
  himae-prep verify OUT [--storage-options JSON]
                        check a finished folder (local or s3://) against its manifest.json:
                        one line per missing, resized or changed shard; exit 1 if any

examples:
  himae-prep --index cohort/index.csv --out shards/ --dry-run
  himae-prep --index cohort/index.csv --out shards/ --workers 8
  himae-prep --downstream pvc.h5 --signal-key ppg+ecg --out pvc_shards/
  himae-prep verify shards/
  himae-prep --wfdb physionet/bidmc --channel II --window-s 10 --stride-s 2 --target-rate 100 --out ecg_shards/
  himae-prep label physionet/mitdb --channel MLII,V5 --target-rate 100 --subject-map subjects.csv --out mitdb.h5
"""


def build_parser() -> argparse.ArgumentParser:
    """himae-prep's options: every one says what it does, its choices and its default."""
    ap = argparse.ArgumentParser(prog="himae-prep", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--index", metavar="CSV",
                     help="pretraining index: a CSV with columns local_path,global_idx[,patient_id] (one row a "
                          "segment: its HDF5 file, relative to the CSV's folder or absolute or s3://, and its "
                          "group name, verbatim), local or s3://; give this or --downstream")
    src.add_argument("--downstream", metavar="H5",
                     help="labelled HDF5 with /ppg and/or /ecg [N, L], /labels [N] of 0/1 and optional "
                          "/patient_ids [N]; give this, --index or --wfdb")
    src.add_argument("--wfdb", metavar="DIR_OR_URL",
                     help="PhysioNet WFDB records: a folder (its RECORDS file, else every .hea), a RECORDS file or "
                          "an s3:// prefix; one row per --window-s window of the --channel, cut at the record's "
                          "rate, then resampled to --target-rate and normalised like any segment")
    ap.add_argument("--signal-key", default="ppg", metavar="KEYS",
                    help="with --downstream: the signal dataset(s), ppg, ecg, or ppg+ecg for two channels "
                         "(default: ppg)")
    add_wfdb_options(ap)
    ap.add_argument("--out", required=True, metavar="DIR_OR_URL",
                    help="output folder or URL (s3://bucket/prefix); a re-run with the same options resumes it")
    ap.add_argument("--dry-run", action="store_true",
                    help="plan, convert a small timed sample in a temp folder, print rows, shards, bytes and the "
                         "estimated time, and stop: nothing is written to --out (default: off)")
    ap.add_argument("--samples-per-shard", type=int, default=None, metavar="N",
                    help="segments per shard, an integer >= 1 (default: as many as fit in --shard-mb)")
    ap.add_argument("--shard-mb", type=float, default=32.0, metavar="MB",
                    help="target shard size in MB when --samples-per-shard is not given: tens of MB suit object "
                         "storage (one GET each); outputs of earlier versions used --samples-per-shard 1000 "
                         "(default: 32)")
    ap.add_argument("--block-size", type=int, default=256, metavar="N",
                    help="segments per tar member (one .npy block; the loader's unit of reading) (default: 256)")
    ap.add_argument("--dtype", choices=DTYPES, default="float16",
                    help="stored sample dtype: float16 (half the bytes; fits min-max scaled data) or float32 "
                         "(exact; for --normalize none with values beyond 65504) (default: float16)")
    ap.add_argument("--length", type=int, default=None, metavar="SAMPLES",
                    help="expected input segment length (default: the length most of a seeded sample of rows have)")
    ap.add_argument("--length-policy", choices=LENGTH_POLICIES, default="strict",
                    help="segments of other lengths: strict = a bad row; crop = keep the first --length samples "
                         "of longer ones; crop-pad = also pad short ones by repeating the last sample "
                         "(default: strict)")
    ap.add_argument("--normalize", choices=NORMALIZE, default="minmax",
                    help="minmax = each segment's channels scaled to [-1, 1] (as the seed does); none = values as "
                         "they are (default: minmax)")
    ap.add_argument("--source-rate", type=float, default=None, metavar="HZ",
                    help="input sampling rate in Hz (default: unknown; needed with --target-rate)")
    ap.add_argument("--target-rate", type=float, default=None, metavar="HZ",
                    help="resample to this rate in Hz (polyphase) (default: no resampling)")
    ap.add_argument("--constant", choices=CONSTANT_POLICIES, default="drop",
                    help="flat-line segments (a constant channel): drop = drop and count them; keep = keep them "
                         "(a constant channel becomes 0 under minmax) (default: drop)")
    ap.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                    help="fraction of rows held out for validation, in [0, 1): whole patients when the source "
                         "has patient ids, else a seeded hash of the key (default: 0.05)")
    ap.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the split and the global shuffle (default: 0)")
    ap.add_argument("--on-bad", choices=["error", "skip"], default="error",
                    help="a bad row (missing/unreadable file or key, wrong length, NaN/inf, duplicate key): "
                         "error = stop with a line naming it; skip = skip it and count it in the manifest's "
                         "'skipped' (default: error)")
    ap.add_argument("--workers", type=int, default=1, metavar="N",
                    help="processes reading files and building shards in parallel (default: 1)")
    ap.add_argument("--num-tasks", type=int, default=None, metavar="N",
                    help="independent tasks sharing the conversion, e.g. a SLURM array (default: the SLURM "
                         "array's task count when it is a whole 0..N-1 array, else 1)")
    ap.add_argument("--task-index", type=int, default=None, metavar="I",
                    help="this task, in [0, --num-tasks) (default: SLURM_ARRAY_TASK_ID, else 0)")
    ap.add_argument("--finalize", action="store_true",
                    help="after a multi-task conversion: verify every task's shards and write manifest.json "
                         "(default: off; a single task finalizes by itself)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace shards made with other options or from another source (default: off: refused)")
    ap.add_argument("--max-rows", type=int, default=2_000_000, metavar="N",
                    help="index rows of one wave of input files (each worker holds one wave at a time, and this "
                         "process the rows of up to two waves per worker) (default: 2000000)")
    ap.add_argument("--spill-dir", default=None, metavar="DIR",
                    help="local folder for the rows between the read pass and the write pass, about rows x "
                         "(C x L x 4 + 40 + 4 x key length) bytes (default: <out>/.spill for a local --out, else "
                         "the temp folder; with --num-tasks > 1, a folder every task can read)")
    ap.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                    help='fsspec options as a JSON object, e.g. \'{"client_kwargs": {"endpoint_url": '
                         '"http://127.0.0.1:9000"}}\' (default: none: the environment\'s credentials)')
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["label"]:
        from data_prep.wfdb_label import label_main

        with stop_on_signals():
            try:
                status = label_main(argv[1:])
            except Interrupted as e:  # label's temp file and folder are gone by now (finally blocks)
                print(f"himae-prep label: interrupted by {signal.Signals(e.signum).name}; no partial file is left",
                      file=sys.stderr, flush=True)
                status = 128 + e.signum
        sys.exit(status)
    if argv[:1] == ["verify"]:  # a subcommand; every other first word keeps its old meaning (flags)
        from data_prep.verify import verify_main

        with stop_on_signals():
            try:
                status = verify_main(argv[1:])
            except Interrupted as e:
                print(interrupted_line(e.signum).split(";")[0], file=sys.stderr, flush=True)
                status = 128 + e.signum
        sys.exit(status)
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        s_idx, s_cnt = _slurm_task(a.num_tasks) if a.task_index is None else (None, None)
    except ValueError as e:
        sys.exit(redact_secrets(f"himae-prep: error: {e}"))
    num_tasks = a.num_tasks if a.num_tasks is not None else (s_cnt or 1)
    task_index = a.task_index if a.task_index is not None else (s_idx or 0)
    p = ConvertParams(
        a.out, a.samples_per_shard, a.block_size, a.dtype, a.length, a.length_policy, a.normalize, a.source_rate,
        a.target_rate, a.constant, a.val_fraction, a.seed, a.on_bad, a.workers, num_tasks, task_index, a.overwrite,
        a.max_rows, a.storage_options, a.signal_key, a.spill_dir, a.shard_mb, a.channel, a.window_s, a.stride_s,
        a.subject_map,
    )
    if a.wfdb is not None and not a.channel:
        ap.error("--wfdb needs --channel (a signal name, e.g. MLII,V5 or PLETH)")
    if a.wfdb is None and (a.channel or a.subject_map or a.stride_s is not None):
        ap.error("--channel, --stride-s and --subject-map go with --wfdb")
    try:
        with stop_on_signals():
            if a.dry_run:
                from data_prep.dry_run import dry_run

                dry_run(a.index, a.downstream, p, wfdb=a.wfdb)
            else:
                convert(a.index, a.downstream, p, finalize_only=a.finalize, wfdb=a.wfdb)
    except Interrupted as e:
        print(interrupted_line(e.signum), file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except BrokenProcessPool as e:
        sys.exit(f"himae-prep: error: a worker process died ({e}; killed, or out of memory?); what was finished is "
                 f"kept: run the same command to resume (with fewer --workers if memory ran out)")
    except OSError as e:
        sys.exit(redact_secrets(f"himae-prep: error: {disk_full_line(e, p) if e.errno in (errno.ENOSPC, errno.EDQUOT) else e}"))
    except (ValueError, KeyError, StorageError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(redact_secrets(f"himae-prep: error: {msg}"))


def disk_full_line(e: OSError, p: ConvertParams) -> str:
    """A full disk (or quota) as one line: which file if the error says, and the free space where
    himae-prep writes (the spill between the passes and --out), since either may be the full one."""

    def free(path: str) -> str:
        if is_remote(path):
            return "remote"
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        return f"{shutil.disk_usage(existing).free / 2**30:.2f} GiB free"

    what = f" writing {e.filename}" if e.filename else ""
    return (f"no space left on the device{what} ({e.strerror}); the spill folder {p.spill_base()} (--spill-dir): "
            f"{free(p.spill_base())}, --out {p.out}: {free(p.out)}. Free space or pick another --spill-dir/--out, "
            f"then run the same command to resume (finished shards are kept)")


if __name__ == "__main__":
    main()
