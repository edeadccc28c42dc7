"""Conversion to and streaming from S3 through s3fs, against moto's S3 server on loopback."""

import csv
import socket

import h5py
import numpy as np
import pytest
import torch

from data_prep.convert import ConvertParams, convert_pretrain
from himae_dist.streaming import load_manifest, make_loader

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="himae-test")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    yield fs, opts
    server.stop()


def test_convert_to_s3_and_stream_back(tiny_cohort, s3):
    fs, opts = s3
    p = ConvertParams("s3://himae-test/shards", samples_per_shard=100, storage_options=opts)
    manifest = convert_pretrain(str(tiny_cohort / "pretrain_index.csv"), p)
    listed = sorted(x.rsplit("/", 1)[1] for x in fs.ls("himae-test/shards", refresh=True) if x.endswith(".tar"))
    assert listed == [s["url"] for s in manifest["shards"]]

    m = load_manifest("s3://himae-test/shards", opts)
    assert m.n_samples == manifest["n_samples"] and m.shard_urls[0].startswith("s3://")
    batch = next(iter(make_loader(m, batch_size=16, seed=0, num_workers=0, storage_options=opts)))
    assert batch.shape == (16, 1, 250) and batch.dtype == torch.float32
    ppg = []  # the pretraining segments (himae-synth writes other patients' segments to downstream.h5)
    with open(tiny_cohort / "pretrain_index.csv") as fh:
        for r in csv.DictReader(fh):
            with h5py.File(tiny_cohort / r["local_path"]) as f:
                ppg.append(f[r["global_idx"]]["normalized_waveform"][()])
    ppg = np.stack(ppg)
    for row in batch[:, 0].numpy():  # every streamed segment is one of the cohort's, bit for bit
        assert (np.abs(ppg - row).max(axis=1) == 0).any()

    # a re-run finds every shard on S3 and redoes none
    before = {x: fs.info(x)["LastModified"] for x in fs.ls("himae-test/shards") if x.endswith(".tar")}
    assert convert_pretrain(str(tiny_cohort / "pretrain_index.csv"), p) == manifest
    assert {x: fs.info(x)["LastModified"] for x in fs.ls("himae-test/shards", refresh=True) if x.endswith(".tar")} == before


def test_convert_reads_hdf5_shards_from_s3(tmp_path, s3):
    fs, opts = s3
    keys = ["000010", "000011"]
    with h5py.File(tmp_path / "a.h5", "w") as f:
        for i, k in enumerate(keys):
            f.create_group(k).create_dataset("normalized_waveform", data=np.full(250, i, np.float32))
    fs.put_file(str(tmp_path / "a.h5"), "himae-test/raw/a.h5")
    with open(tmp_path / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["local_path", "global_idx"])
        w.writerows([("s3://himae-test/raw/a.h5", k) for k in keys])
    manifest = convert_pretrain(str(tmp_path / "index.csv"), ConvertParams(str(tmp_path / "out"), storage_options=opts))
    assert manifest["n_samples"] == 2
