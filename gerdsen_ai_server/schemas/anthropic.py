"""Pydantic models of Anthropic's Messages API (the subset we serve), requests and responses.

Every content block a text model can take is accepted: text, tool_use, tool_result (string or
text-block content, ``is_error``), thinking and redacted_thinking blocks that clients pass back in
assistant turns, and ``cache_control`` wherever Anthropic allows it; ``image`` blocks in user turns
for a vision model (serving/images.py decodes them, and refuses them for a text model). A block no
model here can read (document, search_result, container_upload, an image inside a tool result) or
one that belongs to Anthropic's own server-side tools is a 400 naming its type and place
(``messages.1.content.0``), checked before the schema so the error never reads as the misleading
first branch of ``str | list``. The fields table in docs/clients.md ("Anthropic fields and blocks")
says what each top-level field does here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import MAX_MESSAGES, REQUEST_CONFIG

# Blocks whose content no model here reads: refused by name.
MEDIA_BLOCKS = frozenset({"image", "document", "search_result", "container_upload"})
MESSAGE_BLOCKS = frozenset({"text", "tool_use", "tool_result", "thinking", "redacted_thinking"})
USER_BLOCKS = MESSAGE_BLOCKS | {"image"}  # an image is user input, as on Anthropic's side
TOOL_RESULT_BLOCKS = frozenset({"text"})
SYSTEM_BLOCKS = frozenset({"text"})


class _Request(BaseModel):
    model_config = REQUEST_CONFIG  # strict types, finite numbers, unknown fields refused (schemas/openai.py)


class CacheControl(_Request):
    """A prompt-caching breakpoint. Accepted and not needed: the engine's prefix cache reuses any
    shared prompt prefix on its own, with no markers and no TTL."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Request):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    # Provenance a client echoes back from an earlier answer; the model reads the text, not these.
    citations: list[dict[str, Any]] | None = None


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    # Echoed back by the SDK from a response; only meaningful for Anthropic's server-side tools.
    caller: dict[str, Any] | None = None
    toolset_name: str | None = None


def _text_or_blocks(value: Any) -> str:
    return "text" if isinstance(value, str) else "blocks"


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Annotated[
        Annotated[str, Tag("text")] | Annotated[list[TextBlock], Tag("blocks")], Discriminator(_text_or_blocks)
    ] = ""
    is_error: bool | None = None
    cache_control: CacheControl | None = None
    toolset_name: str | None = None

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {body}" if self.is_error else body


class ThinkingBlock(_Request):
    """A thinking block replayed from an earlier answer (of a thinking-enabled model). Dropped from
    the prompt, as Anthropic drops earlier turns' thinking; the signature is not checked, since it
    only proves the block came from Anthropic's own model."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None
    cache_control: CacheControl | None = None


class RedactedThinkingBlock(_Request):
    type: Literal["redacted_thinking"]
    data: str
    cache_control: CacheControl | None = None


class Base64Source(_Request):
    type: Literal["base64"]
    media_type: str  # checked against the bytes when decoded (serving/images.py): PNG, JPEG or WebP
    data: str


class URLSource(_Request):
    type: Literal["url"]
    url: str  # fetched only when IMPETUS_ALLOW_IMAGE_URLS is on (serving/images.py)


class ImageBlock(_Request):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None

    def data_url(self) -> str:
        """The image as an OpenAI ``image_url`` part's URL: the chat path decodes both alike."""
        source = self.source
        return source.url if isinstance(source, URLSource) else f"data:{source.media_type};base64,{source.data}"


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock | ImageBlock,
    Field(discriminator="type"),
]


class Message(_Request):
    """One turn. ``system`` turns are accepted too, as the current SDK's ``MessageParam`` allows."""

    role: Literal["user", "assistant", "system"]
    # A callable discriminator, so a bad block list reports the block's own error, never the
    # misleading "Input should be a valid string" of the str branch.
    content: Annotated[
        Annotated[str, Tag("text")] | Annotated[list[Block], Tag("blocks")], Discriminator(_text_or_blocks)
    ]

    @model_validator(mode="wrap")
    @classmethod
    def _plain_locations(cls, data: Any, handler: ModelWrapValidatorHandler[Message]) -> Message:
        """Errors located the way the API documents the request (``content.0.text``), without
        pydantic's union labels (``blocks``, the block's tag) in the path."""
        try:
            return handler(data)
        except ValidationError as exc:
            details: list[InitErrorDetails] = []
            for error in exc.errors():
                loc = list(error["loc"])
                if loc[1:2] == ["blocks"] and len(loc) > 3 and isinstance(loc[2], int):
                    del loc[3]  # the block's type tag (message content is a union tagged by type)
                # "text"/"blocks" after any "content": which branch of str | list was tried, not a field.
                loc = [p for i, p in enumerate(loc) if not (i and loc[i - 1] == "content" and isinstance(p, str))]
                details.append(
                    InitErrorDetails(
                        type=PydanticCustomError(error["type"], error["msg"]), loc=tuple(loc), input=error["input"]
                    )
                )
            raise ValidationError.from_exception_data(cls.__name__, details) from None


