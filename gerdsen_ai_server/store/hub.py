"""The Hugging Face hub as a source of models: repo and file-name rules, reachability, pull plans, search.

store/download.py pulls a plan into the models dir: byte progress, resume, cancel, checksums.
No MLX and no Flask: ``impetus pull`` calls ``download.pull`` directly and the server runs it in
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

import fnmatch
import json
import logging
import os
import re
import socket
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, ModelInfo, constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session

from gerdsen_ai_server.store.formats import is_mmproj

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
        raise UnsafeName(
            f"{repo_id!r} is not a Hugging Face repo id (expected 'org/name': letters, digits, "
            "'-', '_' and '.', at most 96 each, no '..' or '--')"
        )
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
        raise UnsafeName(
            f"{path.name!r} would not be a plain child of {root.name or root}: "
            "it is a link or leads outside; refusing to write there"
        )
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


def plan(
    repo_id: str,
    *,
    revision: str = "main",
    gguf: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> PullPlan:
    """Ask the hub for the repo's files at ``revision`` and pick those a model needs."""
    check_repo_id(repo_id)
    endpoint = endpoint or hub_endpoint()
    if _offline():
        raise unreachable(endpoint, "HF_HUB_OFFLINE is set")
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            repo_id, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT_S
        )
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
            raise UnsafeName(
                f"{repo_id} on {endpoint} lists a file named {sibling.rfilename!r} ({problem}); refusing to pull it"
            )
    siblings = [
        RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id)
        for s in listed
        if "/" not in s.rfilename or _SUBFOLDER_FILES.fullmatch(s.rfilename)
    ]
    chosen = _select(repo_id, siblings, gguf)
    hidden = [f.name for f in chosen if is_hidden(f.name)]
    if hidden:  # e.g. '.impetus-pull.json' would pass for this server's own manifest
        raise UnsafeName(
            f"{repo_id} would put hidden files into the model's folder ({', '.join(map(repr, hidden))}); "
            "refusing to pull it"
        )
    return PullPlan(repo_id, revision, info.sha or revision, tuple(chosen))


def _projector_rank(file: RemoteFile) -> tuple[int, str]:
    """The projector pulled with a GGUF model (LM Studio fetches one beside it): f16 first, as llama.cpp's
    converter writes it by default and ggml-org's repos ship it, then the name."""
    return (0 if "f16" in file.name.lower() else 1, file.name)


def _select(repo_id: str, files: list[RemoteFile], gguf: str | None) -> list[RemoteFile]:
    names = [f.name for f in files]
    # A vision GGUF repo (ggml-org's, say) ships its projector beside the model files: never the model.
    projectors = sorted((f for f in files if is_mmproj(f.name)), key=_projector_rank)
    ggufs = [f for f in files if f.name.lower().endswith(".gguf") and not is_mmproj(f.name)]
    if gguf is not None:
        chosen = [f for f in ggufs if fnmatch.fnmatch(f.name, gguf) or f.name == gguf]
        if len(chosen) != 1:
            found = ", ".join(f.name for f in ggufs) or "none"
            raise PullError(f"{gguf!r} must match exactly one .gguf file of {repo_id}; it has: {found}")
        return chosen + projectors[:1]
    wanted = [f for f in files if any(fnmatch.fnmatch(f.name, p) for p in _MODEL_FILES)]
    if "modules.json" in names:  # sentence-transformers: its card says whether it is Matryoshka-trained
        wanted += [f for f in files if f.name == "README.md"]
    weights = [f for f in wanted if f.name.endswith(".safetensors")]
    if len(weights) > 1:  # Mistral repos ship consolidated.safetensors next to the shards
        wanted = [f for f in wanted if f.name != "consolidated.safetensors"]
    if weights:
        return wanted
    if len(ggufs) == 1:
        return ggufs + projectors[:1]
    if ggufs:
        raise PullError(
            f"{repo_id} holds several GGUF files ({', '.join(f.name for f in ggufs)}); "
            "choose one with gguf (a file name or pattern such as '*Q4_K_M.gguf')"
        )
    foreign = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".onnx", ".mlmodel"))]
    hint = (
        (
            f" (it holds {', '.join(foreign[:3])}: convert it with "
            f"`python -m mlx_lm.convert --hf-path {repo_id}` on a machine that reaches the hub)"
        )
        if foreign
        else ""
    )
    raise PullError(f"{repo_id} holds no .safetensors or .gguf weights{hint}")


# ---- searching --------------------------------------------------------------------------------


def search(
    query: str,
    *,
    author: str | None = "mlx-community",
    limit: int = 20,
    endpoint: str | None = None,
    timeout: float = SEARCH_TIMEOUT_S,
) -> list[ModelInfo]:
    """Models on the hub matching ``query`` (huggingface_hub ModelInfo objects, most downloaded first).

    Answers within ``timeout`` seconds (twice that for a hub that trickles its answer) or raises
    HubTimeout: this runs on a request thread, which a stalled hub must not hold. One request, not
    huggingface_hub's ``list_models``: that has no timeout and retries timeouts with back-off.
    """
    endpoint = endpoint or hub_endpoint()
    deadline = time.monotonic() + timeout
    probe(endpoint, timeout=min(PROBE_TIMEOUT_S, timeout))
    params: dict[str, Any] = {
        "search": query,
        "limit": limit,
        "sort": "downloads",
        "expand": ["safetensors", "downloads", "tags", "pipeline_tag"],
    }
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
                    raise PullError(
                        f"the hub at {endpoint} answered the search with more than {SEARCH_MAX_BYTES >> 20} MiB"
                    )
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
