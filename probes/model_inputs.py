"""The probe feeds a checkpoint the same kind of input it was pretrained on.

Pretraining data is preprocessed once (per-segment min-max to [-1, 1] by default, maybe resampled)
and that `Preprocess` is recorded with the checkpoint (and in the shards' manifest). A probe that
fed `/ppg` as stored would show the encoder a different input distribution on raw-unit data. So
the probe applies the recorded normalisation and resamples the downstream rate to the rate the
checkpoint was trained at; where nothing is recorded (the seed's Lightning .ckpt, bare
state_dicts) it falls back to the seed's default (min-max, no resampling) and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.preprocess import Preprocess

SEED_DEFAULT = Preprocess(normalize="minmax")


@dataclass(frozen=True)
class InputRecipe:
    """How one checkpoint's probe input is made from the downstream segments."""

    preprocess: Preprocess  # applied to the downstream segments [N, C, L]
    source: str  # where the training preprocessing came from: checkpoint, manifest or seed default
    note: str  # one line for the outputs

    def to_dict(self) -> dict:
        return {"source": self.source, "note": self.note, "preprocess": self.preprocess.to_dict()}


def manifest_preprocess(path: str | Path) -> dict:
    """The top-level "preprocess" dict of a converted shards' manifest.json."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--manifest {p} does not exist")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--manifest {p}: not JSON ({e})") from e
    if not isinstance(m, dict) or not isinstance(m.get("preprocess"), dict):
        raise ValueError(f"--manifest {p}: no top-level 'preprocess' object (written by himae-prep)")
    return m["preprocess"]


def input_recipe(
    name: str, recorded: dict | None, manifest: dict | None, data_fs: float | None, data_length: int
) -> InputRecipe:
    """Decide the probe's preprocessing for one checkpoint; clear error when lengths cannot match.

    recorded: the checkpoint's `info["preprocess"]` (None for foreign checkpoints);
    manifest: the shards' manifest "preprocess" (from --manifest), used when the checkpoint has none.
    """
    if recorded is not None and manifest is not None:
        a, b = Preprocess.from_dict(recorded), Preprocess.from_dict(manifest)
        if (a.normalize, a.output_rate) != (b.normalize, b.output_rate):
            raise ValueError(
                f"{name}: the checkpoint records preprocessing {recorded} but --manifest records {manifest}; "
                f"they disagree on normalisation or rate, so one of them is not this checkpoint's training data"
            )
    used, source = (recorded, "checkpoint") if recorded is not None else (manifest, "manifest")
    if used is None:
        return InputRecipe(SEED_DEFAULT, "seed default",
                           "no preprocessing recorded with the checkpoint (and no --manifest): the seed's "
                           "default, per-segment min-max to [-1, 1], no resampling")
    train = Preprocess.from_dict(used)
    train_rate, train_length = used.get("output_rate", train.output_rate), used.get("output_length")
    if train_length is None and train.length is not None:
        train_length = train.output_length()
    if train_rate is not None and data_fs is not None and float(train_rate) != float(data_fs):
        pre = Preprocess(normalize=train.normalize, source_rate=float(data_fs), target_rate=float(train_rate),
                         constant="keep")
        try:
            out_length = pre.output_length(data_length)
        except ValueError as e:
            raise ValueError(f"{name}: {e} (the checkpoint was trained at {train_rate} Hz)") from e
        how = f"resampled {data_fs:g} -> {train_rate:g} Hz"
    else:
        pre, out_length = Preprocess(normalize=train.normalize, constant="keep"), data_length
        how = "no resampling" if data_fs is not None or train_rate is None else (
            f"no resampling (data rate unknown: no attrs['fs'] and no --fs; assumed {train_rate:g} Hz)")
    if train_length is not None and out_length != int(train_length):
        rate = f" at {train_rate:g} Hz" if train_rate is not None else ""
        raise ValueError(
            f"{name}: downstream segments of {data_length} samples ({how}) give {out_length}-sample model inputs, "
            f"but the checkpoint was pretrained on {train_length}-sample segments{rate}; give the data's true "
            f"rate with --fs, or cut the segments to the pretraining duration"
        )
    return InputRecipe(pre, source, f"{source} preprocessing: normalize={train.normalize}, {how}")


def model_input(signals: np.ndarray, recipe: InputRecipe) -> np.ndarray:
    """signals [N, C, L] (constant segments already dropped) -> model input [N, C, L_out] float32."""
    x, kept = recipe.preprocess.apply(signals)
    assert kept.all()  # constant="keep": rows never move, so labels stay aligned
    return x
