"""Conversion to and streaming from S3 through s3fs, against moto's S3 server on loopback."""

import csv
import hashlib
import json
import re
import socket
from collections import Counter

import h5py
import numpy as np
import pytest
import torch

from data_prep.convert import ConvertParams, convert_pretrain, main as prep_main
from data_prep.storage import StorageError, retrying
from himae_dist.streaming import check_shards, load_manifest, make_loader
from tests.ports import free_port

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    port = free_port()
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
    from data_prep.hdf5_sources import open_h5

    # h5py reads a remote file natively, never through an fsspec file object: h5py's global lock held
    # across a read that waits on fsspec's IO thread deadlocks when that thread's GC frees an h5py object
    with open_h5("s3://himae-test/raw/a.h5", opts, str(tmp_path)) as f:
        assert f.driver == "sec2" and f["000011/normalized_waveform"][3] == 6.0
    assert list(tmp_path.glob(".h5-*")) == []  # the download is unlinked once open
    with open(tmp_path / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["local_path", "global_idx"])
        w.writerows([("a.h5", k) for k in keys] + [("s3://himae-test/raw/missing.h5", "000013")])
    fs.put_file(str(tmp_path / "index.csv"), "himae-test/raw/index.csv")  # relative paths resolve on S3 too
    m = convert_pretrain("s3://himae-test/raw/index.csv",
                         ConvertParams(str(tmp_path / "out"), storage_options=opts, on_bad="skip", val_fraction=0))
    assert m["n_samples"] == 3 and m["skipped"] == {"missing_file": 1}


@pytest.fixture
def dead_s3(monkeypatch):
    """storage_options of an S3 endpoint that refuses connections, with retries cut to one quick attempt.
    The port stays bound (not listening: connections are refused) for the whole test, so no other
    process, such as another xdist worker's moto server, can take it meanwhile."""
    monkeypatch.setattr("data_prep.storage.RETRIES", 1)
    monkeypatch.setattr("data_prep.storage.BACKOFF_S", 0.01)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{held.getsockname()[1]}",
                                                            "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}


def test_unreachable_s3_is_one_clear_error_naming_the_url(tmp_path, dead_s3, tiny_cohort):
    dead = dead_s3
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


def test_a_store_refusal_is_one_line_naming_the_url_in_every_job(tiny_cohort, s3, tmp_path, capsys):
    """An option s3fs does not take (its AioSession raises a bare TypeError), a missing bucket and denied
    access (s3fs: a bare "Forbidden") name the URL and what to check, in himae-prep, verify, the trainer
    and himae-probe alike."""
    from himae_dist.config import parse_config
    from himae_dist.dry_run import dry_run
    from probes.evaluate import main as probe_main

    _, opts = s3
    bogus = json.dumps({**opts, "bogus": 1})
    says = r"s3://himae-test/\S+: --storage-options holds an option this store does not take \(.*'bogus'\)"
    with pytest.raises(SystemExit, match=rf"^himae-prep: error: checking {says}"):
        prep_main(["--index", str(tiny_cohort / "pretrain_index.csv"), "--out", "s3://himae-test/o",
                   "--storage-options", bogus])
    with pytest.raises(SystemExit):
        prep_main(["verify", "s3://himae-test/o", "--storage-options", bogus])
    assert re.fullmatch(rf"himae-prep verify: checking {says}.*\n", capsys.readouterr().err)
    with pytest.raises(StorageError, match=rf"^checking {says}"):  # himae-train prints a StorageError as its line
        dry_run(parse_config(["--data", "s3://himae-test/o", "--out", str(tmp_path / "run"), "--storage-options", bogus]))
    with pytest.raises(SystemExit, match=rf"^himae-probe: error: reading {says}"):
        probe_main(["--checkpoint", "s3://himae-test/w.pt", "--h5", str(tiny_cohort / "downstream.h5"),
                    "--out", str(tmp_path / "p"), "--storage-options", bogus, "--random-baselines", "0"])
    with pytest.raises(SystemExit, match=r"^himae-prep: error: uploading s3://no-such-bucket/o/\S+: the bucket does "
                                         r"not exist; create it, or correct the URL$"):
        prep_main(["--index", str(tiny_cohort / "pretrain_index.csv"), "--out", "s3://no-such-bucket/o",
                   "--storage-options", json.dumps(opts)])
    with pytest.raises(StorageError, match=r"^reading s3://b/k: access denied \(Forbidden\); check the credentials"):
        retrying(lambda: (_ for _ in ()).throw(PermissionError("Forbidden")), "reading", "s3://b/k")  # s3fs on a 403


