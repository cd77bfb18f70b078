"""What every section of the sweep file is made of: `Section` (frozen, unknown keys forbidden, a
YAML boolean never read as a number: `seq_len: true` would pass as 1), `PosInt`, and
`check_source` (a source-string check as a pydantic validator)."""

from __future__ import annotations

import json
import typing
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compression.errors import UserInputError
from trainables import sources


def check_source(source: str, kind: str) -> str:
    """`trainables.sources.check_source` as a pydantic validator (a ValueError names the field)."""
    try:
        return sources.check_source(source, kind)
    except UserInputError as e:
        raise ValueError(str(e)) from None


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


PosInt = Annotated[int, Field(ge=1)]
