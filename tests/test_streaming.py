"""The block loader: equal batch counts, exact continuation, patient mix, faults."""

import json
from collections import Counter
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.convert import ConvertParams, convert_pretrain
from data_prep.shard_format import read_shard_blocks
from himae_dist.streaming import (DataLostError, LoaderState, StreamProgress, check_shards, load_manifest, make_loader,
                                  reader_shards)
from tests.h5_inputs import random_index as _random_index


def _take(m, n, **kw):
    loader, _ = make_loader(m, **{"batch_size": 16, "seed": 1, **kw})
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x["signal"], y["signal"]) and list(x["key"]) == list(y["key"])
                                    for x, y in zip(a, b))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """5 train shards of uneven size (47 rows per shard over 212 train rows)."""
    d = tmp_path_factory.mktemp("uneven")
    index = _random_index(d, n=230, patients=10)
    convert_pretrain(str(index), ConvertParams(str(d / "o"), samples_per_shard=47, block_size=10, val_fraction=0.1))
    return load_manifest(str(d / "o"))


def test_batches_have_the_stored_dtype_and_shape(tiny_shards):
    m = load_manifest(str(tiny_shards))
    b = _take(m, 3 * m.n_samples() // 16)  # three epochs' worth, endless
    assert all(x["signal"].shape == (16, 1, 250) and x["signal"].dtype == torch.float16 for x in b)
    assert all(len(x["key"]) == 16 and x["shard"].dtype == torch.int32 for x in b)


@pytest.mark.parametrize("world", [2, 3, 7])
def test_every_rank_gets_the_same_number_of_batches_over_uneven_and_too_few_shards(uneven, world):
    """7 readers over 5 shards: each rank's share of an epoch is below one micro-batch's worth of shards."""
    sizes = [s.n_samples for s in uneven.shards()]
    assert len(set(sizes)) > 1 and len(sizes) < 7
    per_rank = [_take(uneven, 40, rank=r, world_size=world, batch_size=32) for r in range(world)]
    assert [len(b) for b in per_rank] == [40] * world
    seen = Counter(str(k) for b in per_rank for x in b for k in x["key"])
    train_keys = set()
    for s in uneven.shards():
        for blk in read_shard_blocks(Path(s.url).read_bytes(), s.url):
            train_keys |= {str(k) for k in blk.key}
    assert set(seen) == train_keys  # every training sample reached, nothing else
    counts = np.array(list(seen.values()))
    assert counts.max() - counts.min() <= 2 + counts.mean() * 0.5  # roughly equal visits


def test_readers_partition_each_epoch_of_shards():
    n, R = 10, 3
    first = [list(np.array(list(zip(range(n), reader_shards(n, r, R, 5))))[:, 1]) for r in range(R)]
    got = sorted(x for r in range(R) for x in first[r][: (n - r + R - 1) // R])
    assert got == list(range(n))  # the first epoch is split exactly between the readers


@pytest.mark.parametrize("workers", [0, 2])
def test_continuing_from_a_state_gives_exactly_the_same_stream(uneven, workers):
    full = _take(uneven, 60, num_workers=workers, rank=1, world_size=2)
    _, state = make_loader(uneven, 16, seed=1, num_workers=workers, rank=1, world_size=2)
    rest = _take(uneven, 35, num_workers=workers, rank=1, world_size=2, state=replace(state, batches=25).to_dict())
    assert all(torch.equal(a["signal"], b["signal"]) and list(a["key"]) == list(b["key"]) for a, b in zip(full[25:], rest))


def test_a_state_from_another_setup_is_refused(uneven):
    _, state = make_loader(uneven, 16, seed=1, world_size=4, rank=2)
    with pytest.raises(ValueError, match=r"cannot continue the data stream exactly.*--stream-readers 4 -> 1"):
        make_loader(uneven, 16, seed=1, state=replace(state, batches=5))  # 4 readers then, 1 by default now
    with pytest.raises(ValueError, match=r"--shuffle-shards 4 -> 2"):
        make_loader(uneven, 16, seed=1, world_size=4, shuffle_shards=2, state=state)
    old = {"batches": 5, "seed": 1, "world_size": 4, "num_workers": 0, "batch_size": 16, "shuffle_shards": 4,
           "n_shards": 5, "split": "train", "failed": {}}  # a per-rank stream of an older version
    with pytest.raises(ValueError, match=r"a per-rank stream of an older himae-dist"):
        make_loader(uneven, 16, seed=1, state=old)


def test_a_micro_batch_mixes_patients_like_a_uniform_shuffle(tmp_path):
    """Index rows come one patient after another; a batch should still see about as many patients as uniform draws."""
    index = _random_index(tmp_path, n=2400, patients=24, n_files=4)
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "o"), samples_per_shard=200, block_size=32, val_fraction=0))
    m = load_manifest(str(tmp_path / "o"))
    B = 32
    counts = np.bincount([int(i * 24 // 2400) for i in range(2400)])
    expected = np.sum(1 - (1 - counts / counts.sum()) ** B)  # E[distinct patients] for B uniform draws
    key_to_patient = {f"{j:06d}": j * 24 // 2400 for j in range(2400)}
    distinct = [len({key_to_patient[str(k)] for k in b["key"]}) for b in _take(m, 60, batch_size=B, shuffle_shards=4)]
    assert np.mean(distinct) >= 0.9 * expected, (np.mean(distinct), expected)


def test_missing_or_damaged_shards_are_found_at_start_and_skipped_mid_run(tmp_path, capfd):
    index = _random_index(tmp_path, n=300)
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "o"), samples_per_shard=50, val_fraction=0))
    m = load_manifest(str(tmp_path / "o"))
    assert check_shards(m) == []
    victim = tmp_path / "o" / m.shards()[2].name
    victim.write_bytes(victim.read_bytes()[:3000])
    (tmp_path / "o" / m.shards()[4].name).unlink()
    problems = check_shards(m)
    assert problems == [f"{m.shards()[2].name} (3000 bytes, expected {m.shards()[2].bytes})",
                        f"{m.shards()[4].name} (missing)"]
    batches = _take(m, 40, batch_size=10, shuffle_shards=1)
    bad = {2, 4}
    last = batches[-1]
    reads, failed, lost, counted = last["readers"]["0:0"]  # source 0, reader 0: counted on this (the only) rank
    order = list(islice(reader_shards(6, 0, 1, 1), reads))
    assert counted and isinstance(failed, tuple) and len(failed) >= 2
    assert failed == tuple(k for k, i in enumerate(order) if i in bad)  # every read of them, and only those
    assert lost == 50 * len(failed)
    assert not any(int(s) in bad for b in batches for s in b["shard"])
    assert "skipping shard" in capfd.readouterr().err
    with pytest.raises(Exception, match=r"shard-00000[24]\.tar"):
        _take(m, 40, batch_size=10, strict=True)


def test_manifest_problems_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json does not exist; convert the data with himae-prep"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "himae-wds-v1", "shards": []}))
    with pytest.raises(ValueError, match=r"format 'himae-wds-v1', expected 'himae-wds-v2'; re-run himae-prep"):
        load_manifest(str(tmp_path))


def test_a_garbled_header_is_skipped_and_an_altered_shard_caught_with_verify(tmp_path, capfd):
    index = _random_index(tmp_path, n=300)
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "o"), samples_per_shard=50, val_fraction=0))
    m = load_manifest(str(tmp_path / "o"))
    garbled = tmp_path / "o" / m.shards()[1].name
    data = bytearray(garbled.read_bytes())
    data[148:150] = b"9x"  # the checksum field of the first header: same size, not octal
    garbled.write_bytes(bytes(data))
    altered = tmp_path / "o" / m.shards()[3].name
    data = bytearray(altered.read_bytes())
    data[2000:2008] = b"\xff" * 8  # inside the signal array: still parses, same size
    altered.write_bytes(bytes(data))
    assert check_shards(m) == []  # sizes are right: only reading can tell
    plain = _take(m, 30, batch_size=10, shuffle_shards=1)
    assert not any(int(s) == 1 for b in plain for s in b["shard"]) and any(int(s) == 3 for b in plain for s in b["shard"])
    assert "damaged tar header" in capfd.readouterr().err
    verified = _take(m, 30, batch_size=10, shuffle_shards=1, verify=True)
    assert not any(int(s) in (1, 3) for b in verified for s in b["shard"])
    assert "sha256 differs from the manifest" in capfd.readouterr().err


