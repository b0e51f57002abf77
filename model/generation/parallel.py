"""Guidance branches in parallel, one per device: a leader and followers over torch.distributed.

Shapes: L=layers, G=kv heads, n=context tokens, D=head_dim, N=latent tokens, P=packed latent (64).

A guided denoising step runs up to three forwards of the same block against three contexts (cond,
text-unconditional, image-unconditional). With W processes, each holding the model on its own
device (NCCL between GPUs, gloo between CPU processes), branch b runs on rank b % W: a 3-branch
step costs one forward instead of three. Rank 0, the leader, runs the whole pipeline and owns the
ODE state; the followers are branch servers that only ever wait for the leader:

- image start (`start_image`): the leader sends each follower the KV prefix of each branch it will
  run (once per image; the branches' contexts do not change while an image is denoised), and
  the latent grid; the follower builds the block room after it (model/network/kv_cache.py);
- each step (`step`): the leader broadcasts x_t and t; every rank embeds the same block and runs
  its branches; an all_gather hands every velocity to the leader, which combines them exactly as
  the single-device path does (float32 copies of the same values: bitwise the same result as
  running the branches one after another);
- image end (`end_image`, also after a cancel or an error): the followers drop their rooms;
- `shutdown`: the followers return.

Control messages are one broadcast int64 header, so a follower never needs the pipeline, the
tokenizer or a cancel flag: the leader stops sending steps and ends the image.

Idle is not a collective: between images a follower waits on a doorbell key in the group's store
(`_wait_for_work`, no deadline), which the leader sets before an image or a shutdown, so an idle
hour never meets the collectives' timeout (NCCL's watchdog would otherwise end the process after
it and the next job would hang). The collectives themselves only run while work flows, under a
timeout of minutes (`init_group`). A follower that dies is noticed at once by the leader's
watchdog (`watch_followers`, on the processes' sentinels), which logs which one and how it ended
and ends the worker with EXIT_LOST_FOLLOWER, so its supervisor restarts it instead of a job
hanging in a collective; a follower ends when its leader dies (it watches its parent).

Memory: at the end of every image each follower reports its allocator's figures to the leader
(one small all_gather), which keeps them per device for the worker's metrics (model/devices.py);
the leader never touches the followers' GPUs (no CUDA context there).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from strokes.model import devices as devicelib
from strokes.model.network.kv_cache import Context, KVCache, Prefix, branch_rooms
from strokes.model.network.transforms import latent_position_ids

IMAGE, STEP, END, SHUTDOWN = 1, 2, 3, 4
COLLECTIVE_TIMEOUT_S = 600  # a step's collectives, while work flows (idle waits have no deadline)
DOORBELL_POLL_S = 60  # a follower's store wait is renewed this often while idle
EXIT_LOST_FOLLOWER = 75  # the worker's exit status when a follower process died
log = logging.getLogger("strokes.model.parallel")


def init_group(
    rank: int, world: int, device: torch.device, rendezvous: str, timeout_s: float = COLLECTIVE_TIMEOUT_S
) -> None:
    """Join the process group: NCCL when the devices are GPUs, gloo on the CPU. `rendezvous` is a
    file path all ranks can reach (one machine: no port to pick, none to race for). `timeout_s`
    bounds a collective while work flows; idle followers wait outside collectives."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )


