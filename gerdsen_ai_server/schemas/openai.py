"""Pydantic models of the OpenAI wire format: requests we accept and responses we send.

Only protocol here; turning a request into engine calls lives in ``serving/`` (the routes: ``api/openai/``).
Unknown fields are refused (``extra="forbid"``) so a typo or an unsupported option is a 400
naming it, never silently ignored. Types are strict where OpenAI's are (``"stream": "yes"`` or
``"n": 1.5`` is a 400, as there, not coerced) and numbers finite (no NaN or Infinity); an integer
is still a valid float, as the SDKs send ``temperature=1``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gerdsen_ai_server.schemas.chat import TemplateControls
from gerdsen_ai_server.schemas.logprobs import ChatLogprobs as ChatLogprobs  # "as": re-exported
from gerdsen_ai_server.schemas.logprobs import ChatTokenLogprob as ChatTokenLogprob
from gerdsen_ai_server.schemas.logprobs import CompletionLogprobs as CompletionLogprobs
from gerdsen_ai_server.schemas.logprobs import TopLogprob as TopLogprob
from gerdsen_ai_server.schemas.logprobs import Usage as Usage
from gerdsen_ai_server.schemas.parts import ImagePart, refuse_unsupported_parts
from gerdsen_ai_server.schemas.speculative import SpeculativeConfig

MAX_STOP_SEQUENCES = 4
MAX_MESSAGES = 2048  # OpenAI's own cap on a chat request's messages
# A token id: ASCII digits only ("²".isdigit() is true, and int() of 5,000 digits raises), and
# few enough that int() is cheap; the vocabulary check happens once the model is known.
TOKEN_ID = re.compile(r"[0-9]{1,9}")

# Every request model: unknown fields refused, pydantic's strict mode (no "yes" for a bool, no 1.5
# or "3" for an int, no 1 for a string; an int is still a float), and no NaN or Infinity.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Request(BaseModel):
    model_config = REQUEST_CONFIG


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = Field(description="The arguments as a JSON string, as OpenAI sends them.")


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """A chat message. As OpenAI requires: ``content`` on every message but an assistant's that
    carries ``tool_calls``, and ``tool_call_id`` on a tool result."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = Field(
        None, validate_default=True
    )
    name: str | None = None
    tool_call_id: str | None = Field(None, validate_default=True)
    reasoning_content: str | None = None  # an answer's thinking sent back (SDKs echo it): to the template

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if value is None and role is not None and not (role == "assistant" and info.data.get("tool_calls")):
            needs = "content or tool_calls" if role == "assistant" else "content"
            raise PydanticCustomError("missing", "a {role} message needs {needs}", {"role": role, "needs": needs})
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id_required(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("role") == "tool":
            raise PydanticCustomError("missing", "a tool message needs the tool_call_id it answers")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))  # images: serving/images.py


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False
    # OpenAI pads stream deltas with an "obfuscation" field (a side-channel mitigation for its network);
    # it carries no part of the answer and clients drop it, so either value is accepted: none is sent.
    include_obfuscation: bool | None = None


Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]  # OpenAI's limits: 16 pairs, keys <= 64, values <= 512 characters
ServiceTier = Literal["auto", "default", "flex", "scale", "priority", "fast"]
# OpenAI's reasoning efforts; OpenAI answers a model without the control with a 400, as we do (check_supported).
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
Verbosity = Literal["low", "medium", "high"]


class PromptCacheOptions(_Request):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m", "12h"] | None = None


class Prediction(_Request):
    """Predicted output: a latency hint to OpenAI (speculative decoding); it never changes the answer."""

    type: Literal["content"]
    content: str | list[TextPart]


class SDKFields(_Request):
    """Fields the official SDKs send that cannot change our answer, accepted and otherwise unused
    (docs/clients.md, "Fields the SDKs send", says why for each). Shared by chat and Responses."""

    metadata: Metadata | None = None
    store: bool | None = None  # chat: nothing is stored; Responses: true keeps it (serving/response_store.py)
    service_tier: ServiceTier | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: str | None = Field(None, max_length=64)