class AnthropicTool(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None
    strict: bool | None = None  # passed on as the function's strict flag
    eager_input_streaming: bool | None = None  # a streaming-granularity hint: the arguments are the same


class ToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(_Request):
    user_id: str | None = None  # attribution only, as on Anthropic's side


class ThinkingConfig(_Request):
    """Accepted: the answer comes without thinking blocks, as Claude's own answers may when it
    decides not to think. ``budget_tokens`` is checked as Anthropic checks it."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=1024)
    display: Literal["summarized", "omitted"] | None = None

    @model_validator(mode="after")
    def _budget(self) -> ThinkingConfig:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("thinking of type 'enabled' needs budget_tokens")
        return self


class JSONOutputFormat(_Request):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    model_config = ConfigDict(**REQUEST_CONFIG, populate_by_name=True)


class OutputConfig(_Request):
    format: JSONOutputFormat | None = None  # honoured: constrained decoding, as response_format json_schema
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # sets thinking effort: no thinking here


class ContextEdit(_Request):
    model_config = ConfigDict(**{**REQUEST_CONFIG, "extra": "allow"})

    type: str


class ContextManagement(_Request):
    """Only thinking-clearing edits are accepted: earlier turns' thinking is always dropped here.
    Tool-result clearing would change the prompt past a threshold we do not track: a 400."""

    edits: list[ContextEdit] = Field(default_factory=list)

    @model_validator(mode="after")
    def _only_thinking(self) -> ContextManagement:
        for edit in self.edits:
            if not edit.type.startswith("clear_thinking_"):
                raise ValueError(
                    f"context edits of type '{edit.type}' are not supported by this server "
                    "(only clear_thinking_* edits, which it always applies)"
                )
        return self


def _refused_block(kind: str, allowed: frozenset[str]) -> str:
    if kind == "image" and allowed == MESSAGE_BLOCKS:
        return "image blocks are only allowed in user messages"
    if kind == "image":
        return f"image blocks are not supported here by this server (allowed: {', '.join(sorted(allowed))})"
    if kind in MEDIA_BLOCKS:
        return f"{kind} blocks are not supported by this server (it takes text and images)"
    if kind in MESSAGE_BLOCKS:
        return f"{kind} blocks are not allowed here (allowed: {', '.join(sorted(allowed))})"
    return (
        f"blocks of type '{kind}' are not supported by this server (Anthropic's server-side tools and "
        f"their results are not run here; allowed: {', '.join(sorted(allowed))})"
    )


def _block_lists(data: dict[str, Any]) -> list[tuple[str, list[Any], frozenset[str]]]:
    """Every list of content blocks in a raw request, with its location and the types allowed there."""
    lists: list[tuple[str, list[Any], frozenset[str]]] = []
    if isinstance(data.get("system"), list):
        lists.append(("system", data["system"], SYSTEM_BLOCKS))
    messages = data.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        role = message.get("role")
        blocks = SYSTEM_BLOCKS if role == "system" else USER_BLOCKS if role == "user" else MESSAGE_BLOCKS
        lists.append((f"messages.{i}.content", content, blocks))
        for j, block in enumerate(content):
            if (
                isinstance(block, dict)
                and block.get("type") == "tool_result"
                and isinstance(block.get("content"), list)
            ):
                lists.append((f"messages.{i}.content.{j}.content", block["content"], TOOL_RESULT_BLOCKS))
    return lists


def refuse_unsupported_blocks(data: Any) -> Any:
    """A 400 naming the first block a text model cannot take, with its place in the request."""
    if not isinstance(data, dict):
        return data
    for where, blocks, allowed in _block_lists(data):
        for j, block in enumerate(blocks):
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind not in allowed:
                raise APIError(
                    400,
                    f"{where}.{j}: {_refused_block(kind[:50], allowed)}",
                    param=f"{where}.{j}",
                    code="unsupported_content",
                )
    tools = data.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind != "custom":
            raise APIError(
                400,
                f"tools.{i}: tools of type '{kind[:50]}' are Anthropic's server-side tools, which this "
                "server does not run; declare a custom tool (name, input_schema) instead.",
                param=f"tools.{i}.type",
                code="unsupported_tool",
            )
    return data


class _Conversation(_Request):
    """What /v1/messages and /v1/messages/count_tokens share."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None  # top-level "cache the longest prefix": the prefix cache does
    context_management: ContextManagement | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_blocks(cls, data: Any) -> Any:
        return refuse_unsupported_blocks(data)

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system
        return "".join(b.text for b in self.system)


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = Field(None, max_length=4)
    stream: bool = False
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here: every request gets it
    speed: Literal["standard", "fast"] | None = None  # one speed here; it does not change the answer
    inference_geo: str | None = None  # inference runs on this machine, wherever that is
    user_profile_id: str | None = None  # attribution only
    workspace_id: str | None = None  # attribution only

    @model_validator(mode="after")
    def _budget_below_max_tokens(self) -> MessagesRequest:
        budget = self.thinking.budget_tokens if self.thinking is not None else None
        if (
            self.thinking is not None
            and self.thinking.type == "enabled"
            and budget is not None
            and budget >= self.max_tokens
        ):
            raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self


class CountTokensRequest(_Conversation):
    speed: Literal["standard", "fast"] | None = None


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int
