"""GGUF vision models on llama.cpp: a model's multimodal projector (``mmproj``) found and loaded with
libmtmd, and a prompt's images tokenized and evaluated into a slot's sequence.

Finding the projector: LM Studio's and Ollama's folder layout, a model folder holding the model's
``.gguf`` and an ``mmproj*.gguf`` beside it (llama.cpp's converters and the hub's GGUF repos name
it so), or the load option ``mmproj`` (llama-server's ``--mmproj``), confined like a model. An
mmproj file is never a model of its own (store/formats.py ``is_mmproj`` keeps it out of listings).

A request's prompt, as llama-server builds it: the chat template rendered with libmtmd's media
marker where each image was, then ``mtmd_tokenize`` with one bitmap per image (the RGB pixels the
serving layer decoded once). It runs on the request's thread (llama-server tokenizes on its HTTP
threads too): the ids it returns hold ``IMAGE_ID`` (-1, llama-server's ``LLAMA_TOKEN_NULL`` for a
media position) once per image token, so the context check, usage, /tokenize and count_tokens all
count them. Each image chunk is kept (a copy) for the backend's thread, which takes it again by the
image's hash, or tokenizes the image again when it is gone.

On the backend's thread an image chunk is evaluated into the slot's sequence on its own
(``mtmd_helper_eval_chunk_single``: the projector, then one ``llama_decode`` of its embeddings at
the sequence's position) just before the text after it joins the shared batch, so image requests
batch with text requests and with each other. In the slot's cells an image's positions hold a key
made from its SHA-256 (64 bits, negative): prompt-prefix reuse then reuses an image's KV only for
the very same image at the same place, never across two images. Slots holding images are not
written to the prompt cache's disk tier (its files key 32-bit token ids).

Not here yet: projectors whose positions are not one per token (M-RoPE: the Qwen2-VL family), and
audio; both are refused at load with a message saying so.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine.backends.llamacpp_runtime import _silence_llama_log
from gerdsen_ai_server.engine.backends.llamacpp_sizing import serves_gguf
from gerdsen_ai_server.engine.formats.gguf_header import read_gguf_header
from gerdsen_ai_server.engine.images import ImageInput
from gerdsen_ai_server.engine.options import InvalidLoadOption, LoadOptions
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound
from gerdsen_ai_server.store.formats import is_mmproj
from gerdsen_ai_server.store.paths import confine

log = logging.getLogger(__name__)

IMAGE_ID = -1  # an image position in a prompt's public ids (llama-server's LLAMA_TOKEN_NULL)
PREPARED_KEPT = 16  # image chunks tokenized on request threads, waiting for the backend's thread


def find_mmproj(gguf: Path) -> Path | None:
    """The projector beside ``gguf`` in its model folder: an ``mmproj*.gguf`` in a folder whose one
    model GGUF is ``gguf`` (several projectors: the first by name, logged). A folder of several
    models (the models dir's top level) pairs none: which projector goes with which is a guess."""
    if is_mmproj(gguf.name) or not gguf.parent.is_dir():
        return None
    ggufs = sorted(p for p in gguf.parent.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    found = [p for p in ggufs if is_mmproj(p.name)]
    if len(ggufs) - len(found) != 1:
        return None
    if len(found) > 1:
        log.info("%s holds several projectors; using %s", gguf.parent.name, found[0].name)
    return found[0] if found else None


def located_mmproj(options: LoadOptions | None, models_dir: Path, allowed: Sequence[Path]) -> LoadOptions | None:
    """``options`` with a request's ``mmproj`` located as its model is (``store.paths.confine``: a
    name in the models dir, or a path under IMPETUS_MODEL_PATHS; one uniform refusal otherwise,
    naming nothing of the host) and checked to be a projector (``general.architecture = clip``),
    given as the absolute path the engine loads. A 400 naming ``mmproj`` when it is not one."""
    if options is None or options.mmproj is None:
        return options
    spec = options.mmproj
    shown = spec if len(spec) <= 80 else spec[:77] + "..."
    try:
        path = confine(spec, models_dir, allowed)
    except ModelNotFound:
        raise InvalidLoadOption(
            f"mmproj: '{shown}' does not exist or you do not have access to it: name an mmproj GGUF file in "
            "the models dir, or a path the operator listed in IMPETUS_MODEL_PATHS.",
            "mmproj",
        ) from None
    try:
        clip = path.is_file() and read_gguf_header(path).metadata.get("general.architecture") == "clip"
    except ModelLoadError:
        clip = False
    if not clip:
        raise InvalidLoadOption(
            f"mmproj: '{shown}' is not a multimodal projector (a GGUF of general.architecture 'clip', as "
            "llama.cpp's converters write the mmproj file).",
            "mmproj",
        )
    return replace(options, mmproj=os.path.abspath(path))


def has_projector(entry: Path, backend: str) -> bool:
    """Whether a models-dir entry is a model folder with a projector beside its GGUF, run by llama.cpp
    under ``backend`` (IMPETUS_BACKEND): converted to MLX it would load as text (listings)."""
    if not entry.is_dir():
        return False
    try:
        if not serves_gguf(False, backend):
            return False
    except ModelLoadError:  # llamacpp asked, llama-cpp-python missing
        return False
    models = [p for p in entry.iterdir() if p.suffix.lower() == ".gguf" and not is_mmproj(p.name)]
    return len(models) == 1 and find_mmproj(models[0]) is not None


def image_key(image: ImageInput) -> int:
    """The cell key of ``image``'s positions: negative (no token id is), from its content hash."""
    return -2 - int(image.sha256[:16], 16)


def rgb(image: ImageInput) -> tuple[int, int, bytes]:
    """The image's RGB pixels (decoded once by the serving layer's check; decoded here otherwise)."""
    decoded = image.decoded
    if decoded is None:
        from PIL import Image

        with Image.open(io.BytesIO(image.data)) as opened:
            decoded = opened.convert("RGB")
    elif decoded.mode != "RGB":
        decoded = decoded.convert("RGB")
    return int(decoded.width), int(decoded.height), decoded.tobytes()


class Projector:
    """One model's libmtmd context: tokenizing prompts with images (any thread, under a lock) and
    evaluating image chunks into a sequence (the backend's thread)."""

    def __init__(self, lc: Any, model: Any, path: Path, n_threads: int) -> None:
        import llama_cpp.mtmd_cpp as mt

        self._lc, self._mt = lc, mt
        self.path = path
        quiet = getattr(_silence_llama_log, "callback", None)  # llama.cpp's own log route (warnings and errors)
        if quiet is not None:  # libmtmd and its helpers log every tensor of a load to stderr otherwise
            mt.mtmd_log_set(quiet, ctypes.c_void_p(0))
            mt.mtmd_helper_log_set(quiet, ctypes.c_void_p(0))
        params = mt.mtmd_context_params_default()
        params.print_timings = False
        params.n_threads = n_threads
        self._ctx = mt.mtmd_init_from_file(str(path).encode(), model, params)
        if not self._ctx:
            raise ModelLoadError(f"llama.cpp could not load the multimodal projector {path.name}")
        why = None
        if not mt.mtmd_support_vision(self._ctx):
            why = "it has no vision encoder (audio only)"
        elif mt.mtmd_decode_use_mrope(self._ctx):
            why = "its model places image tokens by M-RoPE (the Qwen2-VL family), not supported here yet"
        if why:
            mt.mtmd_free(self._ctx)
            raise ModelLoadError(f"The multimodal projector {path.name} cannot be used: {why}.")
        self.marker = mt.mtmd_default_marker().decode()
        self.nbytes = path.stat().st_size
        self._lock = threading.Lock()
        self._prepared: OrderedDict[str, Any] = OrderedDict()  # image sha256 -> an image chunk (a copy)

    # ---- any thread ----------------------------------------------------------------------------
    def prompt_ids(self, text: str, images: Sequence[ImageInput]) -> list[int]:
        """``text`` (a rendered template with one marker per image) tokenized with its images: text
        tokens as the model's tokenizer makes them (the template wrote the special tokens), each
        image token as ``IMAGE_ID``. ValueError for what libmtmd refuses (a 400 to the caller)."""
        if text.count(self.marker) != len(images):  # one of the messages' own texts holds it
            raise ValueError(
                f"the prompt holds {text.count(self.marker)} media markers ({self.marker}) for {len(images)} "
                "images: a message's text may not contain the marker"
            )
        ids: list[int] = []
        with self._lock:
            chunks = self._tokenize(text, images)
            try:
                mt = self._mt
                n_images = 0
                for i in range(mt.mtmd_input_chunks_size(chunks)):
                    chunk = mt.mtmd_input_chunks_get(chunks, i)
                    if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                        n = ctypes.c_size_t()
                        tokens = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                        ids.extend(int(tokens[j]) for j in range(n.value))
                        continue
                    if mt.mtmd_input_chunk_get_type(chunk) != mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                        raise ValueError("only images are supported")
                    ids.extend([IMAGE_ID] * int(mt.mtmd_input_chunk_get_n_tokens(chunk)))
                    self._keep(images[n_images].sha256, mt.mtmd_input_chunk_copy(chunk))
                    n_images += 1
            finally:
                self._mt.mtmd_input_chunks_free(chunks)
        if ids and ids[-1] == IMAGE_ID:
            raise ValueError("the prompt must go on with text after its last image")
        return ids

    def _tokenize(self, text: str, images: Sequence[ImageInput]) -> Any:
        mt = self._mt
        bitmaps = []
        chunks = mt.mtmd_input_chunks_init()
        try:
            for image in images:
                width, height, pixels = rgb(image)
                bitmap = mt.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels))
                if not bitmap:
                    raise ValueError("libmtmd could not take the image's pixels")
                bitmaps.append(bitmap)
                mt.mtmd_bitmap_set_id(bitmap, image.sha256.encode())  # the chunk's id, as llama-server's hash
            raw = text.encode()
            source = mt.mtmd_input_text()
            source.text, source.text_len, source.add_special, source.parse_special = raw, len(raw), False, True
            array = (mt.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = mt.mtmd_tokenize(self._ctx, chunks, ctypes.byref(source), array, len(bitmaps))
        except BaseException:
            mt.mtmd_input_chunks_free(chunks)
            raise
        finally:
            for bitmap in bitmaps:
                mt.mtmd_bitmap_free(bitmap)
        if rc != 0:
            mt.mtmd_input_chunks_free(chunks)
            raise ValueError(f"the model's projector could not preprocess the image (libmtmd error {rc})")
        return chunks

    def _keep(self, sha: str, chunk: Any) -> None:
        old = self._prepared.pop(sha, None)
        if old is not None:
            self._mt.mtmd_input_chunk_free(old)
        self._prepared[sha] = chunk
        while len(self._prepared) > PREPARED_KEPT:
            self._mt.mtmd_input_chunk_free(self._prepared.popitem(last=False)[1])

    # ---- the backend's thread ------------------------------------------------------------------
    def cells(self, prompt: list[int], images: Sequence[ImageInput]) -> tuple[list[int], dict[int, Any]]:
        """A request's prompt as a slot's cells (each image's positions its ``image_key``) and the
        image chunk that starts at each image's index. The caller frees the chunks (``free``)."""
        cells = list(prompt)
        chunks: dict[int, Any] = {}
        i = 0
        try:
            for image in images:
                while i < len(cells) and cells[i] != IMAGE_ID:
                    i += 1
                chunk = self._take(image)
                n = int(self._mt.mtmd_input_chunk_get_n_tokens(chunk))
                chunks[i] = chunk
                if cells[i : i + n] != [IMAGE_ID] * n:
                    raise ValueError("the prompt's image positions do not match its images")
                cells[i : i + n] = [image_key(image)] * n
                i += n
            if IMAGE_ID in cells:
                raise ValueError("the prompt has more image positions than images")
        except BaseException:
            self.free(chunks)
            raise
        return cells, chunks

    def _take(self, image: ImageInput) -> Any:
        with self._lock:
            chunk = self._prepared.pop(image.sha256, None)
            if chunk is not None:
                return chunk
            chunks = self._tokenize(self.marker, [image])  # gone from the few kept: tokenized again
            try:
                mt = self._mt
                for i in range(mt.mtmd_input_chunks_size(chunks)):
                    found = mt.mtmd_input_chunks_get(chunks, i)
                    if mt.mtmd_input_chunk_get_type(found) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                        return mt.mtmd_input_chunk_copy(found)
            finally:
                self._mt.mtmd_input_chunks_free(chunks)
        raise ValueError("libmtmd made no image chunk of the image")

    def evaluate(self, ctx: Any, chunk: Any, pos: int, seq_id: int, n_batch: int) -> int:
        """The image chunk encoded and decoded into ``seq_id`` at ``pos`` (its own ``llama_decode``):
        the positions it took (its tokens: no M-RoPE here)."""
        new_pos = self._lc.llama_pos(0)
        rc = self._mt.mtmd_helper_eval_chunk_single(
            self._ctx, ctx, chunk, pos, seq_id, n_batch, False, ctypes.byref(new_pos)
        )
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not evaluate the image (error {rc})")
        return int(new_pos.value) - pos

    def feed(self, ctx: Any, slot: Any, seq: Any, n_batch: int) -> str | None:
        """The image chunk that starts ``seq``'s pending cells (if one does) evaluated into ``slot``,
        which then holds its cells (llamacpp.py's slot and sequence). The error, if it failed."""
        chunk = seq.media.pop(len(slot.tokens), None)
        if chunk is None:  # text next; an image without its chunk would stall the slot: ended instead
            return "an image of the prompt has no chunk to evaluate" if seq.pending and seq.pending[0] < 0 else None
        try:
            n = self.evaluate(ctx, chunk, len(slot.tokens), slot.seq_id, n_batch)
        except Exception as exc:
            return str(exc)
        finally:
            self._mt.mtmd_input_chunk_free(chunk)
        slot.tokens.extend(seq.pending[:n])
        del seq.pending[:n]
        return None

    def free(self, chunks: dict[int, Any]) -> None:
        for chunk in chunks.values():
            self._mt.mtmd_input_chunk_free(chunk)
        chunks.clear()

    def close(self) -> None:
        """Free the kept chunks and the context (before the model it was made for)."""
        with self._lock:
            for chunk in self._prepared.values():
                self._mt.mtmd_input_chunk_free(chunk)
            self._prepared.clear()
            if self._ctx:
                self._mt.mtmd_free(self._ctx)
                self._ctx = None


def text_before_image(pending: list[int]) -> int:
    """How many of ``pending``'s cells come before its first image position (all: none)."""
    for i, cell in enumerate(pending):
        if cell < 0:
            return i
    return len(pending)


def image_start(prompt: list[int], keep: int) -> int:
    """``keep`` moved back to the start of the image it would cut (a prefix never ends inside one)."""
    if 0 < keep < len(prompt) and prompt[keep] < 0:
        while keep > 0 and prompt[keep - 1] == prompt[keep]:
            keep -= 1
    return keep