class _Generation(_Request):
    """Fields chat and text completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # Common extensions (vLLM, llama.cpp, mlx-lm accept them too).
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    # vLLM's speculative_config, per request (schemas/speculative.py); null: IMPETUS_SPECULATIVE.
    speculative_config: SpeculativeConfig | None = None
    # Ollama's: seconds the model stays loaded after this request (negative: keep it loaded).
    keep_alive: float | None = None
    # mlx_lm.server's: a LoRA adapter for this request; ours names one in the models dir (serving/adapters.py).
    adapters: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="A LoRA adapter in the models dir for this request: served by the resident '<model>+<adapter>'.",
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(len(s) == 0 for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids (decimal digits), got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias}")
        return value

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # the validator has made it a list


class ChatCompletionRequest(_Generation, SDKFields, TemplateControls):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)

    # An audio part is a 400 naming it, not the str branch's "Input should be a valid string".
    _refuse_parts = model_validator(mode="before")(refuse_unsupported_parts)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Known OpenAI options we do not implement yet: accepted by the schema so the error
    # names them as unsupported rather than unknown.
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    # Fields the SDKs send (docs/clients.md): honoured where we can, else accepted or refused below.
    modalities: list[Literal["text", "audio"]] | None = None
    verbosity: Verbosity | None = None
    reasoning_effort: ReasoningEffort | None = None
    prediction: Prediction | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> str | None:
        """A known OpenAI field whose request we cannot meet, where ignoring it would mislead: text
        without the audio asked for, an answer not grounded in the web search asked for, output the
        moderation asked for never checked, a verbosity the model has no control for (OpenAI's own 400
        for a model without it). ``reasoning_effort`` depends on the model: serving/reasoning.py checks it."""
        for name in ("functions", "function_call", "audio", "web_search_options", "moderation"):
            if getattr(self, name) is not None:  # functions/function_call: deprecated in favour of tools
                return name
        if self.modalities is not None and "audio" in self.modalities:
            return "modalities"
        if self.verbosity not in (None, "medium"):
            return "verbosity"
        return None

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the output must follow, or None for free text."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}
        if fmt.json_schema is None:  # ResponseFormat rejects this at validation
            raise ValueError("response_format json_schema without a schema")
        return fmt.json_schema.schema_


PromptType = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Generation):
    prompt: PromptType
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def logprob_count(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return None


# ---- responses ----------------------------------------------------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # The model's thinking, apart from the answer (vLLM's, llama-server's and mlx_lm.server's name);
    # absent, not null, for a model that does not think, so those answers stay as they were.
    reasoning_content: str | None = Field(None, exclude_if=lambda v: v is None)
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(ToolCall):
    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "impetus"
    context_length: int | None = None
    # "language": generates, and embeds through its mean-pooled, normalised hidden states;
    # "embedding": a dedicated embedding model (BERT-family encoder), /v1/embeddings only;
    # "rerank": a reranker (cross-encoder), /v1/rerank only.
    kind: Literal["language", "embedding", "rerank"] = "language"
    capabilities: list[str] = Field(default_factory=lambda: ["chat.completions", "completions", "embeddings"])
    embedding_method: str = "mean-pooled final hidden state, L2-normalised"
    dimensions: int | None = Field(None, description="An embedding model's vector size.")
    matryoshka: bool = Field(False, description="Whether `dimensions` may shorten this model's embeddings.")
    # A preset (/api/presets): an alias a client may name, served by `base_model`; absent on other models.
    preset: bool | None = Field(None, exclude_if=lambda v: v is None, description="True for a preset (an alias).")
    base_model: str | None = Field(None, exclude_if=lambda v: v is None, description="The model a preset serves.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
