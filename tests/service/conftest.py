"""Fixtures of the service tests: settings and a store on the session's redis-server, a tiny
checkpoint, private redis-servers for tests that stop Redis, and process cleanup."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from svc_testkit import S3_BUCKET, Proc

from strokes.service.queue.client import connect
from strokes.service.queue.store import Store
from strokes.service.shared.settings import Settings


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    # restart_grace_s=0: the session's redis-server has just started; reclaim may act at once.
    return Settings(
        redis_url=redis_url,
        queue_cap=50,
        mean_job_seconds=7.0,
        restart_grace_s=0,
        blob_dir=tmp_path / "blobs",
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    client = connect(settings.redis_url, timeout_s=5, connect_timeout_s=1)
    store = Store(client, settings)
    await store.ensure_group()
    yield store
    await store.close()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from strokes.model.testing.tiny import make_tiny

    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    make_tiny(folder, seed=0)
    return folder


@pytest.fixture
def private_redis(redis_server, tmp_path):
    """A redis-server of this test alone (same class as the session's), for tests that stop it."""
    server = type(redis_server)(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def procs(tmp_path) -> Iterator[list[Proc]]:
    """Processes a test started; stopped (and their logs shown on failure) at teardown."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
def logdir(tmp_path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible HTTP server on loopback (moto's server mode; no MinIO binary here),
    with the bucket S3_BUCKET. Yields its endpoint URL; tests keep apart by key prefix."""
    import botocore.session
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    client.create_bucket(Bucket=S3_BUCKET)
    client.close()
    yield url
    server.stop()
