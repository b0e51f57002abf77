"""Schemathesis against openapi.yaml and a live API process: generated valid and invalid requests
to every operation; no input may produce a 5xx, and responses must match the document."""

from __future__ import annotations

import time

import hypothesis
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis import GenerationMode
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import positive_data_acceptance
from testkit.processes import start_api

from strokes.service.api.app import OPENAPI_PATH
from strokes.service.queue import keys

SCHEMA = schemathesis.openapi.from_path(OPENAPI_PATH)
KEY = "fuzz-key"
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.fixture(scope="module")
def live_api(redis_server, tmp_path_factory):
    # No worker: jobs stay queued, and a small queue cap makes the 429 path reachable too.
    # With API keys on, schemathesis also checks that bad credentials are refused (401).
    client = redis.Redis.from_url(redis_server.url)
    client.zadd(keys.WORKERS, {"fuzz-worker": time.time() * 1000 + 86_400_000})  # "alive": /readyz is 200
    client.close()
    proc, base = start_api(
        redis_server.url, tmp_path_factory.mktemp("fuzz"), queue_cap=20, max_body_bytes=200_000, api_keys=KEY
    )
    yield base
    proc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: f"{op.method.upper()} {op.path}")
def test_no_generated_request_gets_a_5xx_or_breaks_the_schema(live_api, operation, mode):
    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        # We send the Authorization header ourselves: a case made negative only by leaving it out
        # is a valid request, and on the OpenAI routes a valid request waits for a worker.
        hypothesis.assume(not waits or case.meta.is_negative_at(ParameterLocation.BODY))
        case.call_and_validate(
            base_url=live_api,
            timeout=30,  # generous: a loaded 2-core machine once took >10 s to answer one
            headers={"Authorization": f"Bearer {KEY}"},
            excluded_checks=excluded,
        )

    # A job request also has rules no JSON schema states (input_image must decode to an allowed
    # image; a prompt must not be blank or hold control-token strings): a schema-valid POST may
    # rightly get a 422, so that one check is off for it. Every other check stays on.
    # The same holds for a continue's replacement text (not blank, no control-token strings).
    rules = ("/v1/generations", "/v1/generations/{job_id}/continue")
    excluded = [positive_data_acceptance] if operation.path in rules else []
    # The OpenAI-compatible routes answer when their jobs end, and no worker runs here: a valid
    # request would wait for its bound. Their invalid requests are fuzzed; the valid ones run in
    # test_openai_images.py against a worker.
    waits = operation.path.startswith("/v1/images/")
    if waits and mode == GenerationMode.POSITIVE:
        pytest.skip("a valid request waits for a worker (tests/service/api/test_openai_images.py)")

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        if mode != GenerationMode.NEGATIVE:
            raise
        pytest.skip("the operation has no input to make invalid")
