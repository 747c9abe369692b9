"""Pull models from the Hugging Face hub into the models dir: byte progress, resume, cancel, checksums.

No MLX and no Flask: ``impetus pull`` calls :func:`pull` directly and the server runs it in
``store.pulls.PullManager`` threads (downloading is plain I/O, so threads are fine here).

Why not ``snapshot_download``: huggingface_hub (2.x) neither keeps a partial file between calls
nor checks a downloaded file against the hub's sha256. So each file goes through the hub's own
``http_get`` (its retries, Range resume after a dropped connection, size check and progress hook)
into a partial file that we keep in ``models_dir/.pulls/<org>--<name>/``; a later pull of the
same repo continues it with a Range request. Each finished file is verified (sha256 for LFS
files, the git blob id for the rest) before it counts; the folder appears under its final name
``models_dir/<org>--<name>`` only once every file is in.

What a hub lists is not trusted: a repo id is checked against the hub's own rules, every file name
the hub lists must be a plain relative path (no ``..``, no absolute path, no backslash or control
character; as huggingface_hub's own ``_validate_relative_filename`` refuses), hidden names are never
written, and the pull's folders must resolve to children of the models dir. A pull that would break
any of these is refused as a whole, before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, ModelInfo, constants, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers, get_session

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 3.0
# A hub search (/api/models/discover) gives up after this many seconds (IMPETUS_HUB_SEARCH_TIMEOUT):
# a silent hub at once, one that trickles bytes after its next read (so within twice that at worst).
# huggingface_hub's own list_models has no timeout and retries timeouts with back-off (390 s
# against a stalled hub).
SEARCH_TIMEOUT_S = 10.0
SEARCH_MAX_BYTES = 8 << 20  # a search answer larger than this is not a search answer
# http_get reads the response in chunks of this size and calls the progress hook once per
# chunk; the hub's default (10 MiB) would make cancelling wait for up to 10 MiB on a slow link.
CHUNK_BYTES = 1 << 20
MANIFEST = ".impetus-pull.json"
STAGING = ".pulls"

# The hub's own rule (huggingface_hub.utils.validate_repo_id): each part 1-96 characters of letters,
# digits, '-', '_', '.', not starting or ending with '-' or '.', no '--' or '..' anywhere. '--' matters
# here too: folder_name() joins the parts with it, so 'a--b/c' and 'a/b--c' would share a folder.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
# Characters no model file name has: path separators of other systems, drive letters, and every
# control, format (bidi overrides), surrogate or line/paragraph separator character.
_ODD_CHARS = frozenset("\\:")
_ODD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
_MAX_SEGMENT_BYTES = 200  # leaves room for the ".<sha>.incomplete" suffix under the usual 255
# What mlx-lm needs of a model repo, top-level files only (``original/`` holds PyTorch checkpoints),
# and the one subfolder file a sentence-transformers embedding model needs: its pooling settings.
_MODEL_FILES = ("*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja")
_SUBFOLDER_FILES = re.compile(r"\d+_Pooling/config\.json")


class PullError(Exception):
    """A pull failed; the message says why and what to do."""


class HubUnreachable(PullError):
    pass


class ChecksumMismatch(PullError):
    pass


class PullCancelled(PullError):
    pass


class UnsafeName(PullError):
    """A repo id or a file name the hub listed that would not be a plain child of its folder."""


class HubTimeout(HubUnreachable):
    pass


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` as it is now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def folder_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def check_repo_id(repo_id: str) -> str:
    """The repo id, if it is one by the hub's rules; it names a folder, so nothing else gets through."""
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise UnsafeName(f"{repo_id!r} is not a Hugging Face repo id (expected 'org/name': letters, digits, "
                         "'-', '_' and '.', at most 96 each, no '..' or '--')")
    return repo_id


def file_name_problem(name: str) -> str | None:
    """Why ``name`` (a file name as the hub lists it) is not a plain relative path, or None.

    Hidden names are not a problem here (every repo has ``.gitattributes``): the pull never selects
    them (see ``plan``).
    """
    if not isinstance(name, str) or not name:
        return "an empty name"
    if name.startswith("/"):
        return "an absolute path"
    odd = next((c for c in name if c in _ODD_CHARS or unicodedata.category(c) in _ODD_CATEGORIES), None)
    if odd is not None:
        return f"the character {odd!r}"
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            return f"a {segment!r} path segment" if segment else "an empty path segment"
        if len(segment.encode()) > _MAX_SEGMENT_BYTES:
            return f"a path segment longer than {_MAX_SEGMENT_BYTES} bytes"
    return None


