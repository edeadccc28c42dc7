"""Exported plain weights, and loading HiMAE from any checkpoint a user is likely to hold.

Formats `load_himae` accepts (all through `torch.load(..., weights_only=True)`):
  - ours: {"format": "himae-dist-weights-v1", "state_dict", "model_config", "step", "preprocess"}
    (`preprocess`: the `data_prep.preprocess.Preprocess.to_dict()` of the data it was trained on,
    so evaluation can apply the same scaling and rate)
  - the seed's Lightning `.ckpt`: {"state_dict": {"model.<name>": ...}, ...}
  - a bare HiMAE state_dict (seed names)
  - a DeepSpeed checkpoint folder (the `latest` tag, or a tag folder); local only; a trainer's tag
    folder's model file must match the size and sha256 its run state recorded
Any single weights file may also be a remote fsspec URL (s3://bucket/run/himae_final.pt).
The architecture (in_chans, channels) is read off the weights, so nothing needs guessing; weights
holding NaN or inf are refused.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from data_prep.atomic_write import atomic_path
from data_prep.storage import is_remote, retrying
from himae_dist.checkpoint_files import RUN_STATE, record_problem
from himae_dist.model import HiMAE, HiMAEConfig

WEIGHTS_FORMAT = "himae-dist-weights-v1"


def save_weights(model: HiMAE, path: str | os.PathLike, step: int, extra: dict | None = None) -> None:
    """Write fp32 weights with the seed's parameter names, atomically."""
    sd = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in model.state_dict().items()}
    obj = {"format": WEIGHTS_FORMAT, "state_dict": sd, "model_config": model.config.to_dict(), "step": int(step)}
    obj.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def config_from_state_dict(sd: dict[str, torch.Tensor], source: str) -> HiMAEConfig:
    chans, i = [], 0
    while f"encoder_layers.{i}.main_path.0.weight" in sd:
        chans.append(int(sd[f"encoder_layers.{i}.main_path.0.weight"].shape[0]))
        i += 1
    if not chans:
        raise ValueError(
            f"{source}: no 'encoder_layers.0.main_path.0.weight' in the state_dict; not a HiMAE checkpoint "
            f"(first keys: {list(sd)[:5]})"
        )
    return HiMAEConfig(in_chans=int(sd["encoder_layers.0.main_path.0.weight"].shape[1]), channels=tuple(chans))


def _deepspeed_model_file(folder: Path) -> Path:
    tag_dir = folder
    if (folder / "latest").is_file():
        tag_dir = folder / (folder / "latest").read_text().strip()
    f = tag_dir / "mp_rank_00_model_states.pt"
    if not f.is_file():
        raise FileNotFoundError(f"{folder}: not a DeepSpeed checkpoint folder (no {f.relative_to(folder)})")
    return f


def extract_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a dict checkpoint, got {type(obj).__name__}")
    if "module" in obj and isinstance(obj["module"], dict):  # DeepSpeed model states
        return obj["module"]
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise ValueError(f"{source}: 'state_dict' is a {type(sd).__name__}, expected a dict")
    if any(k.startswith("model.") for k in sd):  # the seed's Lightning module stores the net as .model
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd


def _read_remote(url: str, storage_options: dict | None) -> object:
    """torch.load a single weights file at an fsspec URL; the bytes come through `retrying`."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    try:
        data = retrying(lambda: fs.cat_file(root), "reading", url)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {url} does not exist") from e
    except IsADirectoryError as e:
        raise ValueError(f"{url}: is a folder; a remote checkpoint must be one weights file") from e
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or corrupt file: say which file and why
        raise ValueError(f"{url}: cannot load as a weights-only checkpoint: {e}") from e


def _read_local(path: str | os.PathLike) -> tuple[object, str]:
    p = Path(str(path)[len("file://"):] if str(path).startswith("file://") else path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    f = _deepspeed_model_file(p) if p.is_dir() else p
    if p.is_dir() and (f.parent / RUN_STATE).is_file():  # a trainer's tag: the file must be the one it saved
        try:
            records = torch.load(f.parent / RUN_STATE, map_location="cpu", weights_only=True).get("files") or {}
        except Exception as e:  # noqa: BLE001 (refused or damaged: named)
            raise ValueError(f"{f.parent / RUN_STATE}: cannot be read weights-only ({type(e).__name__}: {e})") from e
        if f.name in records and (problem := record_problem(f, records[f.name])):
            raise ValueError(problem)
    try:
        return torch.load(f, map_location="cpu", weights_only=True), str(f)
    except Exception as e:  # unpickling refused or corrupt file: say which file and why
        raise ValueError(f"{f}: cannot load as a weights-only checkpoint: {e}") from e


def load_himae(path: str | os.PathLike, *, storage_options: dict | None = None) -> tuple[HiMAE, dict]:
    """Build a HiMAE from a checkpoint (any format above) with strict=True; returns (model, info).

    `path` may be a remote fsspec URL (s3://...) of one weights file; `storage_options` go to
    fsspec. Missing: FileNotFoundError naming it; a store that keeps failing: StorageError.
    """
    if is_remote(str(path)):
        f = str(path)
        obj = _read_remote(f, storage_options)
    else:
        obj, f = _read_local(path)
    sd = extract_state_dict(obj, f)
    cfg = (
        HiMAEConfig.from_dict(obj["model_config"])
        if isinstance(obj, dict) and "model_config" in obj
        else config_from_state_dict(sd, f)
    )
    model = HiMAE.from_config(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{f}: weights do not match HiMAE(in_chans={cfg.in_chans}, channels={cfg.channels}): {e}"
        ) from e
    bad = [n for n, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # NaN features in a probe, a NaN loss at step 1 of --init-from: name the file instead
        raise ValueError(f"{f}: {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}); these weights cannot be used "
                         f"(was the run diverging when they were saved?)")
    model.eval()
    step = obj.get("step") if isinstance(obj, dict) else None
    preprocess = obj.get("preprocess") if isinstance(obj, dict) else None
    return model, {"source": f, "config": cfg, "step": step, "preprocess": preprocess}
