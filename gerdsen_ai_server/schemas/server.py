"""Wire format of GET /api/config: the settings in force, read-only, secrets masked."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ConfigEntry(BaseModel):
    name: str = Field(description="Settings field name.")
    env: str = Field(description="The environment variable that sets it.")
    value: Any = Field(description="The value in force; a secret shows only whether it is set.")
    secret: bool = False
    description: str | None = None


class ConfigList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ConfigEntry]
    version: str = Field(description="The server's version: the package's, as /health and `impetus --version` give it.")
