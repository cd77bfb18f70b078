"""What every section of the sweep file is made of: `Section` (frozen, unknown keys forbidden),
`PosInt`, and `check_source` (a source-string check as a pydantic validator)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

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


PosInt = Annotated[int, Field(ge=1)]
