"""A loopback stand-in for the Hugging Face hub's file route, with Range support and injectable faults.

It serves ``GET/HEAD /{org}/{name}/resolve/{revision}/{file}`` from local folders, answering the headers
``huggingface_hub`` reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``, ``Content-Range``). Faults reproduce
what real hubs and proxies do: ignore Range, truncate bodies, rate-limit (429), fail (5xx), stall, or change a
file between two reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Faults:
    """What the server does wrong; counters let a test fail the first N requests only."""

    ignore_range: bool = False
    truncate: bool = False
    status_first: int = 0  # e.g. 429 or 503 for the first `fail_count` GETs
    fail_count: int = 0
    stall_s: float = 0.0
    etag_suffix: str = ""  # change to make the served file look different


@dataclass
class HubServer:
    repos: dict[str, Path]  # "org/name" → folder
    revisions: tuple[str, ...] = ("main", COMMIT)
    faults: Faults = field(default_factory=Faults)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, range)

    def __post_init__(self):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [e for e in self.log if e[0] == "GET"]


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._serve(head=True)

        def do_GET(self):
            self._serve(head=False)

        def _serve(self, head: bool):
            hub.log.append(("HEAD" if head else "GET", self.path, self.headers.get("Range")))
            m = _ROUTE.match(self.path.split("?")[0])
            folder = hub.repos.get(m["repo"]) if m else None
            if folder is None or m["rev"] not in hub.revisions:
                return self._empty(404, {"X-Error-Code": "RepoNotFound" if folder is None else "RevisionNotFound"})
            path = folder / m["file"]
            if not path.is_file():
                return self._empty(404, {"X-Error-Code": "EntryNotFound"})
            st = path.stat()
            size = st.st_size
            # the ETag names this version of the file without reading it (a shard may be 5 GB)
            version = f"{m['repo']}/{m['file']}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
            etag = '"' + hashlib.sha256(version.encode()).hexdigest()[:32] + hub.faults.etag_suffix + '"'
            headers = {"X-Repo-Commit": COMMIT, "ETag": etag, "Accept-Ranges": "bytes"}
            if head:
                return self._send(200, headers, b"", length=size)
            f = hub.faults
            if f.fail_count > 0:
                f.fail_count -= 1
                return self._empty(f.status_first, {"Retry-After": "0"})
            if f.stall_s:
                time.sleep(f.stall_s)
            rng = _RANGE.match(self.headers.get("Range") or "")
            if rng and not f.ignore_range:
                a = int(rng[1])
                b = min(int(rng[2]) if rng[2] else size - 1, size - 1)
                headers["Content-Range"] = f"bytes {a}-{b}/{size}"
                status = 206
            else:
                a, b, status = 0, size - 1, 200
            with open(path, "rb") as fh:  # seek to the range: only its bytes are read, whatever the file size
                fh.seek(a)
                body = fh.read(max(0, b + 1 - a))
            if f.truncate:  # announce the full length, send half, hang up (a dropped connection)
                self.close_connection = True
                return self._send(status, headers, body[: len(body) // 2], length=len(body))
            return self._send(status, headers, body)

        def _empty(self, status: int, headers: dict):
            self._send(status, headers, b"")

        def _send(self, status: int, headers: dict, body: bytes, length: int | None = None):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if body:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

    return Handler
