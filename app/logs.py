"""Log lines that say which request they belong to: the request context (a contextvar bound by
`app.http.middleware.RequestObserver`), and the formatters `python -m app` installs
(LOG_FORMAT): one JSON object per line, or uvicorn's text lines with the request id appended.
Access lines are `app.http.access_log`'s."""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import DefaultFormatter

LogFormat = Literal["json", "text"]

# RFC 9110 token characters, 1 to 128 of them: a client's id is echoed in a header and logged.
_REQUEST_ID = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")


@dataclass(slots=True)
class RequestContext:
    request_id: str
    model_version: str | None = None  # the bundle that answered, when one did


_current: ContextVar[RequestContext | None] = ContextVar("request", default=None)


def valid_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


def bind_request(request_id: str) -> RequestContext:
    """Makes `request_id` the current request's, for this task and those it starts. Never
    reset: each request runs in a task of its own, and the server's and the error handler's
    logs of a failed request come after the middleware has returned."""
    context = RequestContext(request_id)
    _current.set(context)
    return context


def unbind_request() -> None:
    """For work done on behalf of many requests (a micro-batch) in a task one of them started."""
    _current.set(None)


def current_request_id() -> str | None:
    context = _current.get()
    return context.request_id if context is not None else None


def note_model_version(version: str) -> None:
    """Names the bundle that answered the current request (its access line says it)."""
    context = _current.get()
    if context is not None:
        context.model_version = version


_clock: tuple[int, str] = (-1, "")


def timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds; strftime runs once a second (it costs more than the rest
    of an access line)."""
    global _clock
    second, millis = divmod(int(created * 1000), 1000)
    if second != _clock[0]:
        _clock = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_clock[1]}.{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "request_id", "msg"}` (+ `exc_info`, `stack_info`), the
    request id null outside a request. Access lines have the same head
    (`app.http.access_log.AccessLog`)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "request_id": current_request_id(),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(line, default=str).decode()
        except orjson.JSONEncodeError:  # a lone surrogate (an undecodable path, say): escaped
            return json.dumps(line, default=str)


class TextFormatter(DefaultFormatter):
    """uvicorn's text lines, plus `request_id=...` for those written inside a request."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = current_request_id()
        return f"{line} request_id={request_id}" if request_id is not None else line


def logging_config(log_format: LogFormat, level: str) -> dict[str, Any]:
    """uvicorn's logging config with the service's formatter on every line, the service's
    loggers (`app`, `app.access`) at `level`, and any other logger's warnings through the
    same handler (applied in every worker process)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        if log_format == "json":
            formatter.clear()
            formatter["()"] = f"{__name__}.JsonFormatter"
        else:
            formatter["()"] = f"{__name__}.TextFormatter"
            formatter["fmt"] = "%(levelprefix)s %(message)s"
    config["loggers"]["app"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    # Every other library's warnings (redis-py's cluster client, …) in the same format, not
    # through logging's last-resort handler as bare text.
    # Python's warnings too (`create_app` routes them to logging), at LOG_LEVEL when higher.
    root_level = max(logging.WARNING, logging.getLevelName(level.upper()))
    config["root"] = {"handlers": ["default"], "level": logging.getLevelName(root_level)}
    return config