class BranchGroup:
    """This process's part of the group; `engine.branch_group` on the leader."""

    def __init__(self, engine, rank: int, world: int, devices: list[str] | None = None):
        self.engine, self.rank, self.world = engine, rank, world
        self.device = engine.device  # NCCL moves tensors of this device; gloo CPU tensors
        self.devices = devices or [f"rank{r}" for r in range(world)]  # each rank's device, for metrics
        self.store = dist.distributed_c10d._get_default_store()  # the doorbell: idle waits happen here
        self.rings = 0  # doorbell keys set (leader) or answered (follower)
        self.followers: list = []  # the leader's follower processes, when it spawned them
        self.stopping = threading.Event()  # set: the followers may end (their watchdog is disarmed)
        self.rooms: dict[int, Prefix] = {}  # branch -> room, the branches this rank runs
        self.slots = 0  # branches per rank in this image
        self.grid: tuple[int, int] = (0, 0)
        self.pos: torch.Tensor | None = None  # (N,) latent position ids of this image, on the device

    def _set_grid(self, h: int, w: int, branches: int) -> None:
        self.grid, self.slots = (h, w), math.ceil(branches / self.world)
        self.pos = latent_position_ids(h, w, self.engine.cfg.max_latent_size).to(self.device)  # once

    # ---- both sides --------------------------------------------------------------------------
    def _header(self, *values: int) -> list[int]:
        header = torch.zeros(6, dtype=torch.long, device=self.device)
        for i, value in enumerate(values):  # fills on the device: no host-to-device copy to wait on
            header[i] = value
        dist.broadcast(header, src=0)
        return header.tolist() if self.rank else list(values)  # the leader never waits for the GPU

    def _ring(self) -> None:
        """The leader: wake the followers for the header that follows."""
        self.store.set(f"strokes/work/{self.rings}", "1")
        if self.rings:  # every follower answered the previous ring (it took part in what followed)
            self.store.delete_key(f"strokes/work/{self.rings - 1}")
        self.rings += 1

    def _wait_for_work(self) -> None:
        """A follower, idle: wait for the leader's next ring, however long; never in a collective."""
        key = f"strokes/work/{self.rings}"
        while True:
            try:
                self.store.wait([key], timedelta(seconds=DOORBELL_POLL_S))
                break
            except RuntimeError as e:  # the store's wait timed out: keep waiting
                if "timeout" not in str(e).lower():
                    raise
        self.rings += 1

    def _exchange_memory(self) -> None:
        """Every rank's allocator figures to the leader (after an image), kept per device there."""
        mine = devicelib.allocator_memory(self.device)
        figures = torch.tensor([mine.allocated, mine.peak], dtype=torch.long, device=self.device)
        gathered = [torch.empty_like(figures) for _ in range(self.world)]
        dist.all_gather(gathered, figures)
        if self.rank == 0:
            for rank in range(1, self.world):
                allocated, peak = gathered[rank].tolist()
                devicelib.report(devicelib.DeviceMemory(self.devices[rank], allocated, peak))

    def _velocity(self, room: Prefix, block: torch.Tensor) -> torch.Tensor:
        """One branch's velocity (N, P), as the single-device path computes it."""
        model, gen = self.engine.model, slice(1, block.shape[1] - 1)
        return model.velocity(model.language_model.forward_block(block, [room], gen=gen)[0, gen])

    def _run(self, x: torch.Tensor, t: torch.Tensor, count: int) -> list[torch.Tensor] | None:
        """Run this rank's branches among the first `count` and gather every branch (on the leader)."""
        engine = self.engine
        block = engine.image_block(engine.model.embed_latents(x, t, self.pos))  # (1, N+2, E)
        mine = torch.zeros(self.slots, x.shape[0], x.shape[1], device=self.device)  # (S, N, P)
        for branch in range(self.rank, count, self.world):
            mine[branch // self.world] = self._velocity(self.rooms[branch], block).float()
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        return [gathered[b % self.world][b // self.world] for b in range(count)]

    # ---- the leader ----------------------------------------------------------------------------
    def start_image(self, contexts: list[Context], tokens: int, h: int, w: int) -> None:
        """Send every follower the contexts of its branches; keep a room for the leader's own."""
        self._set_grid(h, w, len(contexts))
        self._ring()
        self._header(IMAGE, len(contexts), tokens, h, w)
        for branch, ctx in enumerate(contexts):
            owner = branch % self.world
            if owner == 0:
                self.rooms[branch] = branch_rooms([ctx], tokens)[0]
                continue
            meta = torch.tensor([ctx.length, ctx.rope], dtype=torch.long, device=self.device)
            dist.send(meta, dst=owner)
            for store in (ctx.cache.k, ctx.cache.v):
                dist.send(store[:, :, : ctx.length].contiguous(), dst=owner)  # (L, G, n, D)

    def step(self, x: torch.Tensor, t: torch.Tensor, count: int) -> list[torch.Tensor]:
        """x (N, P) float32 and t (1,) on the device -> `count` velocities (N, P) float32."""
        self._header(STEP, count)
        packed = torch.cat([x.reshape(-1), t.float()])  # one broadcast: x_t, then t
        dist.broadcast(packed, src=0)
        return self._run(x, t, count)

    def end_image(self) -> None:
        self._header(END)
        self.rooms.clear()
        self._exchange_memory()

    def shutdown(self) -> None:
        self.stopping.set()
        self._ring()
        self._header(SHUTDOWN)

    # ---- a follower ----------------------------------------------------------------------------
    def _receive_contexts(self, branches: int, tokens: int) -> None:
        cfg = self.engine.cfg.llm
        for branch in range(self.rank, branches, self.world):
            meta = torch.zeros(2, dtype=torch.long, device=self.device)
            dist.recv(meta, src=0)
            length, rope = meta.tolist()
            room = KVCache(
                cfg.num_layers,
                cfg.num_kv_heads,
                cfg.head_dim,
                capacity=length + tokens,
                dtype=self.engine.dtype,
                device=self.device,
            )
            for store in (room.k, room.v):
                part = torch.empty(
                    cfg.num_layers,
                    cfg.num_kv_heads,
                    length,
                    cfg.head_dim,
                    dtype=store.dtype,
                    device=self.device,
                )
                dist.recv(part, src=0)
                store[:, :, :length] = part
            room.advance(length, rope)
            self.rooms[branch] = room.snapshot()

    @torch.inference_mode()
    def serve(self) -> None:
        """A follower's loop: answer the leader's images and steps until it shuts the group down."""
        assert self.rank > 0, "the leader drives the group; followers serve"
        idle = True
        while True:
            if idle:
                self._wait_for_work()
            cmd, a, b, c, d, _ = self._header()
            idle = cmd == END
            if cmd == IMAGE:
                self._set_grid(c, d, a)
                self._receive_contexts(a, b)
            elif cmd == STEP:
                h, w = self.grid
                n, p = h * w, self.engine.cfg.patch_latent_dim
                packed = torch.empty(n * p + 1, device=self.device)
                dist.broadcast(packed, src=0)
                self._run(packed[:-1].view(n, p), packed[-1:], a)
            elif cmd == END:
                self.rooms.clear()
                self._exchange_memory()
            elif cmd == SHUTDOWN:
                return
            else:
                raise RuntimeError(f"branch group: unknown command {cmd}")


# ---- several devices in one worker --------------------------------------------------------------


def _follower(
    checkpoint: str,
    device: str,
    dtype: str | None,
    rank: int,
    world: int,
    rendezvous: str,
    devices: list[str],
    weights: str,
    compile_cache: str | None,
    adapter: str | None = None,
) -> None:
    """A follower process: the model on its device, serving branches until the leader shuts down.
    It also ends when the worker that spawned it dies (even by SIGKILL, which skips the
    multiprocessing clean-up of daemonic children): otherwise it would wait for work forever."""
    import time

    from strokes.model.generation.loading import load_engine
    from strokes.model.network.compiled import CompileOptions

    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()

    compile_options = CompileOptions(cache_dir=compile_cache) if compile_cache else None
    engine = load_engine(
        checkpoint, device=device, dtype=dtype, weights=weights, compile=compile_options, adapter=adapter
    )
    init_group(rank, world, engine.device, rendezvous)
    try:
        BranchGroup(engine, rank, world, devices).serve()
    finally:
        dist.destroy_process_group()


def watch_followers(processes: list, devices: list[str], on_lost=None) -> threading.Event:
    """The leader's watchdog: when a follower process ends while the worker runs, say which one and
    how, then `on_lost(message)` (default: end the worker with EXIT_LOST_FOLLOWER, so its supervisor
    restarts it rather than a job waiting in a collective for a rank that is gone). Returns the
    event that disarms it: set on an orderly shutdown and at the interpreter's exit (which ends
    daemonic followers on purpose)."""
    import atexit
    from multiprocessing.connection import wait

    stopping = threading.Event()
    atexit.register(stopping.set)  # runs before multiprocessing's own exit handler ends the followers

    def lost(message: str) -> None:
        log.error(message)
        print(f"strokes: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_FOLLOWER)

    on_lost = on_lost or lost

    def watch() -> None:
        ended = wait([p.sentinel for p in processes])
        if stopping.is_set():
            return
        for process, device in zip(processes, devices, strict=True):
            if process.sentinel in ended:
                process.join(timeout=5)  # reap it: its exit code
                on_lost(
                    f"branch follower on {device} (pid {process.pid}) ended with exit code "
                    f"{process.exitcode}: this worker cannot run guidance branches without it and stops"
                )
                return

    threading.Thread(target=watch, name="follower-watch", daemon=True).start()
    return stopping


def load_parallel_engine(
    checkpoint: str,
    devices: list[str],
    dtype: str | None = None,
    weights: str = "bf16",
    compile_cache: str | None = None,
    adapter: str | None = None,
):
    """The leader's engine on devices[0], with one follower process per other device (spawned,
    daemonic: they end with the worker), all in one process group; `engine.branch_group` set.
    The leader checks every device exists but makes only devices[0] current: no CUDA context on
    the followers' GPUs."""
    import multiprocessing
    import tempfile

    from strokes.model.generation.loading import check_device, load_engine
    from strokes.model.network.compiled import CompileOptions
    from strokes.model.network.config import CheckpointError

    gpus = [d for d in devices if d != "cpu"]
    if len(set(gpus)) != len(gpus):  # CPU processes may repeat "cpu" (gloo; tests, small setups)
        raise CheckpointError(f"--devices lists a GPU twice: {','.join(devices)}")
    for device in devices:
        check_device(device)  # fail fast on a missing device, before any process starts
    world = len(devices)
    rendezvous = f"{tempfile.mkdtemp(prefix='strokes-branches-')}/rendezvous"  # fresh: never reused
    spawn = multiprocessing.get_context("spawn")
    followers = []
    for rank, device in enumerate(devices[1:], start=1):
        process = spawn.Process(
            target=_follower,
            args=(
                str(checkpoint),
                device,
                dtype,
                rank,
                world,
                rendezvous,
                devices,
                weights,
                compile_cache,
                adapter,
            ),
            name=f"strokes-branches-{device}",
            daemon=True,
        )
        process.start()
        followers.append(process)
    stopping = watch_followers(followers, devices[1:])
    for device in devices[1:]:  # the followers' memory comes from them (zero until their first image)
        devicelib.report(devicelib.DeviceMemory(device, 0, 0))
    compile_options = CompileOptions(cache_dir=compile_cache) if compile_cache else None
    engine = load_engine(
        checkpoint, device=devices[0], dtype=dtype, weights=weights, compile=compile_options, adapter=adapter
    )
    init_group(0, world, engine.device, rendezvous)
    engine.branch_group = BranchGroup(engine, 0, world, devices)
    engine.branch_group.followers, engine.branch_group.stopping = followers, stopping
    return engine