def is_hidden(name: str) -> bool:
    return any(segment.startswith(".") for segment in name.split("/"))


def confined(path: Path, root: Path) -> Path:
    """``path`` if it resolves to itself under ``root`` (already resolved): no link, no '..' on the way.

    Raises UnsafeName otherwise, so nothing a pull writes, moves or removes lands outside ``root``.
    """
    resolved = path.resolve()
    if resolved != path or root not in resolved.parents:
        raise UnsafeName(f"{path.name!r} would not be a plain child of {root.name or root}: "
                         "it is a link or leads outside; refusing to write there")
    return path


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or value.upper() in {"1", "ON", "YES", "TRUE"}


def unreachable(endpoint: str, exc: BaseException | str) -> HubUnreachable:
    return HubUnreachable(f"cannot reach the Hugging Face hub at {endpoint}: {exc}")


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raises HubUnreachable unless a TCP connection to the hub opens within ``timeout``.

    A cheap check before calls that huggingface_hub would retry for half a minute.
    """
    if _offline():
        raise unreachable(endpoint, "HF_HUB_OFFLINE is set")
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError as exc:
        raise unreachable(endpoint, exc) from None


# ---- planning: which files, how big, which checksums ------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1, for the small files git stores itself


@dataclass(frozen=True)
class PullPlan:
    repo_id: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


def plan(repo_id: str, *, revision: str = "main", gguf: str | None = None, endpoint: str | None = None,
         token: str | bool | None = None) -> PullPlan:
    """Ask the hub for the repo's files at ``revision`` and pick those a model needs."""
    check_repo_id(repo_id)
    endpoint = endpoint or hub_endpoint()
    if _offline():
        raise unreachable(endpoint, "HF_HUB_OFFLINE is set")
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            repo_id, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT_S)
    except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
        raise unreachable(endpoint, exc) from None
    except GatedRepoError:
        raise PullError(f"{repo_id} is gated on {endpoint}: accept its terms on the hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise PullError(f"{repo_id} has no revision {revision!r} on {endpoint}") from None
    except RepositoryNotFoundError:
        raise PullError(f"no model {repo_id} on {endpoint} (or it is private: set HF_TOKEN)") from None
    except HfHubHTTPError as exc:
        raise PullError(f"the hub at {endpoint} refused {repo_id}: {exc}") from None
    listed = info.siblings or []
    for sibling in listed:  # a hub listing such a name is broken or hostile: pull nothing from it
        problem = file_name_problem(sibling.rfilename)
        if problem is not None:
            raise UnsafeName(f"{repo_id} on {endpoint} lists a file named {sibling.rfilename!r} ({problem}); "
                             "refusing to pull it")
    siblings = [RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id)
                for s in listed if "/" not in s.rfilename or _SUBFOLDER_FILES.fullmatch(s.rfilename)]
    chosen = _select(repo_id, siblings, gguf)
    hidden = [f.name for f in chosen if is_hidden(f.name)]
    if hidden:  # e.g. '.impetus-pull.json' would pass for this server's own manifest
        raise UnsafeName(f"{repo_id} would put hidden files into the model's folder ({', '.join(map(repr, hidden))}); "
                         "refusing to pull it")
    return PullPlan(repo_id, revision, info.sha or revision, tuple(chosen))


def _select(repo_id: str, files: list[RemoteFile], gguf: str | None) -> list[RemoteFile]:
    names = [f.name for f in files]
    ggufs = [f for f in files if f.name.lower().endswith(".gguf")]
    if gguf is not None:
        chosen = [f for f in ggufs if fnmatch.fnmatch(f.name, gguf) or f.name == gguf]
        if len(chosen) != 1:
            found = ", ".join(f.name for f in ggufs) or "none"
            raise PullError(f"{gguf!r} must match exactly one .gguf file of {repo_id}; it has: {found}")
        return chosen
    wanted = [f for f in files if any(fnmatch.fnmatch(f.name, p) for p in _MODEL_FILES)]
    if "modules.json" in names:  # sentence-transformers: its card says whether it is Matryoshka-trained
        wanted += [f for f in files if f.name == "README.md"]
    weights = [f for f in wanted if f.name.endswith(".safetensors")]
    if len(weights) > 1:  # Mistral repos ship consolidated.safetensors next to the shards
        wanted = [f for f in wanted if f.name != "consolidated.safetensors"]
    if weights:
        return wanted
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        raise PullError(f"{repo_id} holds several GGUF files ({', '.join(f.name for f in ggufs)}); "
                        "choose one with gguf (a file name or pattern such as '*Q4_K_M.gguf')")
    foreign = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".onnx", ".mlmodel"))]
    hint = (f" (it holds {', '.join(foreign[:3])}: convert it with "
            f"`python -m mlx_lm.convert --hf-path {repo_id}` on a machine that reaches the hub)") if foreign else ""
    raise PullError(f"{repo_id} holds no .safetensors or .gguf weights{hint}")


