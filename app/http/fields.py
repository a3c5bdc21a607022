"""Typed fields the request models share (`app.http.schemas`, `app.http.filter_schema`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints
from starlette.convertors import Convertor, register_url_convertor

MAX_ID_LENGTH = 256
MAX_STRING_VALUE = 256
# No control characters: ids become Redis keys and log lines.
ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"

ExternalId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)
]
# A feature's or an item attribute's name.
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]


class PathIdConvertor(Convertor[str]):
    """An id in a path, `/{item_id:id}`: any characters, as a body's ids. Starlette matches
    the decoded path, so its default parameter stops at a `/` (`sku%2F123`: 404) and `:path`
    at a newline (404 where the id's pattern answers 422)."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("id", PathIdConvertor())
