"""Redis memory with images in Redis (before) and in the blob store (after); image fetch latency.

One run of the real service (API and worker processes, a private redis-server, the tiny model, torch
single-threaded) from the checkout given by --repo:
1. 300 small jobs with previews (64x64, 4 denoising steps per image, a preview at every step), all
   submitted, then waited for;
2. the worker is stopped, then 50 large uploads (a 4096x4096 photo-like JPEG, ~4 MB) are submitted
   and canceled at once (POST + DELETE pairs: the uploads of jobs that never run);
3. Redis `used_memory` (and the dataset part, and the key count) after each phase, minus the
   baseline of the started service; the blob store's size on disk / in the bucket;
4. image fetch latency: GET of finished images through the API (64x64 previews and 512x512 final
   images), and for S3 with presigned URLs, GET of the same images straight from the store.
The same script runs against today's code (before: a checkout of the base commit, which keeps
every image in Redis) and this branch (after) with the local directory and with S3 (moto's server
on loopback: its latency is a local Python server's, not a real S3's).

Usage (bench/README.md has the exact commands of the committed results):
  .venv/bin/python bench/blob_memory.py --label after-local --json bench/results/blob_memory.after-local.json
  .venv/bin/python bench/blob_memory.py --repo /tmp/blob-base --label before --json ...
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis
from PIL import Image

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from strokes.service.cli.serve import PrivateRedis, free_port  # noqa: E402

SMALL = {
    "prompt": "a red cube on a blue sphere",
    "width": 64,
    "height": 64,
    "max_iterations": 1,
    "seed": 3,
    "draft": {"steps": 4},
    "refine": {"steps": 4},
    "plan": {"max_tokens": 8},
    "reflect": {"max_tokens": 8},
    "preview_every": 1,
}
LARGE = {
    **SMALL,
    "width": 512,
    "height": 512,
    "draft": {"steps": 2},
    "refine": {"steps": 2},
    "preview_every": 0,
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def photo_like_jpeg(side: int, seed: int) -> bytes:
    """Smooth shapes plus grain: compresses like a photo (a few MB of JPEG at 4096^2)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (side // 128, side // 128, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 12, (side, side, 3), dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=88)
    return out.getvalue()


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log_path: Path):
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strokes.service.cli", *args],
            cwd=cwd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def memory(client: redis.Redis) -> dict:
    info = client.info("memory")
    return {
        "used_memory": info["used_memory"],
        "used_memory_dataset": info["used_memory_dataset"],
        "keys": client.dbsize(),
    }


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bucket_bytes(endpoint: str, bucket: str) -> int:
    import botocore.session

    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="b", aws_secret_access_key="b"
    )
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        total += sum(o["Size"] for o in page.get("Contents", []))
    s3.close()
    return total


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(1000 * statistics.median(ordered), 3),
        "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 3),
        "mean_ms": round(1000 * statistics.fmean(ordered), 3),
    }