@pytest.mark.parametrize("workers", [0, 1])
def test_a_reader_whose_shards_all_fail_stops_with_an_error(tmp_path, workers):
    index = _random_index(tmp_path, n=200)
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "o"), samples_per_shard=50, val_fraction=0))
    m = load_manifest(str(tmp_path / "o"))
    for s in m.shards():
        Path(s.url).unlink()
    it = iter(make_loader(m, 16, seed=1, num_workers=workers)[0])
    # through a worker too: DataLoader re-raises the worker's exception as the same type
    with pytest.raises(DataLostError, match=r"the last 4 shard reads all failed \(the split has 4 shards in "
                                            r"\S*o\); last: \S*shard-\d+\.tar: No such file.*re-run himae-prep"):
        next(it)
    # now: left to a later gc pass, the failed worker's shutdown waits out a 5 s join timeout
    getattr(it, "_shutdown_workers", lambda: None)()


@pytest.fixture
def one_truncated(tmp_path):
    """6 shards of 50 (`_damage` truncates one)."""
    index = _random_index(tmp_path, n=300)
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "o"), samples_per_shard=50, val_fraction=0))
    return load_manifest(str(tmp_path / "o"))


def _damage(m, n_readers):
    """Truncate the shard reader 0 reads first; returns (its index, path, good bytes)."""
    victim = next(reader_shards(6, 0, n_readers, 1))  # read first by reader 0: before any resume point
    path = Path(m.shards()[victim].url)
    good = path.read_bytes()
    path.write_bytes(good[:3000])
    return victim, path, good


