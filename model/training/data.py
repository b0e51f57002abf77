"""Epochs, packs, ranks and the data position of a training run.

- Every sample is compiled once (model/training/plan.py) and its token count known up front; a
  sample longer than `max_tokens` fails at once, naming it.
- Epoch e shuffles the samples with the run's seed and packs them greedily, in that order, into
  packs of at most `max_tokens` tokens (the official `expected_num_tokens`). Every rank computes
  the same list of packs; step s of the epoch gives rank r micro-batch m the pack number
  s * world * accumulation + m * world + r. The steps of an epoch are the whole rounds of packs
  (the rest is dropped, as DataLoader's drop_last).
- The data position is (epoch, steps taken in it): a resumed run continues exactly there.
- Randomness is per sample: its dropout and timestep draws and its VAE posterior and flow noise
  come from generators seeded by (seed, epoch, sample index), so a sample's draws do not depend on
  which pack, rank or process it lands in (what makes 2 processes equal 1, and resumes exact).
- Images are decoded and transformed in DataLoader workers; the VAE input is the image through the
  checkpoint's VAE transform, the ViT input the original image through the ViT transform (as the
  official datasets do).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from strokes.model.network.config import BagelConfig
from strokes.model.spec.sizing import to_rgb
from strokes.model.training.packing import PackConfig, PackedBatch, SampleTensors, attach_noise, pack
from strokes.model.training.plan import ItemType, SamplePlan, SpecialTokens, TokenGeometry, plan_tokens
from strokes.model.training.samples import DataError


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    step: int = 0  # optimizer steps taken in the epoch


class SampleRandom:
    """The draws of one sample in one epoch: packing's uniforms and normals, and torch noise."""

    def __init__(self, seed: int, epoch: int, index: int):
        digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
        self._py = random.Random(int.from_bytes(digest[:8], "little"))
        self.generator = torch.Generator().manual_seed(int.from_bytes(digest[8:16], "little") >> 1)

    def uniform(self) -> float:
        return self._py.random()

    def normal(self) -> float:
        return self._py.gauss(0.0, 1.0)


def geometry_of(cfg: BagelConfig) -> TokenGeometry:
    return TokenGeometry(cfg.vae_transform, cfg.vit_transform, cfg.latent_downsample, cfg.vit.patch_size)


def pack_config_of(
    cfg: BagelConfig, tokens: SpecialTokens, text: float, vit: float, vae: float
) -> PackConfig:
    """The packing of a checkpoint's geometry, with conditioning dropout probabilities."""
    return PackConfig(
        tokens=tokens,
        vae_downsample=cfg.latent_downsample,
        max_latent_size=cfg.max_latent_size,
        vit_patch=cfg.vit.patch_size,
        vit_max_per_side=cfg.vit_max_num_patch_per_side,
        text_cond_dropout=text,
        vit_cond_dropout=vit,
        vae_cond_dropout=vae,
    )


def load_rgb(path) -> Image.Image:
    with Image.open(path) as img:
        return to_rgb(img)