def fetch_latency(http: httpx.Client, urls: list[str], rounds: int) -> dict:
    samples, sizes = [], []
    for _ in range(rounds):
        for url in urls:
            began = time.perf_counter()
            reply = http.get(url)
            samples.append(time.perf_counter() - began)
            assert reply.status_code == 200, (url, reply.status_code)
            sizes.append(len(reply.content))
    return {**percentiles(samples), "mean_bytes": int(statistics.fmean(sizes))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose service runs")
    parser.add_argument("--label", required=True)
    parser.add_argument(
        "--backend", choices=("local", "s3"), default="local", help="ignored by the before code"
    )
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from strokes.model.testing.tiny import make_tiny

    tmp = Path(tempfile.mkdtemp(prefix="blob-bench-"))
    procs: list[Proc] = []
    moto = None
    server = PrivateRedis(tmp / "redis")
    try:
        checkpoint = tmp / "tiny"
        make_tiny(checkpoint, seed=0)
        server.start()
        client = redis.Redis.from_url(server.url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("STROKES_")}
        env |= {
            "STROKES_REDIS_URL": server.url,
            "STROKES_QUEUE_CAP": "1000",
            "STROKES_LOG_LEVEL": "WARNING",
            "STROKES_BLOB_DIR": str(tmp / "blobs"),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(args.repo),
        }
        bucket = "strokes-bench"
        if args.backend == "s3":
            import botocore.session
            from moto.server import ThreadedMotoServer

            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            moto.start()
            host, port = moto.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            s3 = botocore.session.get_session().create_client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="b",
                aws_secret_access_key="b",
            )
            s3.create_bucket(Bucket=bucket)
            s3.close()
            env |= {
                "STROKES_BLOB_BACKEND": "s3",
                "STROKES_S3_BUCKET": bucket,
                "STROKES_S3_ENDPOINT_URL": endpoint,
                "STROKES_S3_ACCESS_KEY_ID": "b",
                "STROKES_S3_SECRET_ACCESS_KEY": "b",
                "STROKES_S3_ADDRESSING_STYLE": "path",
                "STROKES_S3_PRESIGN": "true",
            }
        api_port = free_port()
        base = f"http://127.0.0.1:{api_port}"
        procs.append(Proc(["api", "--port", str(api_port)], env, args.repo, tmp / "api.log"))
        worker = Proc(
            ["worker", "--checkpoint", str(checkpoint), "--device", "cpu", "--name", "w1"],
            env,
            args.repo,
            tmp / "worker.log",
        )
        procs.append(worker)
        http = httpx.Client(base_url=base, timeout=60)
        wait_until(lambda: _ok(http, "/healthz"), 60, "the API")
        # the worker's heartbeat key, in the layout of --repo's version (the hash tag came in issue 22)
        wait_until(lambda: client.exists("{strokes}:hb:w1", "strokes:hb:w1"), 120, "the worker")
        baseline = memory(client)
        log(f"[{args.label}] baseline {baseline}")

        began = time.monotonic()
        ids = [http.post("/v1/generations", json=SMALL).json()["id"] for _ in range(args.jobs)]
        large_ids = [http.post("/v1/generations", json=LARGE).json()["id"] for _ in range(3)]
        for job_id in ids + large_ids:
            status = wait_until(lambda j=job_id: _terminal(http, j), 900, f"job {job_id}")
            assert status == "succeeded", (job_id, status)
        jobs_s = time.monotonic() - began
        after_jobs = memory(client)
        log(f"[{args.label}] {args.jobs} jobs in {jobs_s:.0f} s: {after_jobs}")

        # Fetch latency, while the service is idle.
        previews = [(j, r) for j in ids[:10] for r in preview_refs(http, j)][:40]
        finals = [(j, http.get(f"/v1/generations/{j}").json()["final_image"]) for j in large_ids]
        api_url = "/v1/generations/{}/images/{}"
        latency = {
            "api_preview_64": fetch_latency(http, [api_url.format(j, r["id"]) for j, r in previews], 3),
            "api_final_512": fetch_latency(http, [api_url.format(j, f["id"]) for j, f in finals], 20),
        }
        if args.backend == "s3":
            with httpx.Client(timeout=60) as direct:
                latency["presigned_preview_64"] = fetch_latency(direct, [r["url"] for _, r in previews], 3)
                latency["presigned_final_512"] = fetch_latency(direct, [f["url"] for _, f in finals], 20)
        log(f"[{args.label}] latency {json.dumps(latency)}")

        worker.stop()  # the uploads' jobs never run: POST + DELETE pairs
        upload = "data:image/jpeg;base64," + base64.b64encode(photo_like_jpeg(4096, 7)).decode()
        began = time.monotonic()
        for _ in range(args.uploads):
            reply = http.post("/v1/generations", json={**SMALL, "input_image": upload})
            assert reply.status_code == 202, reply.text
            assert http.delete(f"/v1/generations/{reply.json()['id']}").status_code == 200
        uploads_s = time.monotonic() - began
        after_uploads = memory(client)
        log(f"[{args.label}] {args.uploads} uploads in {uploads_s:.0f} s: {after_uploads}")

        store_bytes = None
        if (tmp / "blobs").exists():
            store_bytes = folder_bytes(tmp / "blobs")
        if args.backend == "s3" and moto is not None:
            store_bytes = bucket_bytes(endpoint, bucket)
        result = {
            "label": args.label,
            "repo_commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True, text=True
            ).stdout.strip(),
            "backend": args.backend,
            "jobs": args.jobs,
            "uploads": args.uploads,
            "upload_bytes": len(upload),
            "redis": {
                "baseline": baseline,
                "after_jobs": after_jobs,
                "after_uploads": after_uploads,
                "jobs_used_memory_delta": after_jobs["used_memory"] - baseline["used_memory"],
                "uploads_used_memory_delta": after_uploads["used_memory"] - after_jobs["used_memory"],
                "total_used_memory_delta": after_uploads["used_memory"] - baseline["used_memory"],
            },
            "blob_store_bytes": store_bytes,
            "jobs_seconds": round(jobs_s, 1),
            "uploads_seconds": round(uploads_s, 1),
            "fetch_latency": latency,
            "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        }
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.stop()
        if moto is not None:
            moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def preview_refs(http: httpx.Client, job_id: str) -> list[dict]:
    """The preview image refs of a finished job, from its event log (status lists no previews)."""
    from strokes_client.events import SSEParser, iter_raw

    with http.stream("GET", f"/v1/generations/{job_id}/events") as reply:
        raw = iter_raw(SSEParser(), reply.iter_lines())
        events = [json.loads(e.data) for e in raw if e.name == "image.progress"]
    return [e["preview"] for e in events if "preview" in e]


def _ok(http: httpx.Client, path: str) -> bool:
    try:
        return http.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def _terminal(http: httpx.Client, job_id: str) -> str | None:
    status = http.get(f"/v1/generations/{job_id}").json()["status"]
    return status if status in ("succeeded", "failed", "canceled") else None


if __name__ == "__main__":
    sys.exit(main())
