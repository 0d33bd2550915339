"""The base of every settings section: unknown keys are errors, booleans are booleans."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads "yes", "on", "1" and 1 as true: a typo must not switch TLS on or off.
        if (info.field_name is not None and cls.model_fields[info.field_name].annotation is bool
                and not isinstance(value, bool)):
            raise ValueError(f"must be true or false (a TOML boolean), not {value!r}")
        return value
