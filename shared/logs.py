"""structlog set-up: key=value lines (or JSON) on stderr, level from settings.

Call `configure_logging` once per process; get loggers with `get_logger(service)`.
Log events are constant snake_case strings with the variable parts as fields.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info", json: bool = False) -> None:
    renderer = structlog.processors.JSONRenderer() if json else structlog.processors.KeyValueRenderer(
        key_order=["timestamp", "level", "service", "event"], drop_missing=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: structlog.PrintLogger(file=sys.stderr),  # current stderr, not import-time
        cache_logger_on_first_use=False,
    )


def get_logger(service: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(service=service)  # lazy: honours configure_logging called later
