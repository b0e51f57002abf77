"""Shared helpers of the CPU benchmarks: the "small" random checkpoint, threads, machine facts, output.

Every CPU benchmark runs on the shared "small" configuration of DESIGN.md section 5 (LLM hidden 512,
8 layers, 8 heads, 2 KV heads, intermediate 1408; ViT 256 / 4 layers / 4 heads; VAE ch 64,
ch_mult (1, 2, 4, 4)), written once by `model.testing.tiny.make_tiny(folder, seed, sizes="small")` into
bench/.ckpt/ (git-ignored) and reused, with torch limited to 2 threads (the cores of the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere: the repo's model package
    sys.path.insert(0, str(REPO))

from strokes.model.testing.tiny import PRESETS, make_tiny  # noqa: E402

THREADS = 2


def setup_threads(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # allowed once, before any inter-op work
        torch.set_num_interop_threads(1)


def small_checkpoint(seed: int = 0) -> Path:
    """The shared small random checkpoint (written on first use, ~300 MB, then reused)."""
    folder = Path(os.environ.get("STROKES_BENCH_CKPT", BENCH_DIR / ".ckpt" / f"small-seed{seed}"))
    if not (folder / "tiny_bagel_info.json").is_file():
        log(f"writing the small random checkpoint to {folder} ...")
        make_tiny(folder, seed=seed, sizes="small")
    return folder


def small_sizes() -> dict:
    s = PRESETS["small"]
    return {
        "llm": {
            "hidden": s.hidden,
            "layers": s.layers,
            "heads": s.heads,
            "kv_heads": s.kv_heads,
            "intermediate": s.intermediate,
        },
        "vit": {"hidden": s.vit_hidden, "layers": s.vit_layers, "heads": s.vit_heads},
        "vae": {"ch": s.vae_ch, "ch_mult": list(s.vae_ch_mult)},
    }


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all cores busy over `seconds` (0 when /proc/stat cannot be read)."""
    try:
        t0, i0 = _cpu_times()
        time.sleep(seconds)
        t1, i1 = _cpu_times()
    except (OSError, IndexError, ValueError):
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(max_busy: float = 0.25, timeout: float = 180.0) -> dict:
    """The machine is shared: wait (up to `timeout` s) until other processes leave the cores idle."""
    start = time.perf_counter()
    busy = busy_fraction()
    while busy > max_busy and time.perf_counter() - start < timeout:
        log(f"machine busy ({busy:.0%} of the cores): waiting for quiet ...")
        busy = busy_fraction(3.0)
    return {"busy_before_start": round(busy, 3), "waited_s": round(time.perf_counter() - start, 1)}


class Interference:
    """Share of the machine's cores that OTHER processes kept busy between start() and stop():
    all cores' busy time (/proc/stat) minus this process's CPU time, over cores x wall time."""

    def start(self) -> Interference:
        self._t0, self._cpu0 = time.perf_counter(), _own_cpu()
        self._total0, self._idle0 = _cpu_times()
        return self

    def stop(self) -> float:
        total1, idle1 = _cpu_times()
        ticks = max(1, total1 - self._total0)
        busy_share = 1.0 - (idle1 - self._idle0) / ticks
        wall = time.perf_counter() - self._t0
        own_share = (_own_cpu() - self._cpu0) / max(1e-9, wall * (os.cpu_count() or 1))
        return round(max(0.0, busy_share - own_share), 3)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mean(xs) -> float:
    return statistics.fmean(xs)


def median(xs) -> float:
    return statistics.median(xs)


def write_json(path: str | Path | None, data: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    log(f"wrote {path}")
