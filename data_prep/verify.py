"""`himae-prep verify OUT`: check a finished shard folder (local or s3://) against its manifest.json.

Every shard the manifest lists is listed once (existence, size), then read whole: its sha256, and
its samples parsed as format v2 and counted (and their dtype and [C, L]), against what the manifest
records. The manifest's list is checked against its plan too: each shard listed once, and exactly the
planned shards that hold segments (`planned_shards`, `empty_shards`; manifests written before those keys:
duplicates only). Each problem is one line naming the shard (or the manifest) and what differs, so a damaged
folder can be repaired by re-running himae-prep (it rebuilds exactly the shards that are wrong).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from data_prep.shard_format import (MANIFEST, Manifest, ShardFormatError, ShardInfo, parse_manifest, read_shard_blocks,
                                   shard_name)
from data_prep.storage import Folder, StorageError, redact_secrets


def _check_shard(out: Folder, m: Manifest, shard: ShardInfo, listed: dict[str, dict]) -> list[str]:
    """What is wrong with one shard (empty if nothing)."""
    info = listed.get(shard.name)
    if info is None:
        return [f"{shard.url}: missing (the manifest lists it with {shard.n_samples} samples)"]
    size = int(info.get("size") or 0)
    if size != shard.bytes:
        return [f"{shard.url}: {size} bytes, the manifest says {shard.bytes}"]
    data = out.read_bytes(shard.name, shard.bytes)
    problems = []
    sha = hashlib.sha256(data).hexdigest()
    if sha != shard.sha256:
        problems.append(f"{shard.url}: sha256 {sha[:16]}..., the manifest says {shard.sha256[:16]}... (the bytes changed)")
    n, shapes, dtypes = 0, set(), set()
    try:
        for block in read_shard_blocks(data, shard.url):
            n += len(block)
            shapes.add(tuple(block.signal.shape[1:]))
            dtypes.add(str(block.signal.dtype))
    except ShardFormatError as e:
        return problems + [f"{e} (not a readable format-v2 shard)"]
    except Exception as e:  # noqa: BLE001 (arrays that parse but do not fit together: named, the rest still checked)
        return problems + [f"{shard.url}: not a readable format-v2 shard ({type(e).__name__}: {e})"]
    if n != shard.n_samples:
        problems.append(f"{shard.url}: {n} samples, the manifest says {shard.n_samples}")
    if shapes - {(m.channels, m.length)}:
        problems.append(f"{shard.url}: segments of shape {sorted(shapes)}, the manifest says [{m.channels}, {m.length}]")
    if dtypes - {m.dtype}:
        problems.append(f"{shard.url}: dtype {sorted(dtypes)}, the manifest says {m.dtype}")
    return problems


def _plan_problems(out: Folder, m: Manifest, where: str) -> list[str]:
    """Each shard listed once, and (manifests that record their plan) exactly the planned non-empty ones."""
    problems = []
    times = Counter(s.name for shards in m.splits.values() for s in shards)
    problems += [f"{where}: {name} is listed {n} times (each shard holds other segments: once)"
                 for name, n in sorted(times.items()) if n > 1]
    for split, shards in m.splits.items():
        raw = m.raw["splits"][split]
        planned, empty = raw.get("planned_shards"), raw.get("empty_shards", [])
        if planned is None:  # written before the plan was recorded: only the duplicates above can be checked
            continue
        if (not isinstance(planned, int) or isinstance(planned, bool) or not isinstance(empty, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < planned for i in empty)
                or not 0 <= planned <= len(shards) + len(empty)):  # bounded by what is listed: no huge sets
            problems.append(f"{where}: splits.{split}: planned_shards {str(planned)[:40]} and empty_shards "
                            f"{str(empty)[:80]} do not fit its {len(shards)} listed shard(s): expected the planned "
                            f"count and the indices below it of the shards with no segment")
            continue
        expected = {shard_name(split, i) for i in range(planned)} - {shard_name(split, i) for i in empty}
        listed = {s.name for s in shards}
        problems += [f"{where}: {name} is planned but not listed" for name in sorted(expected - listed)]
        problems += [f"{where}: {name} is listed but not one of split {split!r}'s {planned} planned shards"
                     for name in sorted(listed - expected)]
        problems += [p for i in empty if (p := _empty_problem(out, shard_name(split, i), where))]
    return problems


def _empty_problem(out: Folder, name: str, where: str) -> str | None:
    """A shard the manifest calls empty (so lists not) must hold no segment: else they are lost from it."""
    if not out.exists(name):
        return None  # nothing lost
    try:
        n = sum(len(b) for b in read_shard_blocks(out.read_bytes(name), out.child_url(name)))
    except Exception:  # noqa: BLE001 (holds nothing readable: nothing the manifest leaves out)
        return None
    return f"{where}: {name} holds {n} samples, but the manifest calls it empty and does not list it" if n else None


def verify_folder(url: str, storage_options: dict | None = None, threads: int = 8) -> tuple[list[str], str]:
    """(problems, summary) for the shard folder at `url`; no problems means every shard matches its manifest."""
    out = Folder(url, storage_options)
    where = out.child_url(MANIFEST)
    if not out.exists(MANIFEST):
        return [f"{where}: does not exist (not a himae-prep output, or not finished: run himae-prep again, or "
                f"--finalize after a multi-task conversion)"], ""
    try:
        m = parse_manifest(out.read_text(MANIFEST), where)
    except UnicodeDecodeError as e:
        return [f"{where}: not UTF-8 text ({e})"], ""
    except ValueError as e:
        return [str(e)], ""
    problems = _plan_problems(out, m, where)
    for split, shards in m.splits.items():
        recorded = m.raw["splits"][split].get("n_samples")
        if recorded is not None and recorded != sum(s.n_samples for s in shards):
            problems.append(f"{where}: split {split!r} says {recorded} samples, its shards {sum(s.n_samples for s in shards)}")
    total = sum(m.n_samples(s) for s in m.splits)
    if m.raw.get("n_samples") not in (None, total):
        problems.append(f"{where}: n_samples {m.raw['n_samples']}, its splits' shards hold {total}")
    listed: dict[str, dict] = {}
    for top in sorted({s.name.split("/", 1)[0] for shards in m.splits.values() for s in shards if "/" in s.name}):
        listed.update(out.listing(top))
    shards = [s for split in m.splits.values() for s in split]
    bad = 0
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for found in pool.map(lambda s: _check_shard(out, m, s, listed), shards):
            problems.extend(found)
            bad += bool(found)
    summary = (f"{url}: {len(shards)} shard(s), {total} samples"
               + (f": {bad} shard(s) wrong" if bad else f": {len(problems)} problem(s) with the manifest itself"
                  if problems else ": all match manifest.json"))
    return problems, summary


def verify_main(argv: list[str]) -> int:
    """The `himae-prep verify` command line; returns the exit status (1 if anything is wrong)."""
    import argparse
    import sys

    from data_prep.storage import json_object

    ap = argparse.ArgumentParser(
        prog="himae-prep verify",
        description="Check a finished shard folder against its manifest.json: every listed shard exists, has the "
                    "recorded size and sha256, and holds the recorded number of samples (of the manifest's dtype "
                    "and [C, L]). Prints one line per problem and exits 1 if there is any, else 0.")
    ap.add_argument("out", metavar="OUT", help="the folder or URL (s3://bucket/prefix) holding manifest.json")
    ap.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                    help='fsspec options as a JSON object, e.g. \'{"client_kwargs": {"endpoint_url": '
                         '"http://127.0.0.1:9000"}}\' (default: none: the environment\'s credentials)')
    ap.add_argument("--threads", type=int, default=8, metavar="N",
                    help="shards read at once (default: 8); each is held in memory while it is checked")
    a = ap.parse_args(argv)
    try:
        problems, summary = verify_folder(a.out, a.storage_options, a.threads)
    except (StorageError, OSError, ValueError) as e:  # unreachable store, unknown protocol...: one line naming it
        problems, summary = [f"{a.out}: {e}" if a.out not in str(e) else str(e)], ""
    for line in problems:
        print(redact_secrets(f"himae-prep verify: {line}"), file=sys.stderr)
    if summary:
        print(redact_secrets(f"himae-prep verify: {summary}"))
    return 1 if problems else 0
