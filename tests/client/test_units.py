"""The Python client's pure parts: Retry-After, backoff, the event-stream parser, typed events.
(The client against the real service: tests/client/test_service.py.)"""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest
from strokes_client import _base
from strokes_client.events import (
    ImageProgress,
    JobPaused,
    JobResumed,
    SSEParser,
    StageCompleted,
    UnknownEvent,
    iter_raw,
    parse,
)
from strokes_client.models import Job, ParentRef, PauseInfo


def _reply(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=httpx.Request("POST", "http://x/v1/generations"))


def test_retry_after_reads_seconds_and_http_dates():
    assert _base.retry_after(_reply(429, **{"Retry-After": "3"})) == 3.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _base.retry_after(_reply(503, **{"Retry-After": later})) <= 30
    assert _base.retry_after(_reply(503, **{"Retry-After": "soon"})) is None
    assert _base.retry_after(_reply(503)) is None


def test_only_429_and_503_are_retried_and_within_the_limits():
    options = _base.Options(max_retries=2, backoff_s=0.5, max_backoff_s=1.0, max_retry_after_s=60)
    assert _base.should_retry(options, 1, _reply(429, **{"Retry-After": "2"})) == 2.0
    assert 0.25 <= _base.should_retry(options, 1, _reply(503)) <= 0.5
    assert 0.5 <= _base.should_retry(options, 2, _reply(503)) <= 1.0
    assert _base.should_retry(options, 3, _reply(503)) is None  # out of tries
    assert _base.should_retry(options, 1, _reply(500)) is None
    assert _base.should_retry(options, 1, _reply(429, **{"Retry-After": "600"})) is None  # too long
    for attempt in range(1, 10):
        assert _base.backoff(options, attempt) <= 1.0


def test_api_errors_carry_the_service_error_body():
    reply = httpx.Response(
        422,
        json={"error": {"type": "invalid_request", "message": "width: too big", "param": "width"}},
        request=httpx.Request("POST", "http://x/"),
    )
    error = _base.api_error(reply)
    assert (error.status, error.type, error.param) == (422, "invalid_request", "width")


def test_the_event_stream_parser_and_typed_events():
    lines = [
        ": stream open",
        "retry: 2000",
        "",
        "id: 1-0",
        "event: image.progress",
        'data: {"job_id": "gen_x", "attempt": 1, "iteration": 1, "stage": "draft", "step": 2,',
        'data:  "steps": 9, "preview": {"id": "p", "url": "/u", "width": 8, "height": 8}}',
        "",
        "event: some.future.event",
        'data: {"job_id": "gen_x", "attempt": 1, "new": true}',
        "",
    ]
    parser = SSEParser()
    raw = list(iter_raw(parser, lines))
    assert parser.retry_ms == 2000 and [r.id for r in raw] == ["1-0", "1-0"]  # ids persist
    progress = parse(raw[0].id, raw[0].name, raw[0].data)
    assert isinstance(progress, ImageProgress) and (progress.step, progress.steps) == (2, 9)
    assert progress.preview is not None and progress.preview.url == "/u" and not progress.terminal
    future = parse(raw[1].id, raw[1].name, raw[1].data)
    assert isinstance(future, UnknownEvent) and future.event == "some.future.event" and future.data["new"]
    done = parse("2-0", "stage.completed", '{"job_id": "gen_x", "attempt": 1, "stage": "plan", "extra": 1}')
    assert isinstance(done, StageCompleted) and done.stage == "plan" and done.image is None


def test_steering_events_and_the_paused_job():
    paused = parse(
        "3-0",
        "job.paused",
        '{"job_id": "gen_x", "attempt": 1, "iteration": 1, "stage": "plan", "text": "<ins>a</ins>",'
        ' "expires_at": 1796041958.272, "waiting_for": "continue or cancel"}',
    )
    assert isinstance(paused, JobPaused) and not paused.terminal
    assert (paused.iteration, paused.stage, paused.text, paused.expires_at) == (
        1,
        "plan",
        "<ins>a</ins>",
        1796041958.272,
    )
    resumed = parse(
        "4-0",
        "job.resumed",
        '{"job_id": "gen_x", "attempt": 1, "iteration": 1, "stage": "plan", "edited": true}',
    )
    assert isinstance(resumed, JobResumed) and resumed.edited and resumed.attempt == 1
    replayed = parse(
        "5-0", "stage.completed", '{"job_id": "gen_x", "attempt": 2, "stage": "plan", "inherited": true}'
    )
    assert isinstance(replayed, StageCompleted) and replayed.inherited

    view = {"id": "gen_y", "status": "paused", "created_at": 1.0, "attempt": 1, "request": {}}
    job = Job.from_json(
        {
            **view,
            "parent": {"job_id": "gen_x", "iteration": 1, "stage": "reflect"},
            "paused": {"iteration": 1, "stage": "plan", "text": "t", "expires_at": 9.5},
        }
    )
    assert job.is_paused and not job.done
    assert job.parent == ParentRef("gen_x", 1, "reflect") and job.paused == PauseInfo(1, "plan", "t", 9.5)
    assert Job.from_json({**view, "status": "queued"}).parent is None
    # wait() returns a paused job unless it waits through pauses, and always an ended one
    assert _base.wait_is_over(job, through_pauses=False) and not _base.wait_is_over(job, through_pauses=True)
    assert _base.wait_is_over(Job.from_json({**view, "status": "canceled"}), through_pauses=True)


def test_fork_requests_need_no_prompt():
    fork = _base.fork_spec("gen_x", iteration=1, stage="plan", text=None)
    assert fork == {"job_id": "gen_x", "iteration": 1, "stage": "plan"}
    body = _base.generation_body(None, {"fork": fork, "pause_after": ["reflect"], "width": None})
    assert body == {"fork": fork, "pause_after": ["reflect"]}
    assert _base.fork_spec("gen_x", instruction="green") == {"job_id": "gen_x", "instruction": "green"}
    with pytest.raises(TypeError, match="prompt"):
        _base.generation_body(None, {"width": 64})
    assert _base.continue_body(None) == {} and _base.continue_body("x") == {"text": "x"}
