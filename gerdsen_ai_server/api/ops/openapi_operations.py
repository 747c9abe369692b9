"""The API's operations as /openapi.json lists them: each path and method with its tag, summary,
request and response schemas, and the errors it may answer beyond the common ones (docs.py builds
the document from these tables; tests/inprocess/test_openapi_routes.py checks that every route is here).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from gerdsen_ai_server.schemas import anthropic, embeddings, hardware, health, models, openai, pulls, responses, server
from gerdsen_ai_server.schemas import presets as preset_schemas
from gerdsen_ai_server.schemas import requests as running
from gerdsen_ai_server.schemas import tokenize as tokenizing
from gerdsen_ai_server.schemas.rerank import RerankRequest, RerankResponse

# (path, method, tag, summary, request model, response model or JSON schema, streams, secured)
Operation = tuple[str, str, str, str, type[BaseModel] | None, type[BaseModel] | dict[str, Any], bool, bool]
OPERATIONS: list[Operation] = [
    (
        "/v1/chat/completions",
        "post",
        "OpenAI",
        "Create a chat completion",
        openai.ChatCompletionRequest,
        openai.ChatCompletion,
        True,
        True,
    ),
    (
        "/v1/completions",
        "post",
        "OpenAI",
        "Create a text completion",
        openai.CompletionRequest,
        openai.Completion,
        True,
        True,
    ),
    (
        "/v1/embeddings",
        "post",
        "OpenAI",
        "Embed text (mean-pooled hidden states of a language model)",
        embeddings.EmbeddingRequest,
        embeddings.EmbeddingList,
        False,
        True,
    ),
    *[
        (
            path,
            "post",
            "Rerank",
            f"Rank documents by relevance to a query with a reranker{alias}",
            RerankRequest,
            RerankResponse,
            False,
            True,
        )
        for path, alias in (
            ("/v1/rerank", " (Cohere's, Jina's, vLLM's and llama-server's shape)"),
            ("/rerank", ": /v1/rerank at the root"),
            ("/v1/reranking", ": /v1/rerank under llama-server's name"),
        )
    ],
    ("/v1/models", "get", "OpenAI", "List the loaded models", None, openai.ModelList, False, True),
    ("/v1/models/{model_id}", "get", "OpenAI", "Describe a loaded model", None, openai.ModelCard, False, True),
    (
        "/v1/responses",
        "post",
        "OpenAI",
        "Create a response (Responses API; store: true keeps it for previous_response_id)",
        responses.ResponsesRequest,
        responses.ResponseObject,
        True,
        True,
    ),
    (
        "/v1/responses/{response_id}",
        "get",
        "OpenAI",
        "A stored response (one created with store: true, by the same API key or an admin's)",
        None,
        responses.ResponseObject,
        False,
        True,
    ),
    (
        "/v1/responses/{response_id}",
        "delete",
        "OpenAI",
        "Delete a stored response",
        None,
        responses.ResponseDeleted,
        False,
        True,
    ),
    (
        "/tokenize",
        "post",
        "Tokens",
        "Tokenize a prompt, or messages as the chat template renders them (vLLM's)",
        tokenizing.TokenizeRequest,
        tokenizing.TokenizeResponse,
        False,
        True,
    ),
    (
        "/detokenize",
        "post",
        "Tokens",
        "Token ids back to text (vLLM's)",
        tokenizing.DetokenizeRequest,
        tokenizing.DetokenizeResponse,
        False,
        True,
    ),
    (
        "/apply-template",
        "post",
        "Tokens",
        "Messages rendered by the model's chat template, as text (llama-server's)",
        tokenizing.ApplyTemplateRequest,
        tokenizing.ApplyTemplateResponse,
        False,
        True,
    ),
    (
        "/v1/messages",
        "post",
        "Anthropic",
        "Create a message (Anthropic Messages API)",
        anthropic.MessagesRequest,
        anthropic.MessageResponse,
        True,
        True,
    ),
    (
        "/v1/messages/count_tokens",
        "post",
        "Anthropic",
        "Count a message's input tokens",
        anthropic.CountTokensRequest,
        anthropic.CountTokensResponse,
        False,
        True,
    ),
    (
        "/api/models",
        "get",
        "Models",
        "Resident and local models, with the memory budget",
        None,
        models.ModelsOverview,
        False,
        True,
    ),
    (
        "/api/models/{model_id}",
        "get",
        "Models",
        "Describe a resident or local model",
        None,
        models.ModelInfo,
        False,
        True,
    ),
    (
        "/api/models/load",
        "post",
        "Models",
        "Load a model (or refresh its keep-alive)",
        models.LoadRequest,
        models.ModelInfo,
        False,
        True,
    ),
    (
        "/api/models/unload",
        "post",
        "Models",
        "Unload a resident model",
        models.UnloadRequest,
        models.ModelUnloaded,
        False,
        True,
    ),
    (
        "/api/models/{model_id}/benchmark",
        "post",
        "Models",
        "Benchmark a model on this machine (prompt and generation tok/s, TTFT, peak memory); 409 while one runs",
        models.BenchmarkRequest,
        models.BenchmarkResult,
        False,
        True,
    ),
    (
        "/api/models/{model_id}/benchmark",
        "get",
        "Models",
        "A model's benchmark history, oldest first",
        None,
        models.BenchmarkHistory,
        False,
        True,
    ),
    (
        "/api/models/pull",
        "post",
        "Models",
        "Pull a model from the Hugging Face hub, in the background (202)",
        pulls.PullRequest,
        pulls.PullStatus,
        False,
        True,
    ),
    ("/api/models/pulls", "get", "Models", "Every pull this process knows", None, pulls.PullList, False, True),
    ("/api/models/pulls/{pull_id}", "get", "Models", "One pull's progress", None, pulls.PullStatus, False, True),
    (
        "/api/models/pulls/{pull_id}",
        "delete",
        "Models",
        "Cancel a pull (partial files stay, to resume)",
        None,
        pulls.PullStatus,
        False,
        True,
    ),
    (
        "/api/models/{model_id}",
        "delete",
        "Models",
        "Delete a local model (409 while loaded or pulled)",
        None,
        pulls.ModelDeleted,
        False,
        True,
    ),
    (
        "/api/models/discover",
        "get",
        "Models",
        "Models to pull: the curated catalogue, or a hub search (q)",
        None,
        pulls.DiscoverResponse,
        False,
        True,
    ),
    (
        "/api/hardware",
        "get",
        "Monitoring",
        "The machine: platform, CPU, memory, GPUs, MLX, thermal state and throttling (a failed probe is null)",
        None,
        hardware.HardwareReport,
        False,
        True,
    ),
    (
        "/api/config",
        "get",
        "Monitoring",
        "The settings in force (secrets masked)",
        None,
        server.ConfigList,
        False,
        True,
    ),
    (
        "/api/requests",
        "get",
        "Monitoring",
        "Generations and embeddings running now (admin)",
        None,
        running.RunningRequestList,
        False,
        True,
    ),
    (
        "/api/requests/{request_id}",
        "delete",
        "Monitoring",
        "Cancel a running request: its client gets `request_cancelled` (admin)",
        None,
        running.RunningRequest,
        False,
        True,
    ),
    ("/api/presets", "get", "Presets", "Every preset, by name", None, preset_schemas.PresetList, False, True),
    ("/api/presets/{name}", "get", "Presets", "One preset", None, preset_schemas.Preset, False, True),
    *[
        (path, method, "Presets", summary, preset_schemas.Preset, preset_schemas.Preset, False, True)
        for path, method, summary in (
            ("/api/presets", "post", "Create a preset (201)"),
            ("/api/presets/{name}", "put", "Create or replace a preset"),
        )
    ],
    ("/api/presets/{name}", "delete", "Presets", "Delete a preset", None, preset_schemas.PresetDeleted, False, True),
    ("/health", "get", "Health", "Details: readiness, engine, models", None, health.HealthReport, False, False),
    ("/health/live", "get", "Health", "Liveness probe (always open)", None, health.Liveness, False, False),
]
CROSS_ORIGIN = "A browser's request from an origin outside IMPETUS_CORS_ORIGINS (`cross_origin_request`)."
FORBIDDEN = (
    "Management needs an admin key (`insufficient_scope`); or a browser's request from an origin outside "
    "IMPETUS_CORS_ORIGINS (`cross_origin_request`)."
)
NOT_JSON = "The body is not sent as `Content-Type: application/json` (`unsupported_media_type`)."
# Answers other than those every operation may give.
OK_STATUS = {("/api/models/pull", "post"): "202", ("/api/presets", "post"): "201"}
PRESET_CONFLICT = "The name is a model's (`preset_conflict`), or, creating, a preset's already (`preset_exists`)."
BUSY = "The model is busy loading or unloading (`model_busy`)."
UNLOADABLE = (
    "The model could not be loaded: unsupported format, over the memory budget or broken "
    "(`unsupported_model_format`, `insufficient_memory`, `model_load_failed`)."
)
GENERATIVE = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/rerank",
    "/rerank",
    "/v1/reranking",
)
EXTRA_ERRORS: dict[tuple[str, str], dict[str, str]] = {
    ("/api/presets", "post"): {"409": PRESET_CONFLICT},
    ("/api/presets/{name}", "put"): {"409": PRESET_CONFLICT},
    **{(path, "post"): {"409": BUSY, "422": UNLOADABLE} for path in GENERATIVE},  # a model loaded on demand
    **{(path, "post"): {"409": BUSY, "422": UNLOADABLE} for path in ("/tokenize", "/detokenize", "/apply-template")},
    ("/api/models/load", "post"): {"409": BUSY, "422": UNLOADABLE},
    ("/api/models/unload", "post"): {"409": BUSY + " Or it is the pinned default model (`model_pinned`)."},
    ("/api/models/{model_id}/benchmark", "post"): {
        "409": "A benchmark of this model is already running (`benchmark_running`), or it is busy.",
        "422": UNLOADABLE,
    },
    ("/api/models/{model_id}", "delete"): {
        "409": "The model is loaded, being pulled, or the pinned default model (`model_loaded`, `pull_in_progress`, "
        "`model_pinned`)."
    },
}
TIMED_OUT = (
    "Ran past IMPETUS_REQUEST_TIMEOUT and was cancelled (`request_timeout`, with `x-should-retry: false`); "
    "an operator's cancel is a 503 `request_cancelled`."
)
for _path in GENERATIVE[:-1]:  # all but count_tokens run on the engine, within IMPETUS_REQUEST_TIMEOUT
    EXTRA_ERRORS[(_path, "post")]["504"] = TIMED_OUT
QUERIES: dict[tuple[str, str], type[BaseModel]] = {("/api/models/discover", "get"): pulls.DiscoverQuery}
# Open unless IMPETUS_PROTECT_HEALTH: then they need the key like the API.
MONITORING = ("/health", "/metrics")
PROMETHEUS = {
    "text/plain": {
        "schema": {
            "type": "string",
            "description": "Prometheus text exposition format 0.0.4 (OpenMetrics when the Accept header "
            "asks for application/openmetrics-text).",
        }
    }
}
