import pickle

import pytest
import torch

from himae_dist.checkpoint import load_himae, save_weights
from himae_dist.model import HiMAE


def _perturbed(in_chans=1):
    torch.manual_seed(0)
    m = HiMAE(in_chans)
    with torch.no_grad():  # non-default BN statistics too, so they must round-trip
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def test_seed_lightning_checkpoint_round_trip(tmp_path):
    m = _perturbed()
    ckpt = {
        "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
        "hyper_parameters": {"lr": 1e-3, "mask_ratio": 0.8},
    }
    torch.save(ckpt, tmp_path / "himae_synth.ckpt")
    loaded, info = load_himae(tmp_path / "himae_synth.ckpt")
    x = torch.randn(2, 1, 250)
    assert torch.equal(loaded(x), m(x))
    assert info["config"].channels == (16, 32, 64, 128, 256)


def test_exported_weights_load_into_a_seed_named_module(tmp_path):
    m = _perturbed(in_chans=2)
    save_weights(m, tmp_path / "w.pt", step=7)
    obj = torch.load(tmp_path / "w.pt", map_location="cpu", weights_only=True)
    fresh = HiMAE(in_chans=2)
    fresh.load_state_dict(obj["state_dict"], strict=True)  # seed names, nothing extra
    x = torch.randn(2, 2, 1000)
    assert torch.equal(fresh.eval()(x), m(x))
    loaded, info = load_himae(tmp_path / "w.pt")
    assert info["step"] == 7 and loaded.config.in_chans == 2


def test_non_himae_state_dict_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {"fc.weight": torch.zeros(1, 256)}}, tmp_path / "probe.pt")
    with pytest.raises(ValueError, match="not a HiMAE checkpoint"):
        load_himae(tmp_path / "probe.pt")


def test_mismatched_weights_name_the_file(tmp_path):
    sd = HiMAE().state_dict()
    del sd["final_deconv.bias"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"(?s)partial\.pt: weights do not match.*final_deconv\.bias"):
        load_himae(tmp_path / "partial.pt")


class _NotAllowed:
    pass


def test_arbitrary_pickles_are_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"state_dict": _NotAllowed()}, fh)
    with pytest.raises(ValueError, match="evil.pt: cannot load as a weights-only checkpoint"):
        load_himae(tmp_path / "evil.pt")


def test_sync_exports_to_a_local_folder(tmp_path):
    """A plain path (or file://) is an export folder too: same names, same bytes, sources kept."""
    from data_prep.storage import Folder
    from himae_dist.weights_export import export_names, sync_exports

    run, dest = tmp_path / "run", tmp_path / "export"
    for step in (200, 1000):  # step order, not name order
        save_weights(HiMAE(1, (4, 8)), run / "weights" / f"step_{step}.pt", step=step)
    (run / "weights" / ".step_3.pt.tmp-7").write_bytes(b"partial")
    assert export_names(run) == ["weights/step_200.pt", "weights/step_1000.pt"]
    assert not Folder(str(dest)).exists("himae_final.pt")
    assert sync_exports(run, str(dest)) == ["weights/step_1000.pt", "weights/step_200.pt"]
    save_weights(HiMAE(1, (4, 8)), run / "himae_final.pt", step=1000)
    assert sync_exports(run, f"file://{dest}") == ["himae_final.pt"] and Folder(str(dest)).exists("himae_final.pt")
    assert sync_exports(run, str(dest)) == []
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "himae_final.pt", "weights", "weights/step_1000.pt", "weights/step_200.pt"]
    for n in export_names(run):
        assert (dest / n).read_bytes() == (run / n).read_bytes() and (dest / n).stat().st_mode & 0o777 == 0o644
    model, info = load_himae(f"file://{dest}/himae_final.pt")
    assert info["step"] == 1000 and model.config.channels == (4, 8)


def test_exporter_warns_and_retries_a_failed_sync_and_its_finish_reuploads_the_final(tmp_path, monkeypatch, capsys):
    from data_prep.storage import StorageError
    from himae_dist import weights_export

    run, dest = tmp_path / "run", tmp_path / "export"
    exporter = weights_export.Exporter(run, str(dest))
    exporter.check()  # writable: nothing left behind
    assert list(dest.iterdir()) == []
    save_weights(HiMAE(1, (4, 8)), run / "weights" / "step_1.pt", step=1)
    real, calls = weights_export.sync_exports, []

    def flaky(*args, **kwargs):
        calls.append(kwargs.get("refresh", ()))
        if len(calls) == 1:
            raise OSError("store unreachable")
        return real(*args, **kwargs)

    monkeypatch.setattr(weights_export, "sync_exports", flaky)
    exporter.kick()
    exporter._thread and exporter._thread.join()
    assert "warning: export to" in capsys.readouterr().err and not (dest / "weights").exists()
    save_weights(HiMAE(1, (4, 8)), run / "himae_final.pt", step=1)
    (dest / "himae_final.pt").write_bytes(b"x" * (run / "himae_final.pt").stat().st_size)  # stale, same size
    exporter.kick()  # the next save retries
    exporter.finish()
    assert calls[-1] == ("himae_final.pt",)  # finish uploads the final whatever the export holds
    for name in ("weights/step_1.pt", "himae_final.pt"):
        assert (dest / name).read_bytes() == (run / name).read_bytes()

    monkeypatch.setattr(weights_export, "sync_exports", lambda *a, **k: (_ for _ in ()).throw(OSError("gone")))
    with pytest.raises(StorageError, match=f"export to {dest} failed at the end of the run: OSError: gone"):
        exporter.finish()
    (tmp_path / "afile").write_text("")
    with pytest.raises(OSError):  # the trainer names --export-url with it, before the first step
        weights_export.Exporter(run, str(tmp_path / "afile" / "exp")).check()


def test_exporter_kicks_during_a_running_sync_merge_into_one_more_pass(tmp_path, monkeypatch):
    import threading

    from himae_dist import weights_export

    started, release, calls = threading.Event(), threading.Event(), []

    def slow(*args, **kwargs):
        calls.append(kwargs.get("refresh", ()))
        started.set()
        release.wait(10)
        return []

    monkeypatch.setattr(weights_export, "sync_exports", slow)
    exporter = weights_export.Exporter(tmp_path / "run", str(tmp_path / "export"))
    exporter.kick()
    assert started.wait(10)
    exporter.kick(), exporter.kick()  # two saves while the first sync uploads
    release.set()
    exporter.finish()  # waits for the thread, then its own sync with the final refreshed
    assert calls == [(), (), ("himae_final.pt",)]
