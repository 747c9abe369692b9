"""Pull a model from the Hugging Face hub into the models dir: byte progress, resume, cancel, checksums.

The plan (which files, sizes, checksums) and the rules on names come from store/hub.py; the module
docstring there says why each file goes through the hub's ``http_get`` into a partial file we keep,
and what a pull refuses before writing anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import constants, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers

from gerdsen_ai_server.store.hub import (
    CHUNK_BYTES,
    MANIFEST,
    STAGING,
    ChecksumMismatch,
    PullCancelled,
    PullError,
    PullPlan,
    RemoteFile,
    check_repo_id,
    confined,
    folder_name,
    hub_endpoint,
    plan,
    unreachable,
)

log = logging.getLogger(__name__)
# ---- downloading ------------------------------------------------------------------------------

ProgressCallback = Callable[[int, int], None]  # (bytes_done, bytes_total)


_HUB_HOSTS = ("hf.co/", "huggingface.co/", "https://hf.co/", "https://huggingface.co/")


def parse_ref(ref: str, gguf: str | None = None) -> tuple[str, str | None]:
    """(repo id, GGUF file pattern) from what a user typed: ``org/name`` with ``gguf`` (a file name or
    pattern, huggingface-cli's ``--include``), or Ollama's ``hf.co/org/name:Q4_K_M``, whose tag picks
    the one ``.gguf`` file whose name ends in it, in any case (``*[Qq]4_[Kk]_[Mm].gguf``). A tag and a
    pattern together are a PullError: one way to choose the file."""
    for host in _HUB_HOSTS:
        if ref.lower().startswith(host):
            ref = ref[len(host) :]
            break
    repo_id, colon, tag = ref.partition(":")
    if not colon:
        return ref, gguf
    if gguf is not None:
        raise PullError(f"{ref!r} names a GGUF tag ({tag!r}) and a file pattern ({gguf!r}); give one of them")
    if not tag or not all(c.isalnum() or c in "_.-" for c in tag):
        raise PullError(f"{tag!r} is not a GGUF quantization tag (e.g. Q4_K_M)")
    either = "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in tag)
    return repo_id, f"*{either}.gguf"


def pull(
    repo_id: str,
    models_dir: Path,
    *,
    revision: str = "main",
    gguf: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Download ``repo_id`` into ``models_dir/<org>--<name>`` and return that folder.

    Continues the partial files of an earlier, interrupted pull; raises PullCancelled when
    ``cancel`` is set (the partial files stay for the next pull), HubUnreachable without a hub,
    ChecksumMismatch when a file is not what the hub says it is (that file is discarded).
    """
    endpoint = endpoint or hub_endpoint()
    check_repo_id(repo_id)
    root = Path(models_dir).resolve()
    dest = confined(root / folder_name(repo_id), root)
    staging_root = confined(root / STAGING, root)
    staging = confined(staging_root / folder_name(repo_id), root)
    lock = confined(staging_root / f"{folder_name(repo_id)}.lock", root)
    the_plan = plan(repo_id, revision=revision, gguf=gguf, endpoint=endpoint, token=token)
    cancel = cancel or threading.Event()
    report = on_progress or (lambda done, total: None)
    if _up_to_date(dest, the_plan):
        report(the_plan.total_bytes, the_plan.total_bytes)
        return dest
    with _exclusive(lock, repo_id):
        _reset_if_stale(staging, the_plan.commit)
        _download_all(the_plan, staging, endpoint, token, report, cancel)
        _write_manifest(staging, the_plan, endpoint)
        _publish(staging, dest)
    log.info("pulled %s@%s into %s", repo_id, the_plan.commit[:12], dest)
    return dest


def _download_all(
    the_plan: PullPlan,
    staging: Path,
    endpoint: str,
    token: str | bool | None,
    report: ProgressCallback,
    cancel: threading.Event,
) -> None:
    total = the_plan.total_bytes
    done = 0
    partial_bytes = 0
    for f in the_plan.files:
        if (staging / f.name).is_file():
            done += f.size or 0
        elif _partial(staging, f).is_file():
            partial_bytes += _partial(staging, f).stat().st_size
    free = shutil.disk_usage(staging).free
    if total - done - partial_bytes > free:
        raise PullError(
            f"not enough disk space for {the_plan.repo_id}: needs {_gb(total - done - partial_bytes)}, "
            f"{_gb(free)} free in {staging}"
        )
    report(done, total)
    headers = build_hf_headers(token=token)
    for f in the_plan.files:
        target = confined(staging / f.name, staging)  # a link planted in the staging folder is not followed
        if target.is_file():
            continue
        if cancel.is_set():
            raise PullCancelled(f"pull of {the_plan.repo_id} cancelled")
        partial = _partial(staging, f)
        resume = partial.stat().st_size if partial.is_file() else 0
        if f.size is not None and resume > f.size:
            partial.unlink()
            resume = 0
        file_done = resume

        def on_bytes(n: int, base: int = done) -> None:
            nonlocal file_done
            if cancel.is_set():  # raised inside http_get, before it writes the chunk
                raise PullCancelled(f"pull of {the_plan.repo_id} cancelled")
            file_done += n
            report(base + file_done, total)

        report(done + resume, total)
        partial.parent.mkdir(parents=True, exist_ok=True)  # 1_Pooling/config.json
        url = hf_hub_url(the_plan.repo_id, f.name, revision=the_plan.commit, endpoint=endpoint)
        try:
            # http_get reads constants.DOWNLOAD_CHUNK_SIZE per call; see CHUNK_BYTES.
            constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, CHUNK_BYTES)
            with partial.open("ab") as out:
                http_get(
                    url,
                    out,
                    resume_size=resume,
                    headers=headers,
                    expected_size=f.size,
                    displayed_filename=f.name,
                    tqdm_class=_progress_hook(on_bytes),
                )
        except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
            raise unreachable(endpoint, exc) from None
        except HfHubHTTPError as exc:
            raise PullError(f"downloading {f.name} of {the_plan.repo_id} failed: {exc}") from None
        except OSError as exc:  # http_get's size check, or the disk
            raise PullError(f"downloading {f.name} of {the_plan.repo_id} failed: {exc}") from None
        _verify(partial, f, the_plan.repo_id)
        os.replace(partial, target)
        done += f.size if f.size is not None else target.stat().st_size
        report(done, total)