def _expected_losses(m, victim, reader, n_readers, delivered):
    """(reads, failed positions) of a reader that delivered `delivered` samples, walked independently."""
    got, k, failed = 0, 0, []
    for k, i in enumerate(reader_shards(6, reader, n_readers, 1)):
        if got >= delivered:
            break
        if i == victim:
            failed.append(k)
        else:
            got += m.shards()[i].n_samples
    return k, failed


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_after_a_failed_read_continues_exactly_even_once_the_shard_is_repaired(one_truncated, workers,
                                                                                       tmp_path):
    m, N, K = one_truncated, 30, 12
    nw = max(1, workers)
    victim, path, good = _damage(m, nw)
    kw = dict(batch_size=10, shuffle_shards=1, num_workers=workers)
    loader, start = make_loader(m, seed=1, **kw)
    it = iter(loader)
    full = [next(it) for _ in range(N)]
    assert all(isinstance(v[1], tuple) for b in full for v in b["readers"].values())
    progress = StreamProgress(start, [[s.n_samples for s in m.shards()]])
    for b in full[:K]:
        progress.update(b)
    state = progress.state(K)

    # the counts: the victim's size for each time a consumed group read it
    expected = [_expected_losses(m, victim, r, nw, K * 10 // nw) for r in range(nw)]  # nw readers, 10 / nw rows each
    assert state.failed == {f"0:{r}": f for r, (_, f) in enumerate(expected) if f}
    assert 0 in state.failed["0:0"]  # the failure lies before the resume point: the skip-ahead must know it
    assert progress.failed() == sum(len(f) for _, f in expected) >= 1
    assert progress.lost_segments() == 50 * progress.failed()
    assert progress.reads() == sum(reads for reads, _ in expected) > 0
    torch.save(state.to_dict(), tmp_path / "state.pt")
    loaded = LoaderState.from_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert loaded == state
    assert LoaderState.from_dict(json.loads(json.dumps(state.to_dict()))) == state  # keys through JSON: str
    assert LoaderState.from_dict({k: v for k, v in state.to_dict().items() if k != "failed"}).failed == {}  # older
    again = StreamProgress(loaded, [[s.n_samples for s in m.shards()]])  # a restored rank counts the same
    assert (again.reads(), again.failed(), again.lost_segments()) == (progress.reads(), progress.failed(),
                                                                      progress.lost_segments())

    def resumed(st):
        loader, _ = make_loader(m, seed=1, state=st, **kw)
        it = iter(loader)
        return [next(it) for _ in range(N - K)]

    rest = resumed(loaded.to_dict())
    assert _same(rest, full[K:])
    assert [b["readers"] for b in rest] == [b["readers"] for b in full[K:]]
    assert not _same(resumed(replace(state, failed={})), full[K:])  # the manifest's sizes alone (the old way) diverge
    path.write_bytes(good)  # repaired: a recorded failure is still not read, so the stream is the saved run's
    assert _same(resumed(state), full[K:])
