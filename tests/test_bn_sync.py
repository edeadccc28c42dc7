"""BatchNorm running statistics after sync: equal on every rank and those of the global stream (2 gloo ranks)."""

import os

import torch
import torch.multiprocessing as mp
from torch import nn

from himae_dist.bn_sync import sync_batchnorm_stats
from tests.ports import free_port


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), nn.BatchNorm1d(4, momentum=None))  # cumulative average


def _stream(rank):  # rank r's share of the global stream: 3 batches [8, 1, 50], rank 1's data shifted
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(8, 1, 50, generator=g) * (1 + rank) + 2.0 * rank for _ in range(3)]


def _worker(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    net = _net().train()
    with torch.no_grad():
        for x in _stream(rank):
            net(x)
    before = sync_batchnorm_stats(net)
    torch.save({"before": before, "after": dict(net[1].named_buffers())}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_synced_running_stats_are_equal_and_global(tmp_path):
    port = free_port()
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in ("running_mean", "running_var"):
        assert torch.equal(r0["after"][k], r1["after"][k]), k
    # the whole global stream through the same conv: per-channel mean and variance
    net = _net()
    with torch.no_grad():
        y = torch.cat([net[0](x) for r in (0, 1) for x in _stream(r)])  # [48, 4, 50]
    mean, var = y.mean(dim=(0, 2)), y.var(dim=(0, 2))
    assert torch.allclose(r0["after"]["running_mean"], mean, atol=1e-5)
    assert torch.allclose(r0["after"]["running_var"], var, rtol=5e-3)  # BatchNorm averages per-batch variances: the within-rank spread of batch means is not in it
    assert not torch.allclose(r0["before"]["1.running_mean"], mean, atol=0.1)  # rank 0's share is not it
