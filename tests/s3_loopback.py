"""moto's S3 server on loopback, in its own process, counting every request and the bytes it sends.

Optionally it behaves like real object storage seen from a GPU node: `latency_ms` before the first
byte of every response, and each response streamed at `stream_mbps` MB/s. Used by the tests and
benchmarks that count requests (bench/bench_convert_s3.py, bench/bench_loader_s3.py).

    with S3Loopback(latency_ms=30, stream_mbps=100) as s3:
        s3.opts          # storage_options for s3fs / himae-prep --storage-options
        s3.reset(); ...; s3.requests()   # [(method, kind, key, bytes sent)]
        s3.cpu_s()       # CPU seconds the server process has used
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs

ROOT = Path(__file__).resolve().parents[1]


class _Counting:
    """WSGI middleware: records (method, kind, key, bytes) per request; optional latency and pacing."""

    def __init__(self, app, latency_s: float, stream_bps: float | None):
        self.app, self.latency_s, self.stream_bps = app, latency_s, stream_bps
        self.lock, self.log = threading.Lock(), []

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/__stats":
            with self.lock:
                body = json.dumps(self.log).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/__reset":
            with self.lock:
                self.log = []
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        method, query = environ["REQUEST_METHOD"], parse_qs(environ.get("QUERY_STRING", ""))
        parts = path.lstrip("/").split("/", 1)
        key = parts[1] if len(parts) > 1 else ""
        kind = method
        if method == "GET" and (not key or "list-type" in query or "prefix" in query or "delimiter" in query):
            kind = "LIST"
        elif method == "GET" and environ.get("HTTP_RANGE"):
            kind = "GET"  # a ranged GET is a GET; its bytes are counted below
        body = self.app(environ, start_response)
        return self._stream(body, kind, key)

    def _stream(self, body, kind: str, key: str):
        sent, start = 0, None
        try:
            for chunk in body:
                if start is None:
                    if self.latency_s:
                        time.sleep(self.latency_s)  # before the first byte (werkzeug sends headers with it)
                    start = time.perf_counter()
                for i in range(0, max(1, len(chunk)), 1 << 20):
                    piece = chunk[i:i + (1 << 20)]
                    sent += len(piece)
                    if self.stream_bps:
                        ahead = sent / self.stream_bps - (time.perf_counter() - start)
                        if ahead > 0:
                            time.sleep(ahead)
                    yield piece
        finally:
            if hasattr(body, "close"):
                body.close()
            with self.lock:
                self.log.append((kind, kind, key, sent))


def serve(port: int, latency_ms: float, stream_mbps: float | None) -> None:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = _Counting(DomainDispatcherApplication(create_backend_app), latency_ms / 1000,
                    stream_mbps * 1e6 if stream_mbps else None)
    server = make_server("127.0.0.1", port, app, threaded=True)
    print(server.server_port, flush=True)  # port 0: the parent learns the port the kernel chose
    server.serve_forever()


class S3Loopback:
    """The server as a child process, with a bucket made; stopped (killed) on exit."""

    def __init__(self, bucket: str = "himae-bench", latency_ms: float = 0, stream_mbps: float | None = None):
        self.bucket, self.latency_ms, self.stream_mbps = bucket, latency_ms, stream_mbps

    def __enter__(self) -> "S3Loopback":
        cmd = [sys.executable, "-m", "tests.s3_loopback", "--port", "0", "--latency-ms", str(self.latency_ms)]
        if self.stream_mbps:
            cmd += ["--stream-mbps", str(self.stream_mbps)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            line = self.proc.stdout.readline()  # the port, once the server listens (EOF if it died)
            if not line.strip().isdigit():
                raise RuntimeError(f"the S3 loopback server did not start (exit {self.proc.poll()})")
        except BaseException:
            self.proc.kill()
            self.proc.wait(10)
            raise
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"
        self.opts = {"key": "testing", "secret": "testing",
                     "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"}}
        import boto3

        boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=self.bucket)
        self.reset()
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.opts)

    def reset(self) -> None:
        urllib.request.urlopen(self.url + "/__reset", timeout=10).read()

    def requests(self) -> list[tuple[str, str, int]]:
        """(kind: GET, HEAD, PUT, LIST, DELETE, POST..., key, bytes sent) per request since the last reset."""
        return [(k, key, n) for k, _, key, n in json.loads(urllib.request.urlopen(self.url + "/__stats", timeout=10).read())]

    def cpu_s(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency-ms", type=float, default=0)
    ap.add_argument("--stream-mbps", type=float, default=None)
    a = ap.parse_args()
    serve(a.port, a.latency_ms, a.stream_mbps)