# ---------------------------------------------------------------------------------------------
# exported weights on S3: sync_exports, load_himae and himae-probe on s3:// URLs


def _fake_run(root, steps=(10, 20)):
    """A trainer --out folder as rank 0 leaves it: weights/step_*.pt, himae_final.pt, and other files."""
    from himae_dist.checkpoint import save_weights
    from himae_dist.model import HiMAE

    for i, step in enumerate(steps):
        torch.manual_seed(i)
        save_weights(HiMAE(1, (4, 8)), root / "weights" / f"step_{step:07d}.pt", step=step)
    torch.manual_seed(99)
    final = HiMAE(1, (4, 8)).eval()
    save_weights(final, root / "himae_final.pt", step=steps[-1])
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "latest").write_text("global_step20")  # not an export
    (root / "weights" / ".step_0000030.pt.tmp-123").write_bytes(b"partial")  # a save in progress
    return final


def test_sync_exports_uploads_missing_and_resized_files_once(tmp_path, s3, monkeypatch):
    from data_prep.storage import Folder
    from himae_dist.checkpoint import save_weights
    from himae_dist.model import HiMAE
    from himae_dist.weights_export import sync_exports

    fs, opts = s3
    _fake_run(tmp_path)
    url = "s3://himae-test/exports/run1"
    assert not Folder(url, opts).exists("himae_final.pt")
    uploads = []
    real_upload = Folder.upload
    monkeypatch.setattr(Folder, "upload", lambda self, src, name, **kw: (uploads.append(name), real_upload(self, src, name, **kw)))

    names = ["himae_final.pt", "weights/step_0000010.pt", "weights/step_0000020.pt"]
    assert sync_exports(tmp_path, url, opts) == names
    assert uploads == ["weights/step_0000010.pt", "weights/step_0000020.pt", "himae_final.pt"]  # the final last
    assert sorted(x[len("himae-test/exports/run1/"):] for x in fs.find("himae-test/exports/run1")) == names
    for n in names:
        assert fs.cat_file(f"himae-test/exports/run1/{n}") == (tmp_path / n).read_bytes()
    export = Folder(url, opts)
    assert export.exists("himae_final.pt") and export.exists("weights/step_0000010.pt")
    assert not export.exists("weights/step_0000030.pt")

    before = {x: fs.info(x)["LastModified"] for x in fs.find("himae-test/exports/run1")}
    uploads.clear()
    assert sync_exports(tmp_path, url, opts) == [] and uploads == []  # idempotent: nothing is put again
    assert {x: fs.info(x)["LastModified"] for x in fs.find("himae-test/exports/run1")} == before

    # a new step and a final of another size (a longer run) are uploaded; the rest stays
    save_weights(HiMAE(1, (4, 8)), tmp_path / "weights" / "step_0000030.pt", step=30)
    save_weights(HiMAE(1, (4, 8)), tmp_path / "himae_final.pt", step=30, extra={"note": "x" * 100})
    assert sync_exports(tmp_path, url, opts) == ["himae_final.pt", "weights/step_0000030.pt"]
    assert fs.cat_file("himae-test/exports/run1/himae_final.pt") == (tmp_path / "himae_final.pt").read_bytes()
    assert fs.info("himae-test/exports/run1/weights/step_0000010.pt")["LastModified"] == \
        before["himae-test/exports/run1/weights/step_0000010.pt"]
    # a file lost remotely is uploaded again by the next call
    fs.rm_file("himae-test/exports/run1/weights/step_0000020.pt")
    assert sync_exports(tmp_path, url, opts) == ["weights/step_0000020.pt"]


