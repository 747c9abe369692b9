"""A stand-in Hugging Face hub on loopback: just the endpoints huggingface_hub calls to find and fetch files.

    GET  /api/models?search=&author=&limit=        (HfApi.list_models)
    GET  /api/models/{org}/{name}[/revision/{rev}]  (HfApi.model_info; ?blobs=true adds sizes, blob ids, lfs.sha256)
    HEAD /{org}/{name}/resolve/{rev}/{file}         (get_hf_file_metadata: X-Repo-Commit, ETag, X-Linked-Etag/-Size)
    GET  /{org}/{name}/resolve/{rev}/{file}         (http_get; honours ``Range: bytes=N-`` with 206)

Errors carry the hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) so
huggingface_hub raises its own exception types. Faults for tests: ``drop_once`` (send part of a
file, then cut the connection), ``corrupt`` (serve a flipped byte under the right checksum),
``throttle`` (bytes per second, to catch a download in the middle), ``stall`` (requests whose path and
query contain one of these strings get no answer until ``release()``: a hub that accepts connections
and then says nothing), ``trickle`` (such requests get a 200 and then one byte every so many seconds).
Repos may list any file name, hostile ones included (``../escape``, ``/abs``): the stub only lists them.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf")


@dataclass
class StubRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str = ""
    downloads: int = 0
    pipeline_tag: str | None = None  # the hub's task ("image-text-to-text" for a vision-language model)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            digest.update(name.encode() + hashlib.sha256(self.files[name]).digest())
        self.commit = digest.hexdigest()

    def sibling(self, name: str) -> dict[str, Any]:
        data = self.files[name]
        entry: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return entry

    def safetensors_parameters(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, data in self.files.items():
            if name.endswith(".safetensors"):
                (size,) = struct.unpack("<Q", data[:8])
                for key, info in json.loads(data[8 : 8 + size]).items():
                    if key != "__metadata__":
                        n = 1
                        for dim in info["shape"]:
                            n *= dim
                        counts[info["dtype"]] = counts.get(info["dtype"], 0) + n
        return counts


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubStub:
    repos: dict[str, StubRepo] = field(default_factory=dict)
    drop_once: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, file) -> bytes sent before the cut
    corrupt: set[tuple[str, str]] = field(default_factory=set)
    throttle: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, file) -> bytes per second
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    stall: list[str] = field(default_factory=list)  # substrings of "path?query" that get no answer (hold())
    trickle: dict[str, float] = field(default_factory=dict)  # substring of "path?query" -> seconds per byte
    _released: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    def hold(self, *substrings: str) -> None:
        """Requests whose "path?query" contains one of ``substrings`` wait, unanswered, until ``release()``."""
        self._released.clear()
        self.stall.extend(substrings)

    def release(self) -> None:
        """Stalled requests go on (and are answered as usual); nothing stalls until the next ``hold``."""
        self.stall.clear()
        self._released.set()

    def add_repo(self, repo_id: str, files: dict[str, bytes], downloads: int = 0) -> StubRepo:
        repo = StubRepo(repo_id, files, downloads=downloads)
        self.repos[repo_id] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, downloads: int = 0) -> StubRepo:
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return self.add_repo(repo_id, files, downloads)

    def requests_for(self, repo_id: str, name: str) -> list[tuple[str, str | None]]:
        suffix = f"/{repo_id}/resolve/"
        return [(m, r) for m, p, r in list(self.requests) if p.startswith(suffix) and p.endswith("/" + name)]

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubStub:
        stub = self

        class Handler(_Handler):
            hub = stub

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="hub-stub", daemon=True).start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet about clients that left (a request held by ``hold`` answered after its client gave up)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    hub: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.requests.append((self.command, path, self.headers.get("Range")))
        if any(s in self.path for s in list(self.hub.stall)):
            self.hub._released.wait(120)
        trickle = next((every for s, every in list(self.hub.trickle.items()) if s in self.path), None)
        if trickle is not None:
            return self._trickle(trickle)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 2:
            return self._list(parse_qs(url.query), body)
        if parts[:2] == ["api", "models"] and len(parts) in (4, 6):
            return self._info("/".join(parts[2:4]), parts[5] if len(parts) == 6 else "main", body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        self._error(404, "NotFound", "no such endpoint", body)

    # ---- endpoints
    def _list(self, query: dict[str, list[str]], body: bool) -> None:
        search = (query.get("search") or [""])[0].lower()
        author = (query.get("author") or [None])[0]
        limit = int((query.get("limit") or ["1000"])[0])
        found = [
            r
            for r in self.hub.repos.values()
            if search in r.repo_id.lower() and (author is None or r.repo_id.split("/")[0] == author)
        ]
        found.sort(key=lambda r: -r.downloads)
        data = []
        for repo in found[:limit]:
            params = repo.safetensors_parameters()
            entry: dict[str, Any] = {
                "id": repo.repo_id,
                "_id": repo.commit[:24],
                "downloads": repo.downloads,
                "tags": ["mlx", "safetensors"],
            }
            if repo.pipeline_tag:
                entry["pipeline_tag"] = repo.pipeline_tag
            if params:
                entry["safetensors"] = {"parameters": params, "total": sum(params.values())}
            data.append(entry)
        self._json(200, data, body)

    def _info(self, repo_id: str, revision: str, body: bool) -> None:
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        self._json(
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": repo.commit,
                "private": False,
                "tags": ["mlx"],
                "siblings": [repo.sibling(n) for n in sorted(repo.files)],
            },
            body,
        )

    def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} not in {repo_id}", body, commit=repo.commit)
        data = repo.files[name]
        key = (repo_id, name)
        sibling = repo.sibling(name)
        etag = sibling["lfs"]["sha256"] if "lfs" in sibling else sibling["blobId"]
        if key in self.hub.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        start = 0
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and range_header.endswith("-"):
            start = int(range_header[len("bytes=") : -1])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{etag}"')
        if "lfs" in sibling:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        cut = self.hub.drop_once.pop(key, None) if self.command == "GET" else None
        payload = data[start:]
        if cut is not None:
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the peer sees a body cut short
            self.close_connection = True
            return
        rate = self.hub.throttle.get(key)
        if not rate:
            self.wfile.write(payload)
            return
        step = max(1, rate // 20)
        try:
            for offset in range(0, len(payload), step):
                self.wfile.write(payload[offset : offset + step])
                self.wfile.flush()
                time.sleep(step / rate)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (a cancelled pull)

    def _trickle(self, every: float) -> None:
        payload = b"[" + b" " * 10_000 + b"]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            for offset in range(len(payload)):
                self.wfile.write(payload[offset : offset + 1])
                self.wfile.flush()
                time.sleep(every)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ---- helpers
    def _repo(self, repo_id: str, revision: str, body: bool) -> StubRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return None
        return repo

    def _error(self, status: int, code: str, message: str, body: bool, commit: str | None = None) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _json(self, status: int, data: Any, body: bool) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)
