"""Copy a run's exported weights to an export folder (s3:// or any fsspec URL, or a local path).

The trainer writes `weights/step_*.pt` and `himae_final.pt` locally on rank 0; `sync_exports`
makes the export folder hold the same files under the same names. It lists the export once and
uploads only what is missing there or differs in size, each file as one atomic PUT with retries
(`data_prep.storage.Folder.upload`), so calling it after every save is cheap and retries any
upload an earlier call lost. `himae_final.pt` goes last. `Exporter` runs those syncs on rank 0
in a background thread, so no rank waits on the object store inside a collective.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from typing import Callable

from data_prep.storage import Folder, StorageError, redact_secrets

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


class Exporter:
    """Rank 0's uploads to --export-url, off the training loop: one sync at a time, in a thread.

    A save only kicks a sync, so the other ranks never wait on the store inside a collective
    (nor past --collective-timeout-s). A failed sync is a warning, and the next kick retries it
    (the sync is idempotent). `finish()`, after the last collective, waits for the thread, then
    syncs once more in the foreground, uploading the final weights again, and raises if that fails.
    """

    def __init__(self, out: str | Path, url: str, storage_options: dict | None = None):
        self.out, self.url, self.storage_options = Path(out), url, storage_options
        self.shown = redact_secrets(url)  # as logs show it
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._again = False

    def check(self, timeout_s: float = 60.0) -> None:
        """At start: write a small file at the URL (one fixed name, removed if the store allows), so a
        typo or a missing permission is an error before the first step. Gives up after `timeout_s`."""
        def probe() -> None:
            folder = Folder(self.url, self.storage_options, create=True)
            folder.write_bytes(".himae_export_check", b"ok")
            try:
                folder.remove(".himae_export_check")
            except Exception:  # noqa: BLE001 (a write-only bucket is a fine export)
                pass

        failure: list[BaseException] = []
        t = threading.Thread(target=lambda: _capture(probe, failure), name="himae-export-check", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            raise TimeoutError(f"no answer from {self.url} within {timeout_s:g} s")
        if failure:
            raise failure[0]

    def kick(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._again = True  # the running sync goes round once more
                return
            self._thread = threading.Thread(target=self._run, name="himae-export", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                sent = sync_exports(self.out, self.url, self.storage_options)
                if sent:
                    print(f"[himae-train] exported {len(sent)} file(s) to {self.shown}", flush=True)
            except Exception as e:  # noqa: BLE001 (any failure: warn, the next kick retries)
                print(redact_secrets(f"[himae-train] warning: export to {self.url} failed, retried at the next save: "
                                     f"{type(e).__name__}: {e}"), file=sys.stderr, flush=True)
            with self._lock:
                if not self._again:
                    self._thread = None
                    return
                self._again = False

    def finish(self) -> list[str]:
        """Wait for the background sync, then upload whatever is missing and the final weights again."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()
        try:
            sent = sync_exports(self.out, self.url, self.storage_options, refresh=(FINAL_NAME,))
        except Exception as e:  # noqa: BLE001 (one clear error naming the URL)
            raise StorageError(f"export to {self.url} failed at the end of the run: {type(e).__name__}: {e}; "
                               f"a re-run uploads what is missing") from e
        print(f"[himae-train] exported {len(sent)} file(s) to {self.shown}", flush=True)
        return sent


def _capture(fn: Callable[[], None], failure: list) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 (handed to the waiting thread)
        failure.append(e)