class TrainData:
    def __init__(
        self,
        plans: list[SamplePlan],
        cfg: BagelConfig,
        pack_cfg: PackConfig,
        *,
        max_tokens: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        accumulation: int = 1,
        num_workers: int = 0,
    ):
        self.plans, self.cfg, self.pack_cfg = plans, cfg, pack_cfg
        self.max_tokens, self.seed = max_tokens, seed
        self.world_size, self.rank, self.accumulation = world_size, rank, accumulation
        self.num_workers = num_workers
        geometry = geometry_of(cfg)
        self.tokens = [plan_tokens(p, geometry) for p in plans]
        for plan, n in zip(plans, self.tokens, strict=True):
            if n > max_tokens:
                raise DataError(f"sample {plan.id!r}: {n} tokens, more than max_tokens {max_tokens}")

    # ---- the plan of an epoch ------------------------------------------------------------------
    def epoch_packs(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.plans)))
        random.Random(f"{self.seed}:order:{epoch}").shuffle(order)
        packs: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i in order:
            if current and used + self.tokens[i] > self.max_tokens:
                packs.append(current)
                current, used = [], 0
            current.append(i)
            used += self.tokens[i]
        if current:
            packs.append(current)
        return packs

    @property
    def packs_per_step(self) -> int:
        return self.world_size * self.accumulation

    def steps_in(self, packs: list[list[int]]) -> int:
        """Whole steps an epoch of these packs makes."""
        steps = len(packs) // self.packs_per_step
        if steps == 0:
            raise DataError(
                f"an epoch makes {len(packs)} packs, fewer than one step needs "
                f"({self.world_size} processes x {self.accumulation} accumulation steps): "
                "add samples or lower max_tokens"
            )
        return steps

    def my_packs(self, packs: list[list[int]], step: int) -> list[list[int]]:
        """This rank's packs (one per micro-step) of step `step` of an epoch of these packs."""
        base = step * self.packs_per_step
        return [packs[base + m * self.world_size + self.rank] for m in range(self.accumulation)]

    # ---- one pack ------------------------------------------------------------------------------
    def sample_tensors(self, index: int) -> SampleTensors:
        plan = self.plans[index]
        pil: dict[int, Image.Image] = {}
        vae: dict[int, Tensor] = {}
        vit: dict[int, Tensor] = {}
        for item in plan.items:
            if item.type == ItemType.text:
                continue
            if item.image not in pil:
                pil[item.image] = load_rgb(plan.images[item.image])
            if item.type == ItemType.vae_image and item.image not in vae:
                vae[item.image] = self.cfg.vae_transform(pil[item.image])
            elif item.type == ItemType.vit_image and item.image not in vit:
                vit[item.image] = self.cfg.vit_transform(pil[item.image])
        return SampleTensors(plan, vae, vit)

    def load_pack(self, epoch: int, indexes: list[int]) -> PackedBatch:
        draws = [SampleRandom(self.seed, epoch, i) for i in indexes]
        batch = pack([self.sample_tensors(i) for i in indexes], self.pack_cfg, list(draws))
        cfg = self.cfg
        eps, noise = [], []
        for image, sample in zip(batch.vae_images, batch.vae_sample, strict=True):
            gen = draws[sample].generator
            h8, w8 = image.shape[1] // cfg.vae.downsample, image.shape[2] // cfg.vae.downsample
            eps.append(torch.randn(cfg.latent_channels, h8, w8, generator=gen))
            tokens = (image.shape[1] // cfg.latent_downsample) * (image.shape[2] // cfg.latent_downsample)
            noise.append(torch.randn(tokens, cfg.patch_latent_dim, generator=gen))
        return attach_noise(batch, eps, noise)

    # ---- the stream of steps -------------------------------------------------------------------
    def steps(self, start: DataPosition) -> Iterator[tuple[DataPosition, list[PackedBatch]]]:
        """From `start` on, forever: (the position after the step, this rank's micro-batches)."""
        epoch, step = start.epoch, start.step
        while True:
            packs = self.epoch_packs(epoch)
            mine = [p for s in range(step, self.steps_in(packs)) for p in self.my_packs(packs, s)]
            loader = torch.utils.data.DataLoader(
                _Packs(self, epoch, mine),
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=False,
            )
            micro: list[PackedBatch] = []
            for batch in loader:
                micro.append(batch)
                if len(micro) == self.accumulation:
                    step += 1
                    yield DataPosition(epoch, step), micro
                    micro = []
            epoch, step = epoch + 1, 0


class _Packs(torch.utils.data.Dataset):
    """The packs of one epoch for one rank, loaded in DataLoader workers."""

    def __init__(self, data: TrainData, epoch: int, packs: list[list[int]]):
        self.data, self.epoch, self.packs = data, epoch, packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> PackedBatch:
        return self.data.load_pack(self.epoch, self.packs[i])
