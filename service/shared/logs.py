"""Structured JSON logs: one object per line, with job_id, attempt and stage on every line.

`job_context(...)` binds a job to everything logged inside it (the worker's loop, the pipeline
thread, an API request); `set_stage` moves the stage along. Prompt text stays out of INFO logs
unless STROKES_LOG_PROMPTS is set: `prompt_for_log` gives its length and a short hash instead.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("strokes_log", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str = "strokes"):
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        ctx = _context.get() or {}
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": self.process_name,
            "msg": record.getMessage(),
            "job_id": ctx.get("job_id"),
            "attempt": ctx.get("attempt"),
            "stage": ctx.get("stage"),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: str = "INFO", process_name: str = "strokes") -> None:
    """JSON lines on stderr for our loggers and uvicorn's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def uvicorn_log_config() -> dict[str, Any]:
    """Leave uvicorn's loggers to propagate to our root handler (no dictConfig of its own)."""
    return {"version": 1, "disable_existing_loggers": False}


@contextmanager
def job_context(job_id: str | None, attempt: int | None = None, stage: str | None = None) -> Iterator[dict]:
    ctx = {"job_id": job_id, "attempt": attempt, "stage": stage}
    token = _context.set(ctx)
    try:
        yield ctx
    finally:
        _context.reset(token)


def set_stage(stage: str | None) -> None:
    # Mutates the dict shared by every context copied from the job's (the pipeline thread too).
    ctx = _context.get()
    if ctx is not None:
        ctx["stage"] = stage


def prompt_for_log(prompt: str, include_text: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_chars": len(prompt),
        "prompt_sha": hashlib.sha256(prompt.encode()).hexdigest()[:12],
    }
    if include_text:
        out["prompt"] = prompt
    return out
