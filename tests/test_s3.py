"""Conversion to and streaming from S3 through s3fs, against moto's S3 server on loopback."""

import csv
import socket

import h5py
import numpy as np
import pytest
import torch

from data_prep.convert import ConvertParams, convert_pretrain, main as prep_main
from data_prep.storage import StorageError, retrying
from himae_dist.streaming import check_shards, load_manifest, make_loader

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    port = _free_port()
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


def test_convert_to_s3_stream_back_and_resume_without_reupload(tiny_cohort, s3):
    fs, opts = s3
    p = ConvertParams("s3://himae-test/shards", samples_per_shard=100, storage_options=opts, dtype="float32",
                      normalize="none")
    manifest = convert_pretrain(str(tiny_cohort / "pretrain_index.csv"), p)
    listed = sorted("train/" + x.rsplit("/", 1)[1] for x in fs.ls("himae-test/shards/train", refresh=True))
    assert listed == [s["url"] for s in manifest["splits"]["train"]["shards"]]

    m = load_manifest("s3://himae-test/shards", opts)
    assert m.n_samples() == manifest["splits"]["train"]["n_samples"] and m.shards()[0].url.startswith("s3://")
    assert check_shards(m, "train", opts) == []
    loader, _ = make_loader(m, batch_size=16, seed=0, storage_options=opts)
    batch = next(iter(loader))["signal"]
    assert batch.shape == (16, 1, 250) and batch.dtype == torch.float32
    ppg = []  # the pretraining segments (himae-synth writes other patients' segments to downstream.h5)
    with open(tiny_cohort / "pretrain_index.csv") as fh:
        for r in csv.DictReader(fh):
            with h5py.File(tiny_cohort / r["local_path"]) as f:
                ppg.append(f[r["global_idx"]]["normalized_waveform"][()])
    ppg = np.stack(ppg)
    for row in batch[:, 0].numpy():  # every streamed segment is one of the cohort's, bit for bit
        assert (np.abs(ppg - row).max(axis=1) == 0).any()

    # a re-run verifies every shard on S3 (ETag = md5) and uploads none again
    before = {x: fs.info(x)["LastModified"] for x in fs.find("himae-test/shards/train")}
    assert convert_pretrain(str(tiny_cohort / "pretrain_index.csv"), p) == manifest
    assert {x: fs.info(x)["LastModified"] for x in fs.find("himae-test/shards/train")} == before

    # a shard damaged on S3 is rebuilt
    victim = "himae-test/shards/" + manifest["splits"]["train"]["shards"][1]["url"]
    fs.pipe_file(victim, b"garbage")
    assert check_shards(load_manifest("s3://himae-test/shards", opts), "train", opts) != []
    assert convert_pretrain(str(tiny_cohort / "pretrain_index.csv"), p) == manifest
    assert check_shards(load_manifest("s3://himae-test/shards", opts), "train", opts) == []


def test_index_and_hdf5_read_from_s3(tmp_path, s3):
    fs, opts = s3
    keys = ["000010", "000011", "000012"]
    with h5py.File(tmp_path / "a.h5", "w") as f:
        for i, k in enumerate(keys):
            f.create_group(k).create_dataset("normalized_waveform", data=np.arange(250, dtype=np.float32) * (i + 1))
    fs.put_file(str(tmp_path / "a.h5"), "himae-test/raw/a.h5")
    with open(tmp_path / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["local_path", "global_idx"])
        w.writerows([("a.h5", k) for k in keys] + [("s3://himae-test/raw/missing.h5", "000013")])
    fs.put_file(str(tmp_path / "index.csv"), "himae-test/raw/index.csv")  # relative paths resolve on S3 too
    m = convert_pretrain("s3://himae-test/raw/index.csv",
                         ConvertParams(str(tmp_path / "out"), storage_options=opts, on_bad="skip", val_fraction=0))
    assert m["n_samples"] == 3 and m["skipped"] == {"missing_file": 1}


def test_unreachable_s3_is_one_clear_error_naming_the_url(tmp_path, monkeypatch, tiny_cohort):
    monkeypatch.setattr("data_prep.storage.RETRIES", 1)
    monkeypatch.setattr("data_prep.storage.BACKOFF_S", 0.01)
    dead = {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_free_port()}",
                                                         "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    import json

    with pytest.raises(SystemExit, match=r"himae-prep: error: .*s3://himae-test/nowhere.*failed 2 times; last error"):
        prep_main(["--index", str(tiny_cohort / "pretrain_index.csv"), "--out", "s3://himae-test/nowhere",
                   "--storage-options", json.dumps(dead)])


def test_transient_errors_are_retried_then_named():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retrying(flaky, "reading", "s3://b/k", retries=3, backoff_s=0) == "ok" and len(calls) == 3
    with pytest.raises(StorageError, match=r"reading s3://b/k: failed 3 times; last error: TimeoutError: slow"):
        retrying(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "reading", "s3://b/k", retries=2, backoff_s=0)
    with pytest.raises(FileNotFoundError):  # permanent errors are not retried
        retrying(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "reading", "s3://b/k", retries=5, backoff_s=10)
