"""A request's speculative decoding: vLLM's ``speculative_config`` names (prompt lookup "ngram", "draft_model")."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SPECULATIVE_TOKENS = 16


class SpeculativeConfig(BaseModel):
    """vLLM's ``speculative_config`` (``method``, ``model``, ``num_speculative_tokens``, ``prompt_lookup_max``,
    ``prompt_lookup_min``), taken per request here (vLLM sets it per server; our server default is
    IMPETUS_SPECULATIVE, and IMPETUS_DRAFT_MODEL the draft model). ``method: "none"`` turns the server
    default off for one request. It never changes the answer: greedy output is the plain decoding's,
    sampled output keeps its distribution."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # openai.py's REQUEST_CONFIG

    method: Literal["ngram", "draft_model", "none"] = Field(
        description='"ngram": prompt lookup drafts; "draft_model": a small model drafts; "none": plain decoding.'
    )
    model: str | None = Field(
        None, min_length=1, max_length=256, description="draft_model: the draft model (null: IMPETUS_DRAFT_MODEL)."
    )
    num_speculative_tokens: int = Field(5, ge=1, le=MAX_SPECULATIVE_TOKENS, description="Tokens drafted a step.")
    prompt_lookup_max: int = Field(3, ge=1, le=16, description="The longest context tail looked up earlier.")
    prompt_lookup_min: int = Field(2, ge=1, le=16, description="The shortest context tail looked up earlier.")

    @model_validator(mode="after")
    def _lookup_range(self) -> SpeculativeConfig:
        if self.model is not None and self.method != "draft_model":
            raise ValueError('model names the draft model of method "draft_model" only')
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed prompt_lookup_max ({self.prompt_lookup_max})"
            )
        return self


def parse_setting(value: str) -> SpeculativeConfig | None:
    """IMPETUS_SPECULATIVE: "" or "off" (none), "ngram[:K]" or "draft_model[:K]" (K tokens drafted a step)."""
    value = value.strip()
    if value in ("", "off", "none"):
        return None
    method, _, count = value.partition(":")
    if method not in ("ngram", "draft_model") or (count and not count.isdigit()):
        raise ValueError(f'speculative must be "off", "ngram[:K]" or "draft_model[:K]", not {value!r}')
    return SpeculativeConfig.model_validate({"method": method, "num_speculative_tokens": int(count) if count else 5})
