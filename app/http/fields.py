"""Typed fields the request models share (`app.http.schemas`, `app.http.filter_schema`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

MAX_ID_LENGTH = 256
MAX_STRING_VALUE = 256
# No control characters: ids become Redis keys and log lines.
ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"

ExternalId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)
]
# A feature's or an item attribute's name.
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]
