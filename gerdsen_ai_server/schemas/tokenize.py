"""Pydantic models of /tokenize, /detokenize (vLLM's shapes) and /apply-template (llama-server's)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from gerdsen_ai_server.schemas.chat import TemplateControls
from gerdsen_ai_server.schemas.openai import MAX_MESSAGES, REQUEST_CONFIG, ChatMessage, Tool

# Token ids one /detokenize may send: above any context served here, so a real prompt always fits,
# and a bound on the work (the body's byte limit bounds it too, IMPETUS_MAX_REQUEST_BYTES).
MAX_DETOKENIZE_TOKENS = 262144
# Fields that only mean something with ``messages``: sent with ``prompt`` they would be ignored.
CHAT_ONLY = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools")

MODEL = "The model; absent: the server's default model (IMPETUS_DEFAULT_MODEL), as vLLM and llama-server serve one."


class _Request(BaseModel):
    model_config = REQUEST_CONFIG


class TemplateFields(TemplateControls):
    """What renders a chat template, named as chat completions name it: serving/chat.py's
    ``chat_text`` renders these exactly as it renders a chat completion's prompt."""

    model_config = REQUEST_CONFIG

    model: str | None = Field(None, min_length=1, description=MODEL)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=128)


class TokenizeRequest(TemplateFields):
    """vLLM's two shapes in one: ``prompt`` (a text, tokenized as is) or ``messages`` (rendered by
    the model's chat template exactly as chat completions render them, then tokenized). One of the
    two, and the chat fields only with ``messages``: serving/tokenize.py refuses the rest with a 400
    naming the field."""

    prompt: str | None = None
    add_special_tokens: bool | None = Field(
        None,
        description="Add the tokenizer's special tokens (e.g. BOS). Default: true for prompt, false for messages "
        "(the chat template writes them itself), as vLLM.",
    )
    return_token_strs: bool = Field(False, description="Also return each token as the tokenizer's string.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="The model's context length in tokens.")
    tokens: list[int]
    token_strs: list[str] | None = Field(None, description="With return_token_strs.")


class DetokenizeRequest(_Request):
    model: str | None = Field(None, min_length=1, description=MODEL)
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(BaseModel):
    prompt: str


class ApplyTemplateRequest(TemplateFields):
    """llama-server's /apply-template: the chat template's text, not tokenized."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class ApplyTemplateResponse(BaseModel):
    prompt: str
