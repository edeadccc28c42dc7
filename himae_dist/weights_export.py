"""Copy a run's exported weights to an export folder (s3:// or any fsspec URL, or a local path).

The trainer writes `weights/step_*.pt` and `himae_final.pt` locally on rank 0; `sync_exports`
makes the export folder hold the same files under the same names. It lists the export once and
uploads only what is missing there or differs in size, each file as one atomic PUT with retries
(`data_prep.storage.Folder.upload`), so calling it after every save is cheap and retries any
upload an earlier call lost. `himae_final.pt` goes last: an export that holds it is complete.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.storage import Folder

FINAL_NAME = "himae_final.pt"
_STEP = re.compile(r"step_(\d+)\.pt")


def export_names(out: str | Path) -> list[str]:
    """Exported weights under a run folder, relative to it: `weights/step_*.pt` in step order, then the final."""
    out = Path(out)
    steps = [p for p in (out / "weights").glob("step_*.pt") if p.is_file() and _STEP.fullmatch(p.name)]
    names = [f"weights/{p.name}" for p in sorted(steps, key=lambda p: int(_STEP.fullmatch(p.name).group(1)))]
    if (out / FINAL_NAME).is_file():
        names.append(FINAL_NAME)
    return names


def sync_exports(out: str | Path, url: str, storage_options: dict | None = None,
                 refresh: tuple[str, ...] = ()) -> list[str]:
    """Upload every exported weights file under `out` that `url` lacks or holds at another size.

    Names in `refresh` are uploaded whatever the export holds: a rewritten `himae_final.pt` (a run
    resumed to more steps) has the same size as the old one.

    Returns the uploaded names (relative, sorted); [] when the export was already complete.
    Raises `data_prep.storage.StorageError` naming the URL when the store keeps failing.
    """
    out = Path(out)
    folder = Folder(url, storage_options, create=True)
    remote = folder.listing()  # one list call for the whole export
    todo = []
    for name in export_names(out):
        info = remote.get(name)
        if name in refresh or info is None or int(info.get("size") or 0) != (out / name).stat().st_size:
            todo.append(name)
    for name in todo:  # steps first, final last (export_names' order)
        folder.upload(out / name, name)
    return sorted(todo)


def exported(url: str, storage_options: dict | None = None, name: str = FINAL_NAME) -> bool:
    """Whether the export folder at `url` holds `name` (default `himae_final.pt`); one call, with retries."""
    return Folder(url, storage_options).exists(name)
