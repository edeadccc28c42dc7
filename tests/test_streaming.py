import pytest
import torch

from himae_dist.streaming import check_shard_split, load_manifest, make_loader


def _keys_for_rank(manifest, rank, world, monkeypatch):
    import webdataset as wds

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(manifest.shard_urls), wds.split_by_node, wds.tarfile_to_samples(),
    )
    return {s["__key__"] for s in pipeline}


def test_loader_yields_full_batches_forever(tiny_shards):
    m = load_manifest(str(tiny_shards))
    it = iter(make_loader(m, batch_size=50, seed=0, num_workers=0))
    batches = [next(it) for _ in range(3 * m.n_samples // 50)]  # three epochs' worth
    assert all(b.shape == (50, 1, 250) and b.dtype == torch.float32 for b in batches)


def test_ranks_read_disjoint_shards(tiny_shards, monkeypatch):
    m = load_manifest(str(tiny_shards))
    k0, k1 = (_keys_for_rank(m, r, 2, monkeypatch) for r in (0, 1))
    assert k0 and k1 and not k0 & k1
    assert len(k0 | k1) == m.n_samples


def test_too_few_shards_for_the_readers_is_a_clear_error():
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot feed 2 rank\(s\) x 2 worker\(s\)"):
        check_shard_split(3, 2, 2)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json does not exist; convert the data with himae-prep"):
        load_manifest(str(tmp_path))