# ---- downloading ------------------------------------------------------------------------------

ProgressCallback = Callable[[int, int], None]  # (bytes_done, bytes_total)


def pull(repo_id: str, models_dir: Path, *, revision: str = "main", gguf: str | None = None,
         endpoint: str | None = None, token: str | bool | None = None,
         on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> Path:
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


def _download_all(the_plan: PullPlan, staging: Path, endpoint: str, token: str | bool | None,
                  report: ProgressCallback, cancel: threading.Event) -> None:
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
        raise PullError(f"not enough disk space for {the_plan.repo_id}: needs {_gb(total - done - partial_bytes)}, "
                        f"{_gb(free)} free in {staging}")
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
                http_get(url, out, resume_size=resume, headers=headers, expected_size=f.size,
                         displayed_filename=f.name, tqdm_class=_progress_hook(on_bytes))
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
        raise ChecksumMismatch(f"{f.name} of {repo_id} is corrupt: its {algo} is {got}, the hub says {expected}; "
                               "the file was discarded, pull again")


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
    manifest = {"repo": the_plan.repo_id, "revision": the_plan.revision, "commit": the_plan.commit,
                "endpoint": endpoint, "pulled_at": time.time(),
                "files": {f.name: {"size": f.size, "sha256": f.sha256, "blob_id": f.blob_id} for f in the_plan.files}}
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
    return (manifest is not None and manifest.get("commit") == the_plan.commit
            and all((dest / f.name).is_file() for f in the_plan.files))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ---- searching --------------------------------------------------------------------------------

def search(query: str, *, author: str | None = "mlx-community", limit: int = 20, endpoint: str | None = None,
           timeout: float = SEARCH_TIMEOUT_S) -> list[ModelInfo]:
    """Models on the hub matching ``query`` (huggingface_hub ModelInfo objects, most downloaded first).

    Answers within ``timeout`` seconds (twice that for a hub that trickles its answer) or raises
    HubTimeout: this runs on a request thread, which a stalled hub must not hold. One request, not
    huggingface_hub's ``list_models``: that has no timeout and retries timeouts with back-off.
    """
    endpoint = endpoint or hub_endpoint()
    deadline = time.monotonic() + timeout
    probe(endpoint, timeout=min(PROBE_TIMEOUT_S, timeout))
    params: dict[str, Any] = {"search": query, "limit": limit, "sort": "downloads",
                              "expand": ["safetensors", "downloads", "tags"]}
    if author:
        params["author"] = author
    body = _get_json(f"{endpoint}/api/models", params, deadline, timeout, endpoint)
    if not isinstance(body, list):
        raise PullError(f"the hub at {endpoint} answered the search with {type(body).__name__}, not a list of models")
    try:
        return [ModelInfo(**item) for item in body[:limit]]
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise PullError(f"the hub at {endpoint} answered the search with a malformed model: {exc}") from None


def _get_json(url: str, params: dict[str, Any], deadline: float, timeout: float, endpoint: str) -> Any:
    """GET ``url`` and parse its JSON, giving up when one read waits past ``deadline`` or, for a hub that
    trickles bytes, at the first chunk after it (each read's timeout is fixed when the request starts)."""
    remaining = max(0.1, deadline - time.monotonic())
    limits = httpx2.Timeout(remaining, connect=min(PROBE_TIMEOUT_S, remaining))
    expired = HubTimeout(f"the Hugging Face hub at {endpoint} did not answer within {timeout:g} s")
    body = bytearray()
    try:
        with get_session().stream("GET", url, params=params, headers=build_hf_headers(), timeout=limits) as response:
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > SEARCH_MAX_BYTES:
                    raise PullError(f"the hub at {endpoint} answered the search with more than "
                                    f"{SEARCH_MAX_BYTES >> 20} MiB")
                if time.monotonic() > deadline:
                    raise expired
            status = response.status_code
    except httpx2.TimeoutException:
        raise expired from None
    except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
        raise unreachable(endpoint, exc) from None
    if status >= 400:
        raise PullError(f"searching the hub at {endpoint} failed: HTTP {status}")
    try:
        return json.loads(body)
    except ValueError:
        raise PullError(f"the hub at {endpoint} answered the search with something other than JSON") from None