def test_load_himae_from_s3_matches_the_saved_model(tmp_path, s3):
    from himae_dist.checkpoint import load_himae
    from himae_dist.weights_export import sync_exports

    fs, opts = s3
    final = _fake_run(tmp_path)
    sync_exports(tmp_path, "s3://himae-test/exports/load", opts)
    model, info = load_himae("s3://himae-test/exports/load/himae_final.pt", storage_options=opts)
    saved, got = final.state_dict(), model.state_dict()
    assert list(got) == list(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    assert info["step"] == 20 and info["config"].channels == (4, 8)
    assert info["source"] == "s3://himae-test/exports/load/himae_final.pt"
    with pytest.raises(FileNotFoundError, match=r"checkpoint s3://himae-test/exports/load/nope\.pt does not exist"):
        load_himae("s3://himae-test/exports/load/nope.pt", storage_options=opts)
    fs.pipe_file("himae-test/exports/load/junk.pt", b"not a checkpoint")
    with pytest.raises(ValueError, match=r"s3://himae-test/exports/load/junk\.pt: cannot load as a weights-only"):
        load_himae("s3://himae-test/exports/load/junk.pt", storage_options=opts)


def test_probe_reads_checkpoints_and_runs_from_s3(tmp_path, s3, tiny_cohort):
    import json

    from himae_dist.checkpoint import save_weights
    from himae_dist.weights_export import sync_exports
    from probes.evaluate import main as probe_main, run_checkpoints
    from probes.random_baseline import random_encoder

    fs, opts = s3
    run = tmp_path / "run"
    for step, seed in ((100, 5), (20, 6)):  # step 100 sorts after 20 by step, not by name
        save_weights(random_encoder(1, seed), run / "weights" / f"step_{step:03d}.pt", step=step)
    save_weights(random_encoder(1, 7), run / "himae_final.pt", step=100)
    url = "s3://himae-test/exports/probe/run"
    sync_exports(run, url, opts)
    assert run_checkpoints(url, opts) == [f"{url}/weights/step_020.pt", f"{url}/weights/step_100.pt"]

    out = tmp_path / "res"
    probe_main(["--run", url, "--checkpoint", str(run / "himae_final.pt"), "--checkpoint", f"{url}/himae_final.pt",
                "--storage-options", json.dumps(opts), "--random-baselines", "0", "--no-plots",
                "--h5", str(tiny_cohort / "downstream.h5"), "--out", str(out), "--folds", "3", "--inner-folds", "2",
                "--n-boot", "20", "--minirocket-kernels", "0"])
    models = json.loads((out / "results.json").read_text())["models"]
    assert [m["name"] for m in models] == [  # unique names cut from the URLs as from paths
        f"{tmp_path.name}/run/himae_final.pt", "probe/run/himae_final.pt", "run/weights/step_020.pt", "run/weights/step_100.pt"]
    local, remote = models[0], models[1]
    assert remote["path"] == f"{url}/himae_final.pt" and remote["step"] == 100
    assert remote["headline"]["metrics"]["roc_auc"]["value"] == local["headline"]["metrics"]["roc_auc"]["value"]
    assert remote["headline"]["metrics"]["roc_auc"]["value"] > 0.5
    assert [m["step"] for m in models[2:]] == [20, 100]


def test_unreachable_export_is_one_clear_error_naming_the_url(tmp_path, dead_s3, tiny_cohort):
    import json

    from himae_dist.checkpoint import load_himae
    from himae_dist.weights_export import sync_exports
    from probes.evaluate import main as probe_main

    dead = dead_s3
    _fake_run(tmp_path)
    with pytest.raises(StorageError, match=r"s3://himae-test/gone.*failed 2 times; last error"):
        sync_exports(tmp_path, "s3://himae-test/gone", dead)
    with pytest.raises(StorageError, match=r"reading s3://himae-test/gone/himae_final\.pt: failed 2 times"):
        load_himae("s3://himae-test/gone/himae_final.pt", storage_options=dead)
    with pytest.raises(SystemExit, match=r"himae-probe: error: .*s3://himae-test/gone/himae_final\.pt: failed 2 times"):
        probe_main(["--checkpoint", "s3://himae-test/gone/himae_final.pt", "--storage-options", json.dumps(dead),
                    "--random-baselines", "0", "--h5", str(tiny_cohort / "downstream.h5"), "--out", str(tmp_path / "o")])


@pytest.mark.slow
def test_trainer_exports_weights_to_s3_and_a_restart_completes_a_lost_final(tiny_shards, tmp_path, s3):
    import json

    from himae_dist.checkpoint import load_himae
    from tests.test_train_distributed import _run_trainer

    fs, opts = s3
    url = "s3://himae-test/runs/export1"
    args = ("--steps", "4", "--save-every", "2", "--micro-batch", "8", "--log-every", "2", "--shuffle-shards", "2",
            "--export-url", url, "--storage-options", json.dumps(opts))
    out = tmp_path / "run"
    proc = _run_trainer(tiny_shards, out, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = sorted(p.split("export1/", 1)[1] for p in fs.find("himae-test/runs/export1", refresh=True))
    assert remote == ["himae_final.pt", "weights/step_0000002.pt", "weights/step_0000004.pt"]
    for name in remote:  # byte for byte the local files
        assert fs.cat_file(f"himae-test/runs/export1/{name}") == (out / name).read_bytes(), name
    model, info = load_himae(f"{url}/himae_final.pt", storage_options=opts)
    assert info["step"] == 4

    fs.rm_file("himae-test/runs/export1/himae_final.pt")  # e.g. the job died during the last upload
    proc = _run_trainer(tiny_shards, out, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to train" in proc.stdout and "exported 1 file(s)" in proc.stdout
    assert fs.cat_file("himae-test/runs/export1/himae_final.pt") == (out / "himae_final.pt").read_bytes()


def test_s3_conversion_reads_each_input_file_once_and_equals_the_local_one(tmp_path):
    """Inputs, index and output on S3 (moto on loopback, every request counted), read by two workers in
    waves: one whole-object GET per input file, no HEAD per file, and shards byte-identical to a
    local one-worker run of the same cohort."""
    from tests.h5_inputs import random_index
    from tests.s3_loopback import S3Loopback

    src = tmp_path / "in"
    src.mkdir()
    index = random_index(src, n=600, n_files=12, patients=6)
    local = convert_pretrain(str(index), ConvertParams(str(tmp_path / "local"), samples_per_shard=50))
    sizes = {p.name: p.stat().st_size for p in src.glob("*.h5")}
    with S3Loopback() as s3:
        fs = s3.fs()
        for p in sorted(src.iterdir()):
            fs.put_file(str(p), f"{s3.bucket}/raw/{p.name}")
        s3.reset()
        remote = convert_pretrain(f"s3://{s3.bucket}/raw/index.csv", ConvertParams(  # 6 waves of 2 files, 2 workers
            f"s3://{s3.bucket}/shards", samples_per_shard=50, storage_options=s3.opts, spill_dir=str(tmp_path / "spill"),
            workers=2, max_rows=100))
        reqs = s3.requests()
        shards = {s["url"]: fs.cat_file(f"{s3.bucket}/shards/{s['url']}") for sp in remote["splits"].values()
                  for s in sp["shards"]}
    assert {u: (tmp_path / "local" / u).read_bytes() for u in shards} == shards  # the same bytes
    assert [s["sha256"] for sp in local["splits"].values() for s in sp["shards"]] == \
        [s["sha256"] for sp in remote["splits"].values() for s in sp["shards"]]
    gets = Counter(key.rsplit("/", 1)[1] for kind, key, n in reqs
                   if kind == "GET" and key.startswith("raw/") and key.endswith(".h5") and n == sizes[key.rsplit("/", 1)[1]])
    assert gets == Counter({name: 1 for name in sizes})  # each input file downloaded whole exactly once
    read = sum(n for kind, key, n in reqs if kind == "GET" and key.startswith("raw/") and key.endswith(".h5"))
    assert read <= sum(sizes.values()) + max(sizes.values())  # plus the plan's shape check: blocks of one file
    assert sum(kind == "HEAD" and key.endswith(".h5") for kind, key, _ in reqs) <= 1
    assert sum(kind == "GET" and key == "raw/index.csv" for kind, key, _ in reqs) == 1  # the index once
    writes = [key for kind, key, _ in reqs if kind == "PUT" and key.startswith("shards/") and "/plan.json" not in key
              and not key.endswith("manifest.json")]
    assert len(writes) == 2 * len(shards)  # the tar and its _parts/ record
    assert not (tmp_path / "spill").exists() or not any((tmp_path / "spill").rglob("*.npz"))


def test_s3_stream_reads_ahead_one_get_per_shard_and_equals_the_local_stream(tmp_path):
    """The loader keeps S3 reads in flight ahead of use: one ranged GET per shard read (the size from
    the manifest, no HEAD), and the batches, failed reads included, are the local stream's exactly."""
    from tests.h5_inputs import random_index
    from tests.s3_loopback import S3Loopback

    (tmp_path / "in").mkdir()
    index = random_index(tmp_path / "in", n=400, n_files=4)
    p = dict(samples_per_shard=25, dtype="float32")
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "local"), **p))
    with S3Loopback() as s3:
        fs = s3.fs()
        for f in sorted((tmp_path / "local").rglob("*")):
            if f.is_file() and ".spill" not in f.parts:
                fs.put_file(str(f), f"{s3.bucket}/shards/{f.relative_to(tmp_path / 'local')}")
        victim = load_manifest(str(tmp_path / "local")).shards()[3].name
        (tmp_path / "local" / victim).write_bytes(b"garbage")  # one bad shard on both sides
        fs.pipe_file(f"{s3.bucket}/shards/{victim}", b"garbage")

        def batches(data: str, opts: dict | None, n: int = 30) -> list:
            loader, _ = make_loader(load_manifest(data, opts), batch_size=16, seed=3, storage_options=opts)
            it = iter(loader)
            return [next(it) for _ in range(n)]

        local = batches(str(tmp_path / "local"), None)
        s3.reset()
        remote = batches(f"s3://{s3.bucket}/shards", s3.opts)
        reqs = s3.requests()
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a["signal"], b["signal"]) and list(a["key"]) == list(b["key"])
        assert a["readers"] == b["readers"]  # reads, failed positions, lost segments of reader 0:0
    reads, failed, _, _ = remote[-1]["readers"]["0:0"]
    assert failed, "the damaged shard was read and skipped"
    shard_gets = [key for kind, key, _ in reqs if kind == "GET" and key.endswith(".tar")]
    assert not [r for r in reqs if r[0] == "HEAD" and r[1].endswith(".tar")]  # the size is the manifest's
    assert len(shard_gets) >= reads  # every read made, some ahead of use
    assert len(shard_gets) <= reads + 8  # ... at most prefetch_reads ahead


