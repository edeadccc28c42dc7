"""Local folders and object stores (s3:// through fsspec/s3fs) behind one small interface.

Every remote call goes through `retrying`: transient errors (connection resets, timeouts,
throttling, 5xx) are retried with exponential backoff, then turned into a `StorageError`
that names the URL, so one S3 hiccup does not kill a multi-day job and a real outage is one
clear line, not a traceback. Files are placed atomically: written to a temp file, then
renamed (local) or uploaded with one PUT (remote), so a file that exists is complete.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

RETRIES = int(os.environ.get("HIMAE_IO_RETRIES", "5"))
BACKOFF_S = float(os.environ.get("HIMAE_IO_BACKOFF_S", "0.5"))
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


class StorageError(RuntimeError):
    """A storage operation that kept failing; the message names the URL and the last error."""


def is_transient(e: BaseException) -> bool:
    if isinstance(e, _PERMANENT):
        return False
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        return False  # a full, read-only or forbidden local disk: retrying cannot help
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return True
    mod = type(e).__module__ or ""
    return mod.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3", "requests"))


def _store_refusal(e: Exception, what: str, url: str) -> StorageError | None:
    """A remote store's permanent refusal as one line naming the URL and what to check, or None.
    (s3fs raises them bare: "Forbidden", "The specified bucket does not exist", or AioSession's
    TypeError for an option it does not know.)"""
    if not is_remote(url):
        return None
    if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
        return StorageError(f"{what} {url}: --storage-options holds an option this store does not take ({e}); "
                            f"see the fsspec/s3fs options, e.g. key, secret, token, client_kwargs, config_kwargs")
    if isinstance(e, PermissionError):
        return StorageError(f"{what} {url}: access denied ({e}); check the credentials (--storage-options key/"
                            f"secret/token, the AWS_* variables or profile) and the bucket's permissions")
    if isinstance(e, FileNotFoundError) and "bucket does not exist" in str(e).lower():
        return StorageError(f"{what} {url}: the bucket does not exist; create it, or correct the URL")
    return None


def retrying(fn: Callable[[], T], what: str, url: str, retries: int | None = None, backoff_s: float | None = None) -> T:
    """Call fn(), retrying transient errors with exponential backoff; permanent ones pass through."""
    retries = RETRIES if retries is None else retries
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (classified just below)
            if not is_transient(e):
                named = _store_refusal(e, what, url)
                if named is not None:
                    raise named from e
                raise
            if attempt == retries:
                raise StorageError(f"{what} {url}: failed {retries + 1} times; last error: {type(e).__name__}: {e}") from e
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


# s3fs itself switches to a multipart upload at 2 x its 50 MB chunk; one put_object may hold up to 5 GiB
SINGLE_PUT_MAX_BYTES = 100 * 2**20


def _protocols(fs) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _etag(value: object) -> str | None:
    """An ETag as listings and PUT responses give it, without its quotes (None if there is none)."""
    return str(value).strip('"') if value else None


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def out_problem(out: Path) -> str | None:
    """Creates nothing: why a local --out cannot be the job's folder (a file, or a folder that cannot
    be created or written), or None. (himae-prep and himae-train alike.)"""
    existing = out
    while not existing.exists() and existing.parent != existing:  # its nearest existing ancestor
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == out else f"cannot be created: {existing} is a file"
        return f"--out {out} {where}; expected a folder (created if missing)"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == out else f"cannot be created: {existing} is not writable"
        return f"--out {out} {where} (permission denied or a read-only filesystem); pick another --out"
    return None


class Folder:
    """An output or input folder, local or remote, with listing, atomic placement and retries."""

    def __init__(self, url: str, storage_options: dict | None = None, create: bool = False):
        import fsspec

        self.url = str(url).rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.remote = is_remote(self.url)
        if create and not self.remote:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def child_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def listing(self, sub: str = "") -> dict[str, dict]:
        """name (relative to the folder) -> info (size, ETag...) of files under `sub`, one list call."""
        base = self.path(sub) if sub else self.root

        def ls() -> dict[str, dict]:
            try:
                if self.remote:
                    self.fs.invalidate_cache(base)
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
            return {p[len(self.root) + 1:]: info for p, info in found.items() if p.startswith(self.root + "/")}

        return retrying(ls, "listing", self.child_url(sub))

    def read_bytes(self, name: str, size: int | None = None) -> bytes:
        """The file's bytes. With its `size` known (a manifest's), remotely one ranged GET: s3fs's
        plain cat_file sends a HEAD for the size first."""
        if size is not None and self.remote and size > 0:
            return retrying(lambda: self.fs.cat_file(self.path(name), start=0, end=size), "reading",
                            self.child_url(name))
        return retrying(lambda: self.fs.cat_file(self.path(name)), "reading", self.child_url(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def exists(self, name: str) -> bool:
        return retrying(lambda: self.fs.exists(self.path(name)), "checking", self.child_url(name))

    def remove(self, name: str) -> None:
        def rm() -> None:
            try:
                self.fs.rm_file(self.path(name))
            except FileNotFoundError:
                pass

        retrying(rm, "removing", self.child_url(name))

    def temp_file(self, prefix: str, suffix: str = "") -> tuple[int, str]:
        """A temp file on the same filesystem as the folder (local: so the rename is atomic)."""
        return tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=None if self.remote else self.root)

    def place(self, local_tmp: str, name: str) -> str | None:
        """Move a finished temp file to `name` with mode 0644: rename locally, one PUT remotely.

        Returns the ETag the store gave the new object (None locally, or where the store has none):
        on SSE-KMS/SSE-C buckets it is not the MD5 of the bytes, so a later check can only compare
        it with itself."""
        os.chmod(local_tmp, 0o644)  # mkstemp makes 0600; shards are data other users read
        if not self.remote:
            Path(self.path(name)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(local_tmp, self.path(name))
            return None
        try:
            return retrying(lambda: self._put(local_tmp, name), "uploading", self.child_url(name))
        finally:
            os.unlink(local_tmp)

    def _put(self, local_path: str, name: str) -> str | None:
        """One upload of `local_path` to `name`; the ETag of the object it made.

        On S3 a file under the multipart threshold is one put_object, whose response carries the
        ETag (no extra request); otherwise s3fs's put_file, then one HEAD for the ETag."""
        bucket_key = self.path(name)
        if "s3" in _protocols(self.fs) and os.path.getsize(local_path) < SINGLE_PUT_MAX_BYTES:
            bucket, key, _ = self.fs.split_path(bucket_key)
            with open(local_path, "rb") as fh:
                resp = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=fh.read())
            self.fs.invalidate_cache(bucket_key)
            return _etag(resp.get("ETag"))
        self.fs.put_file(local_path, bucket_key)
        try:
            return _etag(self.fs.info(bucket_key).get("ETag"))
        except FileNotFoundError:
            return None

    def upload(self, local_path: str | os.PathLike, name: str, tmp_prefix: str = ".tmp-") -> None:
        """Copy an existing local file to `name` (mode 0644) and keep the original: one PUT
        remotely, a temp copy placed locally, so `name` is never half-written."""
        if self.remote:
            retrying(lambda: self._put(os.fspath(local_path), name), "uploading", self.child_url(name))
            return
        fd, tmp = self.temp_file(tmp_prefix)
        try:
            with os.fdopen(fd, "wb") as out, open(local_path, "rb") as src:
                shutil.copyfileobj(src, out)
            self.place(tmp, name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_bytes(self, name: str, data: bytes, tmp_prefix: str = ".tmp-") -> None:
        fd, tmp = self.temp_file(tmp_prefix)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self.place(tmp, name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_text(self, name: str, text: str, tmp_prefix: str = ".tmp-") -> None:
        self.write_bytes(name, text.encode(), tmp_prefix)

    def clean_temp_files(self, prefix: str) -> int:
        """Remove orphaned temp files `prefix*` left in a local folder by a killed run."""
        if self.remote:
            return 0
        n = 0
        for p in Path(self.root).glob(f"{prefix}*"):
            p.unlink(missing_ok=True)
            n += 1
        return n


def file_fingerprints(paths: list[str], storage_options: dict | None = None) -> dict[str, list]:
    """path -> [size, mtime or ETag] for input files; remote folders are listed once each.

    Missing files get no entry (the rows that name them are counted as `missing_file`).
    """
    import fsspec

    out: dict[str, list] = {}
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        if is_remote(p):
            by_dir.setdefault(p.rsplit("/", 1)[0], []).append(p)
        else:
            try:
                st = os.stat(p)
                out[p] = [st.st_size, st.st_mtime_ns]
            except OSError:
                pass
    for d, files in by_dir.items():
        fs, root = fsspec.core.url_to_fs(d, **(storage_options or {}))
        scheme = d.split("://", 1)[0]

        def ls(fs=fs, root=root) -> list[dict]:
            try:
                fs.invalidate_cache(root)
                return fs.ls(root, detail=True)
            except FileNotFoundError:
                return []

        listed = {f"{scheme}://{i['name']}": i for i in retrying(ls, "listing", d)}
        for p in files:
            if p in listed:
                i = listed[p]
                out[p] = [int(i.get("size") or 0), str(i.get("ETag") or i.get("LastModified") or i.get("mtime") or "")]
    return out


# Substrings of credential-like option names (fsspec/s3fs/botocore/adlfs/gcsfs spellings): key, secret,
# aws_secret_access_key, aws_session_token, token, password, account_key, sas_token, connection_string...
_SECRET_NAME_PARTS = ("key", "secret", "token", "password", "passwd", "credential", "connection_string", "auth",
                      "cookie")
_NOT_SECRET = {"anon", "google_default", "cloud", "browser", "cache"}  # gcsfs `token` modes, not credentials
REDACTED = "<redacted>"


_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")


def _redact_url_passwords(text: str) -> str:
    """text with the password of every scheme://user:PASSWORD@host replaced by REDACTED, in one pass (linear
    in len(text), whatever it holds: a regex with backtracking is quadratic on crafted input).

    Users type passwords (and user names) with '/' and '@' unescaped, so the password runs to the last '@'
    before the next blank: where a URL is ambiguous (an '@' in its path), more is redacted rather than less."""
    out, emitted, scan, n, tok_end = [], 0, 0, len(text), -1  # text[:emitted] is in out; search from scan
    while True:
        j = text.find("://", scan)
        if j < 0:
            break
        b = j
        while b > scan and text[b - 1] in _SCHEME_CHARS:
            b -= 1
        while b < j and not text[b].isalpha():  # a scheme starts with a letter ("1http://" reads as http://)
            b += 1
        if b == j:  # no scheme: a URL may still start right after this "://"
            scan = j + 3
            continue
        k = j + 3
        while k < n and text[k] not in "/:" and not text[k].isspace():  # the user name ('@' in it too)
            k += 1
        if k >= n or text[k] != ":":
            scan = k  # no ':' before it: no "://" starts inside the part just scanned
            continue
        if tok_end <= k:  # the blank ending this token (kept while later URLs sit in the same token)
            tok_end = k + 1
            while tok_end < n and not text[tok_end].isspace():
                tok_end += 1
        at = text.rfind("@", k + 1, tok_end)
        if at < 0:  # no '@' up to the blank: no password here, nor in any URL later in this token
            scan = tok_end
            continue
        out.append(text[emitted:k + 1] + REDACTED)
        emitted = scan = at  # from the last '@' on, kept
    out.append(text[emitted:])
    return "".join(out)


def redact_secrets(value: object) -> object:
    """A copy of `value` (storage options, or a config holding them) with every value under a
    credential-like key, at any depth, and the password of a URL (scheme://user:PASSWORD@host)
    replaced by REDACTED: what a log, a file or W&B may show."""
    if isinstance(value, str):
        return _redact_url_passwords(value)
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and any(part in k.lower() for part in _SECRET_NAME_PARTS)
                    and v is not None and not isinstance(v, bool) and not (isinstance(v, str) and v in _NOT_SECRET)
                    else redact_secrets(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v) for v in value)
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """A command line as a log or W&B may record it: --storage-options' credentials and URL passwords redacted."""
    def is_flag(a: str) -> bool:  # argparse takes any unambiguous prefix (--storage-opt)
        return len(a) >= 5 and "--storage-options".startswith(a)

    out = []
    for i, arg in enumerate(argv):
        value, prefix = (arg, "") if i and is_flag(argv[i - 1]) else (None, "")
        if "=" in arg and is_flag(arg.split("=", 1)[0]):
            prefix = arg.split("=", 1)[0] + "="
            value = arg[len(prefix):]
        if value is None:
            out.append(redact_secrets(arg))
            continue
        try:
            out.append(prefix + json.dumps(redact_secrets(json.loads(value))))
        except ValueError:
            out.append(prefix + REDACTED)
    return out


def json_object(text: str) -> dict:
    """argparse type of --storage-options (every job's): a JSON object, or a message saying what is wrong."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): expected an object such as "
                                         f"'{{\"client_kwargs\": {{\"endpoint_url\": \"http://...\"}}}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got a {type(value).__name__}")
    return value
