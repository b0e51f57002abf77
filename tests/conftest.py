"""Fixtures of the whole suite: a private redis-server per session and a clean database per test,
the service's settings and job store on it, Sentinel and Cluster topologies on loopback, a tiny
checkpoint, processes a test starts (stopped at teardown), an S3 server on loopback; and the `gpu`
marker's skip.

Helpers that are not fixtures live in the importable package tests/testkit (pytest's `pythonpath`).
No test reads /work/shared: golden data lives in tests/fixtures.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from testkit.processes import Proc
from testkit.redis_ha import ClusterRedis, SentinelRedis
from testkit.s3 import S3_BUCKET

from strokes.service.cli.serve import PrivateRedis
from strokes.service.queue.client import connect
from strokes.service.queue.store import Store
from strokes.service.shared.settings import Settings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[PrivateRedis]:
    """The same private redis-server `strokes serve` starts (AOF every second, no eviction)."""
    if shutil.which("redis-server") is None:
        pytest.exit("redis-server is not installed: run `make test`, which installs it", returncode=2)
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: PrivateRedis) -> Iterator[str]:
    """A clean database on the session's redis-server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    yield redis_server.url


@pytest.fixture
def private_redis(redis_server: PrivateRedis, tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test alone (same class as the session's), for tests that stop it."""
    server = type(redis_server)(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sentinel_redis(request, tmp_path: Path) -> Iterator[SentinelRedis]:
    """A master, a replica and Sentinels on loopback (testkit.redis_ha), this test's alone. Three
    Sentinels unless the test says otherwise: `@pytest.mark.parametrize("sentinel_redis", [1],
    indirect=True)`."""
    topology = SentinelRedis(tmp_path / "ha", sentinels=getattr(request, "param", 3))
    try:
        yield topology.start()
    finally:
        topology.stop()


@pytest.fixture
def replicated_redis(tmp_path: Path) -> Iterator[SentinelRedis]:
    """A master and one replica, linked, without Sentinels (testkit.redis_ha), this test's alone."""
    topology = SentinelRedis(tmp_path / "replicated", sentinels=0)
    try:
        yield topology.start()
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def cluster_redis(tmp_path_factory) -> Iterator[ClusterRedis]:
    """A three-node Redis Cluster on loopback (testkit.redis_ha), shared by the session's tests."""
    cluster = ClusterRedis(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


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
    """A tiny random checkpoint written by the project's generator (`strokes make-tiny`)."""
    from strokes.model.testing.tiny import make_tiny

    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    make_tiny(folder, seed=0)
    return folder


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test started; stopped at teardown."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
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


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
