"""structlog set-up for entry points (CLI, scripts, applications). The library never calls this at import."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(json_lines: bool | None = None, level: int = logging.INFO) -> None:
    """Readable console output on a terminal; JSON lines otherwise or when `json_lines` is true."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Resolve sys.stderr at each use, not now: it may be replaced (pytest's capture, daemonisation).
        logger_factory=lambda *args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
