"""Daemon logging: text or JSON lines on stderr, each tagged with the request id it serves."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time

# The id of the request the current task serves; asyncio copies it into tasks it starts.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "casd_request_id", default=None
)
# A client's X-Request-ID is reused only when it is short and plain: it lands in log lines.
_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}\Z")

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")


def request_id(header: str | None) -> str:
    """The client's X-Request-ID when it is sane, else a fresh one."""
    if header and _SANE_ID.match(header):
        return header
    return secrets.token_hex(8)


class RequestIdFilter(logging.Filter):
    """Puts the current request id (or None) on every record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        rid = getattr(record, "request_id", None)
        if rid and not (fields and "request_id" in fields):
            line += f" request_id={rid}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, request_id, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if fields:
            out.update((k, v) for k, v in fields.items() if v is not None)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # ASCII only: a raw U+2028 or NEL in a name would split the line for some collectors.
        return json.dumps(out, default=str)


def default_format() -> str:
    """text for a person at a terminal, json for a log collector."""
    return "text" if sys.stderr.isatty() else "json"


def setup(fmt: str | None = None, level: str = "info") -> None:
    """Route every logger to stderr in `fmt` at `level` (replacing earlier configuration)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if (fmt or default_format()) == "json" else TextFormatter()
    )
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
