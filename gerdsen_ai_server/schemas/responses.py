"""Pydantic models of OpenAI's Responses API: the requests we serve, the response object, its deletion."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gerdsen_ai_server.schemas.openai import MAX_MESSAGES, REQUEST_CONFIG, ReasoningEffort, SDKFields, Verbosity


class _Request(BaseModel):
    model_config = REQUEST_CONFIG  # strict types, finite numbers, unknown fields refused (schemas/openai.py)


class ContentPart(_Request):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None


class InputImage(_Request):
    """An image in a user message: ``image_url`` a data: URL (or http(s), when the operator allows
    fetching), decoded as a chat ``image_url`` part is (serving/images.py). ``file_id`` names OpenAI's
    Files API, which this server does not have: a 400 (serving/responses.py)."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] = "auto"  # accepted, as chat's ``detail`` (schemas/parts.py)


class InputMessage(_Request):
    type: Literal["message"] | None = None
    id: str | None = None
    status: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Annotated[ContentPart | InputImage, Field(discriminator="type")]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, ContentPart))


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    id: str | None = None
    status: str | None = None
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    id: str | None = None
    status: str | None = None
    call_id: str
    output: str


class ReasoningText(_Request):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Request):
    """A reasoning item of an earlier answer, passed back in ``input`` as OpenAI asks clients to do.
    Dropped from the prompt: earlier turns' thinking is left out, as the chat templates of thinking
    models (Qwen3, DeepSeek-R1) leave it out."""

    type: Literal["reasoning"]
    id: str | None = None
    status: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


class FunctionTool(_Request):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Verbosity | None = None  # "medium" only: serving/responses.py


class Reasoning(_Request):
    """OpenAI's reasoning options. ``effort`` passes to the chat template (as chat completions'
    ``reasoning_effort``: a 400 for a model that does not reason); ``summary`` is accepted and the
    reasoning comes whole as ``reasoning_text`` content with an empty ``summary``, as vLLM returns it
    (no summariser runs here). The rest is refused (serving/responses.py)."""

    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None
    mode: str | None = None
    context: Literal["auto", "current_turn", "all_turns"] | None = None


class ResponsesStreamOptions(_Request):
    include_obfuscation: bool | None = None  # no obfuscation padding is sent (schemas/openai.py StreamOptions)


# What ``include`` may ask for. Only the logprobs add anything here: the others add data to output items
# of built-in tools or reasoning, which never occur (those tools are refused), or echo an input image's URL,
# which the response does not carry back.
Includable = Literal[
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
]
LOGPROBS = "message.output_text.logprobs"


class ResponsesRequest(SDKFields):
    model: str = Field(min_length=1)
    input: (
        str
        | Annotated[
            list[InputMessage | FunctionCallItem | FunctionCallOutputItem | ReasoningItem],
            Field(max_length=MAX_MESSAGES),
        ]
    )
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    user: str | None = None
    # Fields the SDKs send (docs/clients.md "Fields the SDKs send"); metadata, store and the cache and
    # tier hints come from SDKFields.
    include: list[Includable] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: Reasoning | None = None
    stream_options: ResponsesStreamOptions | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    context_management: list[dict[str, Any]] | None = None
    moderation: dict[str, Any] | None = None

    def logprob_count(self) -> int | None:
        """Alternatives per token when logprobs are asked for (``include``, or ``top_logprobs`` set)."""
        if LOGPROBS in (self.include or []) or self.top_logprobs is not None:
            return self.top_logprobs or 0
        return None

    def unsupported(self) -> str | None:
        """A known field we cannot honour where ignoring it would mislead: state kept on OpenAI's side
        (a conversation, a stored prompt, background runs, compaction), moderation, reasoning or
        verbosity controls the models here lack (OpenAI's own 400 for such a model)."""
        for name in ("conversation", "prompt", "context_management", "moderation"):
            if getattr(self, name) is not None:
                return name
        if self.background:
            return "background"
        if self.reasoning is not None:
            for name in ("generate_summary", "mode", "context"):
                if getattr(self.reasoning, name) is not None:
                    return f"reasoning.{name}"
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            return "text.verbosity"
        return None


# ---- the response object (what POST /v1/responses answers, and what its stream events carry) ----

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class LogprobAlternative(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class OutputLogprob(LogprobAlternative):
    top_logprobs: list[LogprobAlternative]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[OutputLogprob] = Field(
        default_factory=list, description="With include message.output_text.logprobs (or top_logprobs)."
    )


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = Field(description="The call's arguments, a JSON object as a string.")
    status: ItemStatus


class OutputReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputReasoning(BaseModel):
    """A thinking model's reasoning, before its message (vLLM's shape: the raw text as content)."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list, description="Always empty: no summariser runs here.")
    content: list[OutputReasoningText]
    status: ItemStatus


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseObject(BaseModel):
    """OpenAI's Response object. ``tools``, ``tool_choice`` and ``text`` echo the request."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress"]
    model: str
    output: list[Annotated[OutputReasoning | OutputMessage | OutputFunctionCall, Field(discriminator="type")]]
    error: None = Field(None, description="Always null: a failed generation is an error response or event.")
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    parallel_tool_calls: bool
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice
    tools: list[dict[str, Any]]
    text: dict[str, Any]
    store: bool = Field(
        False, description="Whether it was stored (store: true, IMPETUS_RESPONSES_STORE_BYTES): GET /v1/responses/{id}."
    )
    metadata: dict[str, str]
    previous_response_id: str | None = None
    user: str | None
    usage: ResponseUsage


class ResponseDeleted(BaseModel):
    """DELETE /v1/responses/{id}: OpenAI's answer."""

    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: Literal[True] = True
