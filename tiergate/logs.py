"""Logging set up once per process: plain or JSON lines on stderr, warnings captured, a request id on every record."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import logging.config
import sys
from collections.abc import Mapping
from typing import Any, TextIO

LOG_FORMATS = ("plain", "json")
LOG_FORMAT_ENV = "TIERGATE_LOG_FORMAT"
LOG_LEVEL_ENV = "TIERGATE_LOG_LEVEL"
NO_REQUEST_ID = "-"

# Set by the servers for the duration of one request; asyncio copies the context into each task,
# so every record logged on a request's behalf carries its id without being passed it.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("tiergate_request_id", default=NO_REQUEST_ID)

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id (``-`` outside a request); never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # an id passed in `extra=` wins
            record.request_id = REQUEST_ID.get()
        return True


def _request_id(record: logging.LogRecord) -> str:
    # Handlers configured elsewhere (or a redirect that copies none of the filters) may skip the filter.
    return str(getattr(record, "request_id", None) or REQUEST_ID.get())


class PlainFormatter(logging.Formatter):
    """``time LEVEL logger [request-id]: message``; the bracket only inside a request, to keep lines short."""

    def __init__(self, fmt: str = PLAIN_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        request_id = _request_id(record)
        record.request_tag = "" if request_id == NO_REQUEST_ID else f" [{request_id}]"
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, and exception or
    stack text when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": _request_id(record),
        }
        if record.exc_info:
            # Formatter caches the text on the record, so other handlers need not format it again.
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def logging_config(
    level: str | int = "INFO",
    log_format: str = "plain",
    *,
    stream: TextIO | None = None,
    levels: Mapping[str, str | int] | None = None,
) -> dict[str, Any]:
    """The ``dictConfig`` dictionary: one stderr handler (or `stream`) on the root logger, with the request id
    filter and the chosen format; `levels` sets named loggers' levels (e.g. quieter libraries)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; expected one of {', '.join(LOG_FORMATS)}")
    return {
        "version": 1,
        # Module loggers are created at import time, before main() configures anything; keep them working.
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"plain": {"()": PlainFormatter}, "json": {"()": JsonFormatter}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "stream": stream if stream is not None else "ext://sys.stderr",
                "formatter": log_format,
                "filters": ["request_id"],
            }
        },
        "loggers": {name: {"level": _level(value)} for name, value in (levels or {}).items()},
        "root": {"level": _level(level), "handlers": ["console"]},
    }


def _level(value: str | int) -> str | int:
    if isinstance(value, int):
        return value
    if value.upper() not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {value!r}; expected one of debug, info, warning, error, critical")
    return value.upper()


def configure_logging(
    level: str | int = "INFO",
    log_format: str = "plain",
    *,
    stream: TextIO | None = None,
    levels: Mapping[str, str | int] | None = None,
) -> None:
    """Configure the process's logging; call once, from the entry point. Python warnings are logged too
    (logger ``py.warnings``), so they share the format and can be filtered by level."""
    logging.config.dictConfig(logging_config(level, log_format, stream=stream, levels=levels))
    logging.captureWarnings(True)


def show_progress(requested: bool = True, stream: TextIO | None = None) -> bool:
    """Whether to draw a progress bar: only when asked for and stderr (or `stream`) is a terminal, so bars
    never end up in log files, CI output or a captured subprocess's output."""
    target = stream if stream is not None else sys.stderr
    return requested and target is not None and target.isatty()
