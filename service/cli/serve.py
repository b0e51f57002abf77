"""`strokes serve`: the whole service on one machine: the API, one worker, the webhook dispatcher
(when STROKES_WEBHOOK_SECRET is set), and (when no Redis URL is given) a private redis-server with
AOF on, in a temporary folder.

Images go to the local-directory blob store (service/blobs/store.py): with the private Redis, in the
same temporary folder (both go at exit); otherwise where STROKES_BLOB_DIR (or
STROKES_BLOB_BACKEND=s3) says.

The worker runs as a child process (it holds the model; the API process must not import torch);
the API runs in this process under uvicorn. Ctrl-C or SIGTERM stops all three: the worker hands
back its running job first.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from strokes.model.spec.sizing import checkpoint_input_resize


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server child on a free loopback port, AOF every second, no eviction."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit(
                "redis-server is not installed (apt-get install redis-server), or pass --redis-url"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",  # no RDB snapshots: the AOF below is the durability
            "appendonly": "yes",
            "appendfsync": "everysec",
            "dir": str(self.folder),
            "maxmemory-policy": "noeviction",
        }
        cmd = [exe] + [arg for name, value in options.items() for arg in (f"--{name}", value)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def stop_child(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _exit_now(signum, frame) -> None:
    raise SystemExit(0)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if `strokes serve` dies without cleaning up (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _exit_with(worker: subprocess.Popen, stopping: threading.Event, what: str = "worker") -> None:
    """A child that is half of the service (the webhook dispatcher): if it dies, stop the API too."""
    code = worker.wait()
    if code != 0 and not stopping.is_set():
        print(f"strokes serve: the {what} exited with {code}; stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)


EXIT_CANNOT_LOAD = 2  # the worker's status when the checkpoint or device is unusable
MAX_RESTARTS = 5  # worker restarts within RESTART_WINDOW_S before `strokes serve` gives up
RESTART_WINDOW_S = 60.0


class WorkerSupervisor:
    """Runs the worker child and restarts it when it dies (a fatal device error exits 3, a hung
    job exits after its progress lease, kill -9): `strokes serve` outlives failing jobs. A worker
    that cannot load its model (exit 2), or that dies too often, stops the API too."""

    def __init__(self, cmd: list[str], env: dict[str, str], stopping: threading.Event):
        self.cmd, self.env, self.stopping = cmd, env, stopping
        self.proc = self._spawn()
        self.code: int | None = None  # set when the supervisor gave up

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.cmd, env=self.env, preexec_fn=_die_with_parent)

    def watch(self) -> None:
        restarts: list[float] = []
        while True:
            code = self.proc.wait()
            if self.stopping.is_set():
                return
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
            if code == EXIT_CANNOT_LOAD or len(restarts) >= MAX_RESTARTS:
                self.code = code or 1
                print(f"strokes serve: the worker exited with {code}; stopping", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            print(f"strokes serve: the worker exited with {code}; restarting it", file=sys.stderr, flush=True)
            restarts.append(now)
            self.proc = self._spawn()


def run_serve(args) -> int:
    from strokes.service.api.app import create_app
    from strokes.service.cli.main import port_in_use
    from strokes.service.shared import logs
    from strokes.service.shared.settings import Settings

    for port in (args.port, args.worker_metrics_port):
        problem = port and port_in_use(args.host if port == args.port else "0.0.0.0", port)
        if problem:  # before anything starts (or says it has)
            print(f"strokes serve: error: {problem}", file=sys.stderr)
            return 2
    tmp = None
    redis = None
    worker = dispatcher = None
    stopping = threading.Event()  # set once we stop the worker ourselves
    redis_url = args.redis_url or os.environ.get("STROKES_REDIS_URL")
    try:
        if not redis_url:
            tmp = tempfile.mkdtemp(prefix="strokes-redis-")
            redis = PrivateRedis(Path(tmp))
            redis.start()
            redis_url = redis.url
        env = {**os.environ, "STROKES_REDIS_URL": redis_url, "STROKES_LOCAL_WORKERS": "1"}
        if tmp is not None and "STROKES_BLOB_DIR" not in os.environ:
            env["STROKES_BLOB_DIR"] = str(Path(tmp) / "blobs")  # private Redis, private images
        cmd = [
            sys.executable,
            "-m",
            "strokes.service.cli",
            "worker",
            "--checkpoint",
            str(args.checkpoint),
            "--device",
            args.device,
            "--redis-url",
            redis_url,
        ]
        if args.worker_metrics_port:
            cmd += ["--metrics-port", str(args.worker_metrics_port)]
        if args.pipeline:
            cmd += ["--pipeline", args.pipeline]
        worker = WorkerSupervisor(cmd, env, stopping)
        threading.Thread(target=worker.watch, daemon=True).start()
        hooks = Settings()
        if hooks.webhook_secret is not None or hooks.webhook_secrets:  # webhooks: the dispatcher beside them
            webhook_cmd = [
                sys.executable,
                "-m",
                "strokes.service.cli",
                "webhooks",
                "--redis-url",
                redis_url,
            ]
            dispatcher = subprocess.Popen(webhook_cmd, env=env, preexec_fn=_die_with_parent)
            threading.Thread(
                target=_exit_with, args=(dispatcher, stopping, "webhook dispatcher"), daemon=True
            ).start()

        import uvicorn

        # A CPU worker: requests that leave sizes and steps out get CPU-sized ones (and /v1/info says
        # so), unless STROKES_REQUEST_DEFAULTS says otherwise.
        profile = os.environ.get("STROKES_REQUEST_DEFAULTS") or ("cpu" if args.device == "cpu" else "model")
        # Uploads are stored, and an edit's size recorded, by the checkpoint's own input rule.
        resize = Settings().upload_resize if "STROKES_UPLOAD_RESIZE" in os.environ else None
        settings = Settings(
            redis_url=redis_url,
            blob_dir=env.get("STROKES_BLOB_DIR") or Settings().blob_dir,
            request_defaults=profile,
            upload_resize=resize or checkpoint_input_resize(args.checkpoint),
        )
        logs.setup(settings.log_level, "api")
        print(
            f"strokes serve: API on http://{args.host}:{args.port}  redis {redis_url}  "
            f"worker device {args.device} (the worker logs what it resolved)",
            file=sys.stderr,
            flush=True,
        )
        # uvicorn re-raises SIGTERM/SIGINT after its shutdown, with the handlers it found: make
        # that a SystemExit so the cleanup below runs (the default handler would kill us first).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _exit_now)
        code = 0
        try:
            uvicorn.run(
                create_app(settings),
                host=args.host,
                port=args.port,
                log_config=logs.uvicorn_log_config(),
                timeout_graceful_shutdown=5,
            )
        except SystemExit as exc:  # our signal handler (0), or uvicorn failing to start (3)
            code = exc.code if isinstance(exc.code, int) else 1
        # A worker that failed (a bad checkpoint, say) fails `strokes serve` too.
        return code or (1 if worker.code else 0)
    finally:
        stopping.set()
        stop_child(worker.proc if worker is not None else None)
        stop_child(dispatcher)
        if redis is not None:
            redis.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def register(subparsers) -> None:
    from strokes.model import devices

    p = subparsers.add_parser("serve", help="API + one worker (+ a private redis-server) on this machine")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=os.environ.get("STROKES_CHECKPOINT"),
        required=not os.environ.get("STROKES_CHECKPOINT"),
        help="model folder; default $STROKES_CHECKPOINT",
    )
    p.add_argument("--device", default=devices.default(), help=devices.HELP)
    p.add_argument("--host", default="127.0.0.1", help="the API's address (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="the API's port")
    p.add_argument(
        "--redis-url", default=None, help="use this Redis (default: $STROKES_REDIS_URL, else a private one)"
    )
    p.add_argument(
        "--worker-metrics-port", type=int, default=None, help="serve the worker's Prometheus metrics here"
    )
    p.add_argument(
        "--pipeline",
        default=None,
        help="module:callable building another pipeline for the worker (tests, plugins)",
    )
    p.set_defaults(func=run_serve)
