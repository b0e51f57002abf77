"""The test harness itself: private redis-server, clean database per test, CLI entry point."""

import subprocess
import sys

import redis
from testkit.paths import ROOT


def test_private_redis_server_answers(redis_url):
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    client.set("k", "v")
    assert client.get("k") == b"v"


def test_each_test_gets_a_clean_database(redis_url):
    client = redis.Redis.from_url(redis_url)
    assert client.get("k") is None


def test_private_redis_is_not_the_system_one(redis_server):
    assert redis_server.port != 6379


def test_strokes_command_prints_its_version():
    out = subprocess.run(
        [sys.executable, "-m", "strokes.service.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("strokes ")


def test_ruff_is_clean():
    """`make lint` passes: the suite fails when code lands unlinted or unformatted."""
    root = ROOT
    ruff = [sys.executable, "-m", "ruff"]
    check = subprocess.run([*ruff, "check", "."], cwd=root, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    fmt = subprocess.run([*ruff, "format", "--check", "."], cwd=root, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout
