"""Guidance branches in parallel over torch.distributed: W processes on gloo (CPU) give images bitwise
equal to one process running the branches one after another; NCCL when two GPUs exist."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from testkit.paths import TINY

from strokes.model.generation.loading import load_engine
from strokes.model.generation.pipeline import Pipeline
from strokes.model.spec.events import ImageCompleted
from strokes.model.spec.params import GenerationParams, ImageSettings, TextSettings

SETTINGS = ImageSettings(steps=6, cfg_img_scale=2.0, cfg_interval=(0.4, 1.0))  # 3, then 1 branch
PARAMS = GenerationParams(
    prompt="a red cube on a blue sphere",
    width=48,
    height=32,
    max_iterations=1,
    seed=7,
    plan=TextSettings(max_tokens=8),
    reflect=TextSettings(max_tokens=8),
    draft=ImageSettings(steps=4),
    refine=ImageSettings(steps=4, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)),
)


def _edit_image(engine):
    """A 3-branch edit: cond (image + text), text-uncond (the image), img-uncond (the text)."""
    cond, img = engine.new_cache(), engine.new_cache()
    image = engine.prepare_image(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    engine.append_vae_image(cond, image, generator=torch.Generator().manual_seed(0))
    engine.append_vit_image(cond, image)
    text_uncond = cond.snapshot()
    for ctx in (cond, img):
        engine.append_text(ctx, "make the cube green")
    gen = engine.generate_image(
        cond,
        text_uncond,
        img,
        height=image.height,
        width=image.width,
        settings=SETTINGS,
        noise=torch.randn(image.height * image.width // 256, 64, generator=torch.Generator().manual_seed(1)),
    )
    list(gen)
    return gen.latent.cpu(), gen.pixels, gen.forwards


def _job(engine):
    events = list(Pipeline(engine).run(PARAMS))
    return [ev.pixels for ev in events if isinstance(ev, ImageCompleted)]


def _rank_main(
    rank: int, world: int, rendezvous: str, device: str, out: str, timeout_s: float = 120, idle_s: float = 0
) -> None:
    import time

    from strokes.model import devices as devicelib
    from strokes.model.generation.parallel import BranchGroup, init_group

    torch.set_num_threads(1)
    engine = load_engine(TINY, device=device.format(rank=rank), dtype="float32")
    init_group(rank, world, engine.device, rendezvous, timeout_s=timeout_s)
    group = BranchGroup(engine, rank, world, [f"dev{r}" for r in range(world)])
    try:
        if rank:
            group.serve()
            return
        time.sleep(idle_s)  # the followers wait, idle, past the collectives' timeout
        engine.branch_group = group
        result = {"edit": _edit_image(engine), "job": _job(engine), "reports": sorted(devicelib._reports)}
        group.shutdown()
        torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _leader_main(index: int, devices: list[str], out: str) -> None:
    """The worker's factory path: the leader spawns its followers and joins them."""
    from strokes.model.generation.parallel import load_parallel_engine

    torch.set_num_threads(1)
    engine = load_parallel_engine(str(TINY), devices, "float32")
    try:
        torch.save({"edit": _edit_image(engine), "job": _job(engine)}, out)
    finally:
        engine.branch_group.shutdown()
        dist.destroy_process_group()


def _single_process(device: str):
    torch.set_num_threads(1)
    engine = load_engine(TINY, device=device, dtype="float32", batch_branches=False)
    return {"edit": _edit_image(engine), "job": _job(engine)}


def _check(world: int, device: str, tmp_path, factory: bool = False, timeout_s=120, idle_s=0) -> None:
    out = tmp_path / "rank0.pt"
    if factory:
        devices = [device.format(rank=r) for r in range(world)]
        mp.start_processes(_leader_main, args=(devices, str(out)), nprocs=1, start_method="spawn")
    else:
        rendezvous = str(tmp_path / "rendezvous")
        mp.start_processes(
            _rank_main,
            args=(world, rendezvous, device, str(out), timeout_s, idle_s),
            nprocs=world,
            start_method="spawn",
        )
    parallel = torch.load(out, weights_only=False)
    single = _single_process(device.format(rank=0))
    latent, pixels, forwards = parallel["edit"]
    assert forwards == single["edit"][2] and forwards > 6  # 3-branch and 1-branch steps both ran
    assert torch.equal(latent, single["edit"][0])
    assert np.array_equal(pixels, single["edit"][1])
    assert len(parallel["job"]) == len(single["job"]) >= 1
    for a, b in zip(parallel["job"], single["job"], strict=True):
        assert np.array_equal(a, b)
    if not factory:  # every follower reported its memory to the leader after the images
        assert parallel["reports"] == [f"dev{r}" for r in range(1, world)]


@pytest.mark.parametrize("world", [3, 2])
def test_branches_on_gloo_processes_equal_the_sequential_single_process_images(world, tmp_path):
    """3 processes: one branch each; 2 processes: the leader also runs the third branch."""
    _check(world, "cpu", tmp_path)


def test_idle_followers_outlast_the_collectives_timeout(tmp_path):
    """Followers idle for twice the collectives' timeout (the leader not yet sending work) wait on
    the store's doorbell, not in a collective, and then serve the job as usual."""
    _check(2, "cpu", tmp_path, timeout_s=4, idle_s=8)


LEADER_THEN_IDLE = """
import sys, time, torch
torch.set_num_threads(1)
from strokes.model.generation.parallel import load_parallel_engine
engine = load_parallel_engine(sys.argv[1], ["cpu", "cpu"], "float32")
print("ready", *[p.pid for p in engine.branch_group.followers], flush=True)
time.sleep(120)
print("still running", flush=True)
"""


def test_a_lost_follower_ends_the_worker_at_once_saying_which(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from strokes.model.generation.parallel import EXIT_LOST_FOLLOWER

    env = dict(os.environ, OMP_NUM_THREADS="1")
    with subprocess.Popen(
        [sys.executable, "-c", LEADER_THEN_IDLE, str(TINY)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as leader:
        try:
            ready, follower = leader.stdout.readline().split()
            assert ready == "ready"
            os.kill(int(follower), signal.SIGKILL)
            began = time.monotonic()
            _, stderr = leader.communicate(timeout=60)
            assert leader.returncode == EXIT_LOST_FOLLOWER and time.monotonic() - began < 30
            assert f"branch follower on cpu (pid {follower}) ended with exit code -9" in stderr
        finally:
            if leader.poll() is None:
                leader.kill()
                leader.communicate()


def test_the_workers_factory_spawns_its_followers_and_gives_the_same_images(tmp_path, monkeypatch):
    """load_parallel_engine (what `strokes worker --devices` calls) with three CPU processes."""
    # The followers it spawns compute with one thread, as every other process here does: a CPU
    # matmul's summation order, hence its last bits, depends on the thread count.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _check(3, "cpu", tmp_path, factory=True)


def test_a_gpu_listed_twice_is_refused_before_any_process_starts():
    from strokes.model.generation.parallel import load_parallel_engine
    from strokes.model.network.config import CheckpointError

    with pytest.raises(CheckpointError, match="twice"):
        load_parallel_engine(str(TINY), ["cuda:0", "cuda:0"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_branches_on_nccl_devices_equal_the_sequential_single_device_images(tmp_path):
    """On GPUs: rank r on cuda:r, float32 without TF32, deterministic kernels per device."""
    _check(2, "cuda:{rank}", tmp_path)
