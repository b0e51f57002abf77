"""Real `strokes` processes for tests: the API and workers on free ports, each with its output in a
log file (shown by the `procs` fixture when a test fails), their environment, and waiting on a
condition (never on a sleep)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from strokes.service.cli.serve import free_port
from strokes.service.queue import keys
from strokes.service.queue.client import connect_sync
from testkit.paths import ROOT, TESTS


class Proc:
    """A `strokes` subprocess with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strokes.service.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


# The local blob store shared by this session's API and worker processes (a test may name its own).
BLOB_DIR = Path(tempfile.mkdtemp(prefix="strokes-test-blobs-"))
atexit.register(shutil.rmtree, BLOB_DIR, ignore_errors=True)


def env_with(redis_url: str, **settings: object) -> dict[str, str]:
    """This process's environment without its STROKES_* variables, plus `settings` as STROKES_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STROKES_")}
    env.update({"STROKES_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    # tests/ on the path: a worker started with `--pipeline testkit.pipelines:NAME` imports it.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env["STROKES_BLOB_DIR"] = str(BLOB_DIR)
    # The test's redis-server may have just started: reclaim at once unless a test sets the grace.
    env["STROKES_RESTART_GRACE_S"] = "0"
    env.update({f"STROKES_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_api(redis_url: str, logdir: Path, **settings: object) -> tuple[Proc, str]:
    """A `strokes api` process on a free port, once /healthz answers: (the process, its base URL)."""
    port = free_port()
    proc = Proc(["api", "--port", str(port)], env_with(redis_url, **settings), logdir / f"api-{port}.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError("the API exited:\n" + proc.output())
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the API did not start:\n" + proc.output())


def launch_worker(
    redis_url: str,
    checkpoint: Path,
    logdir: Path,
    name: str,
    *,
    metrics_port: int | None = None,
    pipeline: str | None = None,
    **settings: object,
) -> Proc:
    """A `strokes worker` process on the CPU (not waited for: see wait_workers); `pipeline`: a
    testkit.pipelines factory (module:callable) instead of the model."""
    args = ["worker", "--checkpoint", str(checkpoint), "--device", "cpu", "--name", name]
    if metrics_port:
        args += ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
    if pipeline:
        args += ["--pipeline", pipeline]
    return Proc(args, env_with(redis_url, **settings), logdir / f"worker-{name}.log")


def wait_workers(redis_url: str, workers: dict[str, Proc], timeout: float = 60) -> None:
    """Until every worker heartbeats (the model is loaded and the loop runs). `redis_url` may be
    any address the service takes (a Sentinel's, a cluster's)."""
    client = connect_sync(redis_url, timeout_s=2, connect_timeout_s=1, retries=1)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for name, proc in workers.items():
                if not proc.alive():
                    raise RuntimeError(f"worker {name} exited:\n" + proc.output())
            try:
                if all(client.exists(keys.heartbeat(name)) for name in workers):
                    return
            except redis.RedisError:
                pass  # Redis starting, or a master being chosen: look again
            time.sleep(0.1)
    finally:
        client.close()
    raise RuntimeError("workers did not start:\n" + "\n".join(p.output() for p in workers.values()))


def start_worker(
    redis_url: str,
    checkpoint: Path,
    logdir: Path,
    name: str,
    *,
    metrics_port: int | None = None,
    **settings: object,
) -> Proc:
    proc = launch_worker(redis_url, checkpoint, logdir, name, metrics_port=metrics_port, **settings)
    wait_workers(redis_url, {name: proc})
    return proc


def wait_for(
    predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = ""
) -> object:
    """Poll `predicate` until it returns something true (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