def _partial(staging: Path, f: RemoteFile) -> Path:
    # Named by content, so a partial file is never continued with the bytes of another version.
    tag = (f.sha256 or f.blob_id or "unknown")[:16]
    return staging / f"{f.name}.{tag}.incomplete"


def _progress_hook(on_bytes: Callable[[int], None]) -> type[Any]:
    """A tqdm stand-in for http_get's ``tqdm_class``: counts bytes, draws nothing."""

    class _ByteCounter:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> _ByteCounter:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            on_bytes(int(n or 0))  # negative when a server ignored a Range header and it restarts

    return _ByteCounter


def _verify(path: Path, f: RemoteFile, repo_id: str) -> None:
    if f.sha256:
        algo, expected = "sha256", f.sha256
        digest = hashlib.sha256()
    elif f.blob_id:
        algo, expected = "git blob id", f.blob_id
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(b"blob %d\0" % path.stat().st_size)
    else:
        return  # the hub gave no checksum; http_get has checked the size
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 22), b""):
            digest.update(block)
    got = digest.hexdigest()
    if got != expected.lower():
        path.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{f.name} of {repo_id} is corrupt: its {algo} is {got}, the hub says {expected}; "
            "the file was discarded, pull again"
        )


@contextlib.contextmanager
def _exclusive(lock_path: Path, repo_id: str) -> Iterator[None]:
    """One pull of a repo at a time across processes (the server and ``impetus pull``)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(f"another pull of {repo_id} is already running") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _reset_if_stale(staging: Path, commit: str) -> None:
    """Finished files from an older commit may be outdated: start over (partials are content-named)."""
    marker = staging / ".commit"
    if staging.is_dir() and (not marker.is_file() or marker.read_text().strip() != commit):
        for path in staging.iterdir():
            if not path.name.endswith(".incomplete"):  # a link is removed, never followed
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    staging.mkdir(parents=True, exist_ok=True)
    marker.write_text(commit)


def _write_manifest(staging: Path, the_plan: PullPlan, endpoint: str) -> None:
    (staging / ".commit").unlink(missing_ok=True)
    for stale in staging.rglob("*.incomplete"):
        stale.unlink()
    manifest = {
        "repo": the_plan.repo_id,
        "revision": the_plan.revision,
        "commit": the_plan.commit,
        "endpoint": endpoint,
        "pulled_at": time.time(),
        "files": {f.name: {"size": f.size, "sha256": f.sha256, "blob_id": f.blob_id} for f in the_plan.files},
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _publish(staging: Path, dest: Path) -> None:
    """Move the finished folder into place; an older copy is swapped out, then removed."""
    old = None
    if dest.exists():
        old = staging.parent / f"{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _up_to_date(dest: Path, the_plan: PullPlan) -> bool:
    manifest = read_manifest(dest)
    return (
        manifest is not None
        and manifest.get("commit") == the_plan.commit
        and all((dest / f.name).is_file() for f in the_plan.files)
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
