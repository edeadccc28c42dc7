"""The data order is a function of the stream, not of the cluster: the same global batches for any
world size, micro-batch and worker count; a resume on another world size goes on at the exact
global position; several sources mixed in exact per-batch counts, each with its own epochs."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from data_prep.convert import ConvertParams, convert_pretrain
from himae_dist.streaming import (LoaderState, batch_layout, load_manifest, make_loader, rank_parts,
                                  shuffle_widths, source_counts)
from tests.h5_inputs import random_index

READERS, G = 4, 48


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """8 train shards of 45 (360 segments)."""
    d = tmp_path_factory.mktemp("big")
    convert_pretrain(str(random_index(d, n=360, patients=12)), ConvertParams(str(d / "o"), samples_per_shard=45,
                                                                               block_size=9, val_fraction=0))
    return load_manifest(str(d / "o"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """2 train shards of 20 (40 segments), another patient set."""
    d = tmp_path_factory.mktemp("small")
    convert_pretrain(str(random_index(d, n=40, patients=4, seed=7)), ConvertParams(str(d / "o"), samples_per_shard=20,
                                                                                     block_size=5, val_fraction=0))
    return load_manifest(str(d / "o"))


def _global_batches(sources, n: int, world: int, micro: int, workers: int = 0, state=None, weights=None) -> list:
    """The first n global batches as each rank consumes them: [(source, key), ...] per batch, ranks in order."""
    per_rank = G // world // micro
    ranks = []
    for r in range(world):
        it, _ = make_loader(sources, micro, seed=3, rank=r, world_size=world, num_workers=workers, global_batch=G,
                            readers=READERS, state=state, weights=weights, shuffle_shards=2)
        mine = []
        for _ in range(n):
            rows = []
            for _ in range(per_rank):
                b = next(it)
                assert len(b["signal"]) == micro
                rows += list(zip(b["source"].tolist(), map(str, b["key"])))
            mine.append(rows)
        ranks.append(mine)
        del it
    return [sum((ranks[r][i] for r in range(world)), []) for i in range(n)]


def test_counts_and_layout_are_exact():
    assert source_counts([0.7, 0.3], 48) == [34, 14]  # 33.6, 14.4: the larger remainder gets the row
    assert source_counts([1, 1, 1], 10) == [4, 3, 3]  # ties: the earlier source
    # the shuffle window (shards held per reader) is shared by weight, at least one shard each
    assert shuffle_widths(4, [34, 14]) == [3, 1] and shuffle_widths(4, [48]) == [4]
    assert shuffle_widths(2, [40, 4, 4]) == [1, 1, 1] and shuffle_widths(4, [18, 18, 12]) == [2, 1, 1]
    for S, counts in [(4, [18, 18, 12]), (4, [6] * 8), (1, [5, 5]), (8, [100, 1, 1]), (3, [1, 1000]), (16, [7, 9])]:
        w = shuffle_widths(S, counts)  # memory: max(--shuffle-shards, sources) shards in all, one at least each
        assert sum(w) == max(S, len(counts)) and min(w) >= 1, (S, counts, w)
    parts = batch_layout([34, 14], 4)
    assert sum(n for _, _, n in parts) == 48
    per_reader = Counter()
    for _, c, n in parts:
        per_reader[c] += n
    assert sorted(per_reader.values()) == [12, 12, 12, 12]
    for world in (1, 2, 3, 4, 6):  # every row on exactly one rank; a straddling part is counted once
        got = [rank_parts([34, 14], 4, r, world) for r in range(world)]
        assert sum(p.hi - p.lo for ps in got for p in ps) == 48
        assert Counter(p.key for ps in got for p in ps if p.counted) == Counter(f"{s}:{c}" for s, c, _ in parts)
    with pytest.raises(ValueError, match="does not split evenly over 5 ranks"):
        rank_parts([34, 14], 4, 0, 5)


@pytest.mark.slow
def test_the_same_global_batches_on_any_world_size_micro_batch_and_worker_count(big):
    ref = _global_batches(big, 12, world=1, micro=16)
    assert len({k for b in ref for k in b}) > 300  # most of the split over 12 batches (576 rows, 360 segments)
    for world, micro, workers in [(2, 8, 0), (3, 16, 0), (2, 24, 3), (1, 48, 1)]:  # 3 workers, 2 parts: one idle
        assert _global_batches(big, 12, world, micro, workers) == ref, (world, micro, workers)


@pytest.mark.slow
def test_a_resume_on_another_world_size_goes_on_at_the_global_position(big):
    ref = _global_batches(big, 14, world=2, micro=8)
    _, state = make_loader(big, 8, seed=3, world_size=2, global_batch=G, readers=READERS, shuffle_shards=2)
    assert state.readers == READERS and state.global_batch == G
    for world, micro in [(1, 16), (3, 16), (6, 8)]:
        rest = _global_batches(big, 5, world, micro, state=replace(state, batches=9))
        assert rest == ref[9:], world
    # epoch accounting: the multiset over the first epoch's worth is every segment once per reader share
    first = Counter(k for b in ref[:7] for k in b)  # 336 of 360 rows
    assert max(first.values()) == 1


@pytest.mark.slow
def test_two_sources_mix_in_exact_counts_and_run_their_own_epochs(big, small):
    batches = _global_batches([big, small], 10, world=2, micro=8, weights=[0.7, 0.3])
    assert all(Counter(s for s, _ in b) == {0: 34, 1: 14} for b in batches)  # every global batch, exactly
    small_seen = Counter(k for b in batches for s, k in b if s == 1)
    big_seen = Counter(k for b in batches for s, k in b if s == 0)
    assert len(small_seen) == 40 and max(small_seen.values()) >= 3  # 140 rows of 40 segments: it repeats
    assert sum(big_seen.values()) == 340 < 360 and max(big_seen.values()) == 1  # not yet through its first epoch
    _, state = make_loader([big, small], 8, seed=3, world_size=2, global_batch=G, readers=READERS, shuffle_shards=2,
                           weights=[0.7, 0.3])
    assert [s[:2] for s in state.sources] == [[8, 34], [2, 14]]  # shard count, samples per batch (+ preprocessing)
    rest = _global_batches([big, small], 4, world=3, micro=16, weights=[0.7, 0.3], state=replace(state, batches=6))
    assert rest == batches[6:]
    # the saved shuffle widths ([1, 1] here) carry the resume, whatever the formula gives now
    assert state.widths == [1, 1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("himae_dist.streaming.shuffle_widths", lambda shards, counts: [2, 1])
        assert _global_batches([big, small], 2, world=2, micro=8, weights=[0.7, 0.3]) != batches[:2]  # they matter
        assert _global_batches([big, small], 4, world=2, micro=8, weights=[0.7, 0.3],
                               state=replace(state, batches=6)) == batches[6:]
    with pytest.raises(ValueError, match=r"cannot continue the data stream exactly.*samples per global batch"):
        make_loader([big, small], 8, seed=3, world_size=2, global_batch=G, readers=READERS, shuffle_shards=2,
                    weights=[0.5, 0.5], state=state)


def test_sources_of_another_length_or_channel_count_are_refused(big, tmp_path):
    convert_pretrain(str(random_index(tmp_path, n=40, length=300)), ConvertParams(str(tmp_path / "o"),
                                                                                  samples_per_shard=20, val_fraction=0))
    other = load_manifest(str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"sources disagree: \S+big\S+ holds 1 x 250 float16 segments, \S+ 1 x 300"):
        make_loader([big, other], 8, seed=3)
    wide = replace(other, length=250, channels=2)
    with pytest.raises(ValueError, match=r"1 x 250 float16 segments, \S+ 2 x 250"):
        make_loader([big, wide], 8, seed=3)
    with pytest.raises(ValueError, match=r"gets 0 of the 8 samples of a global batch at weight 0.01"):
        make_loader([big, big], 8, seed=3, weights=[1, 0.01])


def test_a_global_batch_that_does_not_split_is_refused(big):
    with pytest.raises(ValueError, match=r"a global batch of 40 is not a whole number of micro-batches of 8 on each "
                                         r"of 3 rank\(s\)"):
        make_loader(big, 8, seed=3, world_size=3, global_batch=40)
    np.testing.assert_equal(source_counts([2.0], 7), [7])


def test_review_edges_default_readers_huge_weights_shared_failures_and_names(big, small, tmp_path):
    from himae_dist.streaming import StreamProgress
    from himae_dist.train import source_names

    # the default readers: world x max(1, workers) at the first start (then kept: see the README)
    assert make_loader(big, 8, seed=3, world_size=2)[1].readers == 2
    assert make_loader(big, 8, seed=3, num_workers=3)[1].readers == 3
    assert source_counts([1e308, 1e308], 12) == [6, 6]  # no overflow to inf / nan
    # a part rank 1 shares with rank 0 (which counts it) failed on rank 1 only: rank 1 counts that failure
    _, state = make_loader([big, small], 8, seed=3, world_size=2, global_batch=G, readers=3, weights=[0.7, 0.3])
    shared = [p for p in rank_parts([34, 14], 3, 1, 2) if not p.counted]
    assert shared, "3 readers over 2 ranks: one part straddles them"
    progress = StreamProgress(state, [[s.n_samples for s in m.shards()] for m in (big, small)], rank=1, world_size=2)
    progress.update({"readers": {shared[0].key: (4, (2,), 45, False)}})
    assert (progress.failed(), progress.lost_segments()) == (1, 45) and progress.reads() >= 1
    assert progress.state(1).failed == {shared[0].key: [2]}  # saved, so every rank skips it on resume
    # per-source names in the log and metrics: no user:password@ of a URL
    names = source_names(["s3://user:pw@bucket", "s3://bucket/a/", "memory://u:SECRET@host/x/shards", "/d/shards"])
    assert not any("pw" in n or "SECRET" in n for n in names), names
    assert names == ["bucket", "a", "shards#2", "shards#3"]


def test_a_changed_stream_is_refused_naming_what_changed(big, small, tmp_path):
    """Swapped or replaced sources of the same shape are other data (their shards' sha256), not the same stream."""
    kw = dict(seed=3, world_size=2, global_batch=G, readers=READERS, shuffle_shards=2)
    _, state = make_loader([big, small], 8, weights=[0.7, 0.3], **kw)
    state = replace(state, batches=4)
    with pytest.raises(ValueError, match=r"source 0 is other data .*another order of --data.*source 1 is other data"):
        make_loader([small, big], 8, weights=[0.7, 0.3], state=state, **kw)
    with pytest.raises(ValueError, match=r"source 0: 34 -> 24 samples per global batch \(--weights or the global "
                                         r"batch\)"):
        make_loader([big, small], 8, weights=[0.5, 0.5], state=state, **kw)
    with pytest.raises(ValueError, match=r"--stream-readers 4 -> 3"):
        make_loader([big, small], 8, weights=[0.7, 0.3], state=state, **{**kw, "readers": 3})
    with pytest.raises(ValueError, match=r"--stream-readers=49 is more than the global batch of 48"):
        make_loader(big, 8, seed=3, world_size=2, global_batch=G, readers=49)
    moved = replace(small, url="s3://elsewhere/manifest.json", base="s3://elsewhere")  # same data, moved: goes on
    assert make_loader([big, moved], 8, weights=[0.7, 0.3], state=state, **kw)[1].batches == 4
    # the shuffle widths are part of the stream: a resume reads with the saved ones
    assert state.widths == [1, 1] and make_loader([big, small], 8, weights=[0.7, 0.3], state=replace(
        state, widths=[2, 1]), **kw)[0].loader.dataset.widths == [2, 1]
    legacy = {k: v for k, v in state.to_dict().items() if k != "widths"}  # saved before widths were recorded
    with pytest.raises(ValueError, match=r"mixes several sources but records no shuffle widths"):
        make_loader([big, small], 8, weights=[0.7, 0.3], state=legacy, **kw)
    _, one = make_loader(big, 8, **kw)  # one source always read --shuffle-shards at once: it goes on
    legacy = {k: v for k, v in replace(one, batches=4).to_dict().items() if k != "widths"}
    assert LoaderState.from_dict(legacy).widths == [2]
    assert make_loader(big, 8, state=legacy, **kw)[1].widths == [2]
