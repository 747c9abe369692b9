"""Discover cards: what each recommended model will take on this machine and backend, and which build is faster here.

``GET /api/models/discover`` lists the catalogue (store/catalogue.py) or a hub search. For each MLX
repo the memory is what the registry will charge once it loads: its weights in the dtype this
server would choose for it (engine/dtype.py: float32 on a CPU only where the float32 weights and
their KV cache at the context fit the budget, else the stored quantization). Where a GGUF runs on
llama.cpp (IMPETUS_BACKEND=auto on a CPU: engine/backends/choice.py), the catalogue's GGUF build of
the model comes first, marked ``faster``, with what llama.cpp reserves: the file and the KV cache
of IMPETUS_MAX_BATCH slots of the context (llamacpp_sizing.py). Ollama and LM Studio show a model's
size beside a "fits / too big" flag the same way; neither says which backend will run it.
"""

from __future__ import annotations

from pathlib import Path

from gerdsen_ai_server.engine import dtype
from gerdsen_ai_server.engine.backends.choice import choose as choose_backend
from gerdsen_ai_server.engine.backends.llamacpp_sizing import KV_TYPE_NAMES, KV_TYPES
from gerdsen_ai_server.schemas.pulls import DiscoveredModel
from gerdsen_ai_server.services import services
from gerdsen_ai_server.store import catalogue, hub
from gerdsen_ai_server.store.catalogue import CatalogueModel

__all__ = ["catalogue_cards", "mlx_memory"]


def _context(trained: int) -> int:
    """The context a load gets by default: IMPETUS_CONTEXT_LENGTH within the trained length (formats/context.py)."""
    asked = services().settings.context_length
    return min(asked, trained) if asked else trained


def mlx_memory(
    parameters: int | None, size_bytes: int | None, kv_elements: int, context: int, quantized: bool
) -> tuple[int | None, dtype.DtypeChoice]:
    """(bytes the registry will charge, the dtype choice) for an MLX repo of ``parameters`` stored in
    ``size_bytes``, as the registry decides at load (``ModelRegistry.choose_dtype``)."""
    registry = services().engine.registry
    pinned = sum(r.loaded.nbytes for r in registry.residents.values() if r.pinned)
    choice = dtype.choose(
        registry.compute_setting,
        fp32_bytes=(parameters or 0) * 4,
        kv_fp32_bytes_per_token=kv_elements * 4,
        context=context,
        room_bytes=registry.budget_bytes - pinned if parameters else -1,  # unknown size: never float32
        quantized=quantized,
    )
    return catalogue.memory_bytes(parameters, size_bytes, choice.dtype), choice


def _mlx_card(model: CatalogueModel, models_dir: Path, budget: int) -> DiscoveredModel:
    context = _context(model.context)
    quantized = model.quantization.endswith("bit")
    memory, choice = mlx_memory(model.parameters, model.size_bytes, model.kv_elements, context, quantized)
    return DiscoveredModel(
        id=model.id,
        source="catalogue",
        description=model.description,
        parameters=model.parameters,
        quantization=model.quantization,
        size_bytes=model.size_bytes,
        memory_bytes=memory,
        fits=memory is not None and memory <= budget,
        local=(models_dir / hub.folder_name(model.id)).is_dir(),
        format="mlx",
        backend="mlx",
        compute_dtype=choice.name,
        context_length=context,
        memory_note=f"the weights, computing in {choice.name} ({choice.reason})",
        vision=model.vision,
    )


def _gguf_card(model: CatalogueModel, models_dir: Path, budget: int, faster: bool) -> DiscoveredModel | None:
    build = model.gguf
    if build is None:
        return None
    settings = services().settings
    context = _context(model.context)
    _, block_bytes, block = KV_TYPES.get(settings.kv_bits, KV_TYPES[0])
    slots = settings.max_batch
    kv = model.kv_elements * slots * context * block_bytes // block
    memory = build.size_bytes + build.projector_bytes + kv
    return DiscoveredModel(
        id=build.repo,
        source="catalogue",
        description=model.description,
        parameters=model.parameters,
        quantization=build.file.rsplit("-", 1)[-1].removesuffix(".gguf").upper(),
        size_bytes=build.size_bytes,
        memory_bytes=memory,
        fits=memory <= budget,
        local=(models_dir / hub.folder_name(build.repo)).is_dir(),
        format="gguf",
        file=build.file,
        backend="llamacpp",
        compute_dtype="as stored",
        context_length=context,
        faster=faster,
        vision=model.vision,
        memory_note=(
            f"the file{' and its projector (mmproj)' if build.projector_bytes else ''} plus llama.cpp's {KV_TYPE_NAMES.get(settings.kv_bits, 'f16')} KV cache of {slots} slots "
            f"of {context} tokens (IMPETUS_MAX_BATCH, IMPETUS_CONTEXT_LENGTH)"
        ),
    )


def catalogue_cards(query: str | None, limit: int, models_dir: Path) -> list[DiscoveredModel]:
    """The catalogue's entries matching ``query``, at most ``limit`` cards: each MLX repo, and its GGUF
    build first where llama.cpp runs GGUF files here (marked ``faster`` where MLX computes on a CPU)."""
    budget = services().engine.registry.budget_bytes
    backend = choose_backend(services().settings.backend)
    gguf_here = backend.gguf == "llamacpp"
    faster = gguf_here and backend.mlx_device == "cpu"
    cards: list[DiscoveredModel] = []
    for model in catalogue.search_catalogue(query):
        gguf = _gguf_card(model, models_dir, budget, faster) if gguf_here else None
        mlx = _mlx_card(model, models_dir, budget)
        cards.extend(c for c in ((gguf, mlx) if faster else (mlx, gguf)) if c is not None)
    return cards[:limit]
