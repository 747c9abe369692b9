"""Wire format of presets (/api/presets, `impetus preset`, `<models_dir>/presets/<name>.json|toml`).

A preset is a named way to serve a model, after Ollama's Modelfile (``FROM`` = ``model``,
``PARAMETER`` = ``parameters``, ``SYSTEM`` = ``system``, ``TEMPLATE`` = ``chat_template``),
llama-server's ``--alias`` (the name a client asks for) and LM Studio's load presets (context length,
RoPE scaling, backend: how the model is loaded). Request defaults never beat a request's own
values; load options make the preset its own resident (serving/presets.py says how).
Strict like the request schemas: an unknown field is a 400 naming it, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from gerdsen_ai_server.schemas.chat import ChatTemplateKwargs, TemplateControls
from gerdsen_ai_server.schemas.openai import MAX_STOP_SEQUENCES, REQUEST_CONFIG
from gerdsen_ai_server.schemas.speculative import SpeculativeConfig

PRESET_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_TEMPLATE_CHARS = 256 * 1024  # a chat template (Jinja) or a system prompt: larger is not a template
MAX_CONTEXT_LENGTH = 1 << 24  # tokens; the model's own bound is checked when it loads
BACKEND = Literal["auto", "mlx", "llamacpp"]

PresetName = Annotated[
    str, Field(pattern=PRESET_NAME, description="Letters, digits, `.`, `_`, `-`; 1-64; starts with a letter or digit.")
]


class PresetParameters(BaseModel):
    """Request defaults (Ollama's ``PARAMETER`` lines), with the bounds of the request fields they fill."""

    model_config = REQUEST_CONFIG

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    speculative_config: SpeculativeConfig | None = None  # speculative decoding for the preset's model


class Preset(BaseModel):
    """One preset: what it serves, its request defaults and its load options."""

    model_config = REQUEST_CONFIG

    name: PresetName
    model: str = Field(
        min_length=1,
        max_length=256,
        description="The model it serves: a model id in the models dir (confined like a request's `model`).",
    )
    description: str = Field("", max_length=1024)
    parameters: PresetParameters = Field(
        default_factory=PresetParameters, description="Request defaults; a request's own values always win."
    )
    system: str | None = Field(
        None, max_length=MAX_TEMPLATE_CHARS, description="A system message put first when a request has none."
    )
    chat_template: str | None = Field(
        None,
        max_length=MAX_TEMPLATE_CHARS,
        description="Jinja text replacing the model's chat template (a load option).",
    )
    chat_template_kwargs: ChatTemplateKwargs | None = Field(
        None, description='Template variables, merged under a request\'s own (e.g. {"enable_thinking": false}).'
    )
    context_length: int | None = Field(
        None, ge=0, le=MAX_CONTEXT_LENGTH, description="Tokens (a load option); 0 or null: the server's default."
    )
    rope_scaling: bool = Field(False, description="Allow a context beyond the trained one by RoPE scaling (load).")
    keep_alive: float | None = Field(
        None, description="Idle seconds it stays loaded; negative keeps it; null: IMPETUS_KEEP_ALIVE."
    )
    backend: BACKEND | None = Field(None, description="auto | mlx | llamacpp (a load option); null: IMPETUS_BACKEND.")
    adapter: str | None = Field(
        None, min_length=1, max_length=256, description="A LoRA adapter in the models dir (a load option)."
    )
    kv_bits: Literal[0, 4, 8] | None = Field(
        None,
        description="KV cache quantization bits, 0 | 8 | 4 (a load option); null: IMPETUS_KV_BITS.",
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """The request's own rules for these names (schemas/chat.py), so a preset cannot set one a request may not."""
        if value is not None:
            try:
                TemplateControls.model_validate({"chat_template_kwargs": value})
            except ValidationError as exc:
                raise ValueError(exc.errors()[0]["msg"]) from None
        return value

    def has_load_options(self) -> bool:
        """Whether it loads the model differently from the server's defaults: then it is its own resident."""
        return bool(
            self.context_length
            or self.rope_scaling
            or self.chat_template is not None
            or self.backend
            or self.adapter
            or self.kv_bits is not None
        )


class PresetList(BaseModel):
    presets: list[Preset]


class PresetDeleted(BaseModel):
    name: str
    deleted: Literal[True] = True
