"""Chat template controls a chat-shaped request may carry (vLLM's names, also llama-server's and
SGLang's): ``chat_template_kwargs``, ``add_generation_prompt`` and ``continue_final_message``.

A mixin of ``ChatCompletionRequest`` (and of any other request that renders messages, such as
``/tokenize``); ``serving/chat.py`` passes them to the model's chat template.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gerdsen_ai_server.errors import APIError

# Names ``apply_chat_template`` takes itself or sets for the template: a kwarg of these names would
# replace the messages, the template itself, or the tokenizer's output, not be a template variable.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
TEMPLATE_KWARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_TEMPLATE_KWARGS = 32

ChatTemplateKwargs = Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_KWARGS)]


class TemplateControls(BaseModel):
    """How the messages are rendered: extra template variables (e.g. Qwen3's ``enable_thinking``,
    gpt-oss's ``reasoning_effort``), whether the assistant's turn is opened (``add_generation_prompt``)
    or the last assistant message is continued instead (``continue_final_message``, as vLLM and
    Hugging Face name it: the reply carries on from that text, e.g. a prefilled answer)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # schemas/openai.py's

    chat_template_kwargs: ChatTemplateKwargs | None = Field(
        None,
        description='Extra variables for the model\'s chat template, e.g. {"enable_thinking": false} '
        "(vLLM's, llama-server's and SGLang's name). JSON values; at most 32.",
    )
    add_generation_prompt: bool = Field(True, description="Open the assistant's turn after the messages.")
    continue_final_message: bool = Field(
        False,
        description="Continue the last (assistant) message instead of starting a new one; "
        "needs add_generation_prompt false.",
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _kwarg_names(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in value or {}:
            if not TEMPLATE_KWARG_NAME.fullmatch(key):
                raise ValueError(f"chat_template_kwargs keys must be identifiers, got {key[:40]!r}")
            if key in RESERVED_TEMPLATE_KWARGS:
                raise ValueError(f"chat_template_kwargs may not set {key!r}: it is the request's own")
        return value

    @model_validator(mode="after")
    def _continuation(self) -> TemplateControls:
        # APIError, not ValueError: a model validator's error would name no param.
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise APIError(
                    400,
                    "continue_final_message and add_generation_prompt cannot both be true; set "
                    "add_generation_prompt to false to continue the final message.",
                    param="continue_final_message",
                    code="invalid_value",
                )
            messages = getattr(self, "messages", None)
            if messages and getattr(messages[-1], "role", None) != "assistant":
                raise APIError(
                    400,
                    "continue_final_message needs the last message to be an assistant message.",
                    param="messages",
                    code="invalid_value",
                )
        return self
