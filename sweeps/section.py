"""The base of every section of a sweep file (`sweeps.spec`): unknown keys are errors, values are
frozen, and a YAML boolean is never read as a number (`seq_len: true` would pass as 1)."""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data):
        for key, value in (data.items() if isinstance(data, dict) else ()):
            values = value if isinstance(value, (list, tuple)) else [value]
            field = cls.model_fields.get(key)
            if field is not None and any(isinstance(v, bool) for v in values) and _takes_numbers(field.annotation):
                raise ValueError(f"{key} is {json.dumps(value)}, a boolean; allowed: a number")
        return data


def _takes_numbers(annotation) -> bool:
    return annotation in (int, float) or any(_takes_numbers(a) for a in typing.get_args(annotation))
