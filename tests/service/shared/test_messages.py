"""The job message: a request crosses the queue once, typed and versioned (service/shared/messages.py).
What the API writes the worker reads back as it was; a message of another version, or with a field
it does not know, is refused rather than misread."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from strokes.service.api.schemas import GenerationRequest
from strokes.service.shared.messages import MESSAGE_VERSION, ForkRequest, JobMessage, UnknownVersion

REQUEST = {
    "prompt": "a red cube",
    "width": 64,
    "height": 96,
    "max_iterations": 2,
    "draft": {"steps": 6},
    "plan": {"max_tokens": 8, "do_sample": True, "temperature": 1.0},
    "seed": 7,
    "pause_after": ["plan"],
}


def test_a_request_crosses_the_queue_as_it_was_written():
    message = GenerationRequest(**REQUEST).job_message()
    raw = message.to_json()
    assert json.loads(raw)["version"] == MESSAGE_VERSION == 1
    again = JobMessage.from_json(raw)
    assert again == message
    params = again.to_params()
    assert (params.width, params.height, params.seed, params.draft.steps) == (64, 96, 7, 6)
    assert params.plan.do_sample and again.pause_after == ["plan"]


def test_the_input_image_crosses_as_a_flag_never_as_bytes():
    upload = "iVBORw0KGgo" + "A" * 64  # whatever the bytes: the message only says there is one
    message = GenerationRequest(**REQUEST, input_image=upload).job_message()
    assert message.input_image is True and upload not in message.to_json()


def test_a_message_of_another_version_is_refused():
    raw = json.dumps({**json.loads(GenerationRequest(**REQUEST).job_message().to_json()), "version": 2})
    with pytest.raises(UnknownVersion, match="version 2"):
        JobMessage.from_json(raw)


def test_a_message_with_a_field_it_does_not_know_is_refused():
    raw = json.dumps({**json.loads(GenerationRequest(**REQUEST).job_message().to_json()), "colour": "red"})
    with pytest.raises(ValidationError, match="colour"):
        JobMessage.from_json(raw)


def test_a_fork_point_is_stored_as_the_caller_gave_it():
    at_stage = ForkRequest(job_id="gen_a", iteration=1, stage="reflect")
    follow_up = ForkRequest(job_id="gen_a", instruction="make it green")
    assert json.loads(at_stage.model_dump_json()) == {"job_id": "gen_a", "iteration": 1, "stage": "reflect"}
    assert follow_up.model_dump() == {"job_id": "gen_a", "instruction": "make it green"}
    message = JobMessage(prompt="x", fork=follow_up)
    assert JobMessage.from_json(message.to_json()).fork == follow_up
