"""What the sync and async clients share: options, request building, retry policy, errors.

Retries: 429 (queue full) and 503 (store unreachable, too many streams) are retried, and so are
connection failures; the wait is the server's Retry-After when it sends one (seconds or an HTTP
date), else exponential backoff with full jitter, capped. A POST carries an Idempotency-Key that
stays the same across its retries, so a retry after a lost reply never makes a second job.
"""

from __future__ import annotations

import email.utils
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from strokes_client.models import APIError, GenerationFailed, Job

RETRY_STATUSES = frozenset({429, 503})
USER_AGENT = "strokes-client-python/0.1"


@dataclass(frozen=True)
class Options:
    """Client options. `max_retries`: tries after the first on 429/503/connection errors, and
    reconnects in a row (without a new event) of an event stream."""

    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    timeout_s: float = 30.0
    max_retries: int = 5
    backoff_s: float = 0.5  # first backoff; doubles per try
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0  # a longer Retry-After fails the call instead of waiting

    def headers(self) -> dict[str, str]:
        out = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.api_key:
            out["Authorization"] = f"Bearer {self.api_key}"
        return out


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff(options: Options, attempt: int, hint: float | None = None) -> float:
    """Seconds to wait before try `attempt` (1-based): the server's hint, else jittered backoff."""
    if hint is not None:
        return hint
    cap = min(options.max_backoff_s, options.backoff_s * 2 ** (attempt - 1))
    return random.uniform(cap / 2, cap)


def api_error(response: httpx.Response) -> APIError:
    try:
        body = response.json()
        error = body["error"]
        kind, message, param = error["type"], error["message"], error.get("param")
    except (ValueError, KeyError, TypeError):
        kind, message, param = "http_error", response.text[:200] or response.reason_phrase, None
    return APIError(response.status_code, kind, message, param, retry_after(response))


def should_retry(options: Options, attempt: int, response: httpx.Response) -> float | None:
    """Seconds to wait before retrying this response, or None to give up (or when it is fine)."""
    if response.status_code not in RETRY_STATUSES or attempt > options.max_retries:
        return None
    hint = retry_after(response)
    if hint is not None and hint > options.max_retry_after_s:
        return None
    return backoff(options, attempt, hint)


def generation_body(request: dict[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any]:
    body = dict(request or {})
    body.update({k: v for k, v in fields.items() if v is not None})
    if "prompt" not in body and "fork" not in body:
        raise TypeError("a generation needs a prompt (or a fork)")
    return body


def fork_spec(job_id: str, **point: Any) -> dict[str, Any]:
    """The request's `fork` object: the parent and either a stage (with an optional new text) or
    a follow-up instruction (docs/steering.md)."""
    return {"job_id": job_id, **{k: v for k, v in point.items() if v is not None}}


def continue_body(text: str | None) -> dict[str, Any]:
    return {} if text is None else {"text": text}


def wait_is_over(job: Job, through_pauses: bool) -> bool:
    """`wait` returns a job that ended, and one that is paused (it makes no progress until its
    owner resumes or cancels it) unless told to wait through pauses."""
    return job.done or (job.is_paused and not through_pauses)


def create_headers(idempotency_key: str | None, wait_s: float | None) -> dict[str, str]:
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    if wait_s is not None:
        headers["Prefer"] = f"wait={int(wait_s)}"
    return headers


def image_path(job_id: str, image: Any) -> str:
    """`image` is an ImageRef, an image id, or a URL path the service gave."""
    url = getattr(image, "url", None) or str(image)
    if url.startswith("/"):
        return url
    return f"/v1/generations/{job_id}/images/{url}"


def list_params(status: str | None, limit: int, after: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if after:
        params["after"] = after
    return params


def finished(job: Job, raise_on_failure: bool) -> Job:
    """What `wait` returns: the job, or GenerationFailed when asked and it ended unsucceeded."""
    if raise_on_failure and job.done and job.status != "succeeded":
        raise GenerationFailed(job)
    return job
