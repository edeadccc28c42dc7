"""Bad input to himae-probe is one clear line naming the file or flag, and every flag says what it does."""

import argparse

import pytest
import torch

from himae_dist.checkpoint import save_weights
from probes.evaluate import build_parser, main as probe_main
from probes.random_baseline import random_encoder


def test_every_flag_has_help():
    for action in build_parser()._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"{action.option_strings} has no help text"


def test_score_flags_have_help(capsys):
    with pytest.raises(SystemExit):
        probe_main(["score", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("CSV with columns label, p_pvc", "patient bootstrap resamples", "seed of the bootstrap", "JSON file"):
        assert text in out


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file at all", b"\x89HDF\r\n\x1a\n" + b"\0" * 40])
def test_a_truncated_or_foreign_h5_is_one_line_naming_it(tmp_path, content):
    (tmp_path / "bad.h5").write_bytes(content)
    with pytest.raises(SystemExit, match=r"--h5 .*bad\.h5: not a readable HDF5 file"):
        probe_main(["--random-baselines", "1", "--h5", str(tmp_path / "bad.h5"), "--out", str(tmp_path / "o")])


def test_a_checkpoint_with_nan_weights_is_named(tiny_cohort, tmp_path):
    model = random_encoder(1, 0)
    with torch.no_grad():
        model.encoder_layers[2].main_path[0].weight[0, 0, 0] = float("nan")
    save_weights(model, tmp_path / "nan.pt", step=5)
    with pytest.raises(SystemExit, match=r"error: .*nan\.pt: 1 tensor\(s\) hold NaN or inf \(first: encoder_layers\.2"):
        probe_main(["--checkpoint", str(tmp_path / "nan.pt"), "--random-baselines", "0", "--h5",
                    str(tiny_cohort / "downstream.h5"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("text,message", [("", r"p\.csv is empty; expected a CSV with the header"),
                                          ("patient_id,label,p_pvc\n", r"p\.csv: a header and no rows")])
def test_an_empty_predictions_csv_is_a_clear_line(tmp_path, text, message):
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(SystemExit, match=message):
        probe_main(["score", "--predictions", str(tmp_path / "p.csv")])
