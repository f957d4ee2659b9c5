"""structlog set-up: JSON lines in production, readable lines on a terminal.

Every line carries the service name and, inside a span, its ``trace_id`` and
``span_id``, so logs join traces. Standard-library loggers (aiokafka, uvicorn)
go through the same renderer.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

from shared.pii.log_processor import PiiLogProcessor
from shared.pii.settings import TenantPiiSettings
from shared.settings import LogFormat


def _add_trace_ids(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


_CREDENTIAL = re.compile(
    r"(?P<key>mk-[0-9a-f]{12}-)[A-Za-z0-9_-]{32}|(?P<scheme>[Bb]earer\s+)[A-Za-z0-9._~+/=-]{8,}"
)


def _hide(value: Any) -> Any:
    if isinstance(value, str):
        return _CREDENTIAL.sub(lambda m: (m["key"] or m["scheme"]) + "[REDACTED]", value)
    if isinstance(value, dict):
        return {key: _hide(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_hide(item) for item in value]
    return value


def _scrub_credentials(_: Any, __: str, event: MutableMapping[str, Any]) -> Any:
    """API keys (``mk-<id>-<secret>``: the id stays) and bearer tokens never reach a log."""
    for key, value in event.items():
        event[key] = _hide(value)
    return event


def configure_logging(
    service: str,
    level: str = "INFO",
    log_format: LogFormat = LogFormat.AUTO,
    pii: TenantPiiSettings | None = None,
) -> None:
    """Route structlog and stdlib logging to stderr in one format.

    Every line, structlog's and the standard library's alike, passes the PII filter of
    its tenant's ``logs`` policy (``pii``; default: mask) before it is written.
    """
    use_json = log_format is LogFormat.JSON or (
        log_format is LogFormat.AUTO and not sys.stderr.isatty()
    )
    shared_processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
        lambda _, __, event: {"service": service, **event},
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared_processors,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else lambda _, __, e: e,
            PiiLogProcessor(pii),
            _scrub_credentials,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty at INFO (aiokafka: group chatter; httpx: a line per request); warnings still show.
    for chatty in ("aiokafka", "httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