@pytest.fixture
def sse_etags(monkeypatch):
    """The module's moto server answers like an SSE-KMS bucket: each new object's ETag is 32 random hex
    digits (not its md5), the same in the PUT response, HEAD and listings, as AWS does."""
    import secrets

    from moto.s3.models import FakeKey

    def etag(self) -> str:
        if self._etag is None:
            self._etag = secrets.token_hex(16)
        return f'"{self._etag}"'

    monkeypatch.setattr(FakeKey, "etag", property(etag))


def test_sse_etags_that_are_not_md5_verify_without_rebuilding(tiny_cohort, s3, sse_etags, capsys):
    """A re-run on an SSE bucket keeps every intact shard (the ETag its PUT returned matches), and a
    shard replaced by other bytes of the same size is still found (new ETag -> sha256) and rebuilt."""
    fs, opts = s3
    index = str(tiny_cohort / "pretrain_index.csv")
    p = ConvertParams("s3://himae-test/sse", samples_per_shard=200, storage_options=opts)
    manifest = convert_pretrain(index, p)
    first = manifest["splits"]["train"]["shards"][0]
    victim = f"himae-test/sse/{first['url']}"
    good = fs.cat_file(victim)
    assert fs.info(victim)["ETag"].strip('"') != hashlib.md5(good).hexdigest()  # the store really is SSE-like
    def etags() -> dict:  # every upload gets a new random ETag
        fs.invalidate_cache()
        return {x: i["ETag"] for x, i in fs.find("himae-test/sse/train", detail=True).items()}

    before = etags()
    assert convert_pretrain(index, p) == manifest
    assert etags() == before  # none re-uploaded

    fs.pipe_file(victim, good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit flipped
    assert convert_pretrain(index, p) == manifest
    assert fs.cat_file(victim) == good

    # `himae-prep verify` reads them back: intact, then one line naming the shard changed on S3
    with pytest.raises(SystemExit) as e:
        prep_main(["verify", "s3://himae-test/sse", "--storage-options", json.dumps(opts)])
    assert e.value.code == 0
    fs.pipe_file(victim, good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(SystemExit) as e:
        prep_main(["verify", "s3://himae-test/sse", "--storage-options", json.dumps(opts)])
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"himae-prep verify: s3://himae-test/sse/{first['url']}: sha256 {hashlib.sha256(fs.cat_file(victim)).hexdigest()[:16]}"
        f"..., the manifest says {first['sha256'][:16]}... (the bytes changed)"]


def test_dry_run_writes_nothing_to_s3_nor_beside_a_local_out(tiny_cohort, s3, tmp_path, capsys):
    """The plan, the timed sample and the look at --out only read: no object appears under an s3://
    --out, and an index read from S3 is copied to a temp folder, not into a local --out's spill."""
    fs, opts = s3
    with open(tiny_cohort / "pretrain_index.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(tmp_path / "index.csv", "w", newline="") as fh:  # absolute local paths: the HDF5 files stay here
        w = csv.writer(fh)
        w.writerow(["local_path", "global_idx"])
        w.writerows((str(tiny_cohort / r["local_path"]), r["global_idx"]) for r in rows)
    fs.put_file(str(tmp_path / "index.csv"), "himae-test/dryin/index.csv")
    for out in ("s3://himae-test/dry", str(tmp_path / "out")):
        prep_main(["--index", "s3://himae-test/dryin/index.csv", "--out", out, "--storage-options", json.dumps(opts),
                   "--samples-per-shard", "100", "--dry-run"])
        text = capsys.readouterr().out
        assert f"input:    s3://himae-test/dryin/index.csv: {len(rows)} rows" in text
        assert "--out:    empty: every shard would be built" in text
    assert fs.find("himae-test/dry") == [] and not (tmp_path / "out").exists()


def test_wfdb_records_from_s3_read_each_file_once_and_equal_the_local_shards(tmp_path):
    """PhysioNet records under an s3:// prefix (moto on loopback, every request counted), 2 workers in
    waves: each header and each signal file is one whole-object GET, and the shards are byte-identical
    to a local one-worker run on the same records."""
    from data_prep.convert import convert_wfdb
    from tests.s3_loopback import S3Loopback
    from tests.wfdb_inputs import real, record_subset

    names = ["bidmc01", "bidmc02", "bidmc03", "bidmc04"]
    src = record_subset(real("bidmc"), tmp_path / "bidmc", names)
    (src / "RECORDS").write_text("\n".join(names) + "\n")
    common = dict(samples_per_shard=40, channel="II", window_s=10.0, stride_s=4.0, target_rate=100.0)
    local = convert_wfdb(str(src), ConvertParams(str(tmp_path / "local"), **common))
    with S3Loopback() as s3:
        fs = s3.fs()
        for p in sorted(src.iterdir()):
            fs.put_file(str(p), f"{s3.bucket}/mitdb-like/1.0.0/{p.name}")
        s3.reset()
        remote = convert_wfdb(f"s3://{s3.bucket}/mitdb-like/1.0.0/", ConvertParams(
            f"s3://{s3.bucket}/shards", storage_options=s3.opts, spill_dir=str(tmp_path / "spill"), workers=2,
            max_rows=120, **common))
        reqs = s3.requests()
        shards = {s["url"]: fs.cat_file(f"{s3.bucket}/shards/{s['url']}") for sp in remote["splits"].values()
                  for s in sp["shards"]}
    assert remote["n_samples"] == local["n_samples"] == 4 * ((60001 - 1250) // 500 + 1)
    assert {u: (tmp_path / "local" / u).read_bytes() for u in shards} == shards  # the same bytes
    gets = Counter(key.rsplit("/", 1)[1] for kind, key, _ in reqs if kind == "GET" and key.startswith("mitdb-like/"))
    assert gets == Counter({**{f"{n}.hea": 1 for n in names}, **{f"{n}.dat": 1 for n in names}, "RECORDS": 1})
    assert not (tmp_path / "spill").exists() or not any((tmp_path / "spill").rglob("*.dat"))


def test_wfdb_label_export_from_s3_equals_the_local_one(tmp_path):
    """`himae-prep label` on an s3:// prefix without RECORDS: each header, signal and annotation file one
    GET, and the same HDF5 datasets as from the local folder."""
    import h5py

    from data_prep.wfdb_label import label_windows
    from data_prep.wfdb_sources import WindowSpec
    from tests.s3_loopback import S3Loopback
    from tests.wfdb_inputs import real, record_subset

    src = record_subset(real("mitdb"), tmp_path / "mitdb", ["106", "119"], (".hea", ".dat", ".atr"))
    spec = WindowSpec(("MLII", "V5"), 10.0, 10.0)
    local = label_windows(str(src), str(tmp_path / "local.h5"), spec, 100.0, ("V",), log=lambda m: None)
    with S3Loopback() as s3:
        fs = s3.fs()
        for p in sorted(src.iterdir()):
            fs.put_file(str(p), f"{s3.bucket}/mitdb/{p.name}")
        s3.reset()
        remote = label_windows(f"s3://{s3.bucket}/mitdb", str(tmp_path / "remote.h5"), spec, 100.0, ("V",),
                               storage_options=s3.opts, log=lambda m: None)
        reqs = s3.requests()
    assert remote["per_record"] == local["per_record"] and local["windows"] == 360 and local["positives"] == 98 + 159
    with h5py.File(tmp_path / "local.h5") as a, h5py.File(tmp_path / "remote.h5") as b:
        for k in ("ecg", "labels", "patient_ids", "records", "starts"):
            assert np.array_equal(a[k][()], b[k][()]), k
    gets = Counter(key.rsplit("/", 1)[1] for kind, key, _ in reqs if kind == "GET")
    assert gets == Counter({f"{n}.{e}": 1 for n in ("106", "119") for e in ("hea", "dat", "atr")})
