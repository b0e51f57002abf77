"""The official `PackedDataset.pack_sequence` + `to_tensor`: samples -> one packed sequence.

Shapes: L=packed tokens, n_text / n_vit / n_vae = tokens of each kind, N=VAE images of the pack,
P=packed latent channels (2*2*16 = 64), Hm/Wm = the largest image height / width.

Semantics (golden/train/README.md), per item of a sample's plan (model/training/plan.py):
- text: [<|im_start|>] + ids + [<|im_end|>], one causal split, position +1 per token. With loss,
  CE sits at <|im_start|> and every id, labelled ids + [<|im_end|>], weight 1/sqrt(len(ids)+1).
  A special-token label puts CE at the closing <|im_end|> (weight 1).
- vit_image: <|vision_start|>, patches (14x14, (py, px, c) order, position row*70+col),
  <|vision_end|>; one "full" split; every token at one position, which then advances by one.
- vae_image: <|vision_start|>, h*w latent tokens (position row*64+col), <|vision_end|>; "noise"
  split with loss (MSE on its tokens; one timestep draw per image), else "full" (clean: raw
  timestep -inf, i.e. t = 0). Clean images advance the position by one, noisy ones do not.
- A special-token label on an image puts CE at its <|vision_end|>.
- Positions restart at 0 for each sample; each sample has its own attention mask.
Randomness, drawn in the official order through `Draws`: a uniform per item with `enable_cfg`
(dropout of conditioning, even at probability 0), a normal per loss image (the raw timestep).
The posterior noise of the VAE and the flow noise are not drawn here (`attach_noise`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from strokes.model.network.transforms import latent_position_ids, patchify_vit, vit_position_ids
from strokes.model.training.plan import ItemType, SamplePlan, SpecialTokens


class Draws(Protocol):
    """The packing's randomness: python's random.random() and numpy's randn() in the official code."""

    def uniform(self) -> float: ...

    def normal(self) -> float: ...


@dataclass(frozen=True)
class PackConfig:
    tokens: SpecialTokens
    vae_downsample: int = 16  # pixels per latent token side
    max_latent_size: int = 64  # latent position grid side
    vit_patch: int = 14
    vit_max_per_side: int = 70  # ViT position grid side
    text_cond_dropout: float = 0.0
    vit_cond_dropout: float = 0.0
    vae_cond_dropout: float = 0.0


@dataclass
class SampleTensors:
    """A sample's plan with its transformed images: vae[i] (3, H, W), vit[i] (3, H', W'), in [-1, 1]."""

    plan: SamplePlan
    vae: dict[int, Tensor]
    vit: dict[int, Tensor]


@dataclass
class PackedBatch:
    """One packed sequence and everything the training forward needs (`to_tensor` of the official)."""

    sequence_length: int
    sample_lens: list[int]
    split_lens: list[list[int]]  # per sample
    attn_modes: list[list[str]]  # per sample: causal | full | noise
    text_ids: Tensor  # (n_text,) long, markers included
    text_indexes: Tensor  # (n_text,) long
    position_ids: Tensor  # (L,) long
    label_ids: Tensor  # (n_ce,) long
    ce_indexes: Tensor  # (n_ce,) long
    ce_weights: Tensor  # (n_ce,) float
    ce_sample: Tensor  # (n_ce,) long: the sample each CE token belongs to
    vae_images: list[Tensor] = field(default_factory=list)  # N x (3, H, W)
    latent_shapes: list[tuple[int, int]] = field(default_factory=list)  # N x (h, w) latent tokens
    vae_sample: list[int] = field(default_factory=list)  # N: the sample each vae image belongs to
    vae_keys: list[tuple[int, int]] = field(default_factory=list)  # N: (sample, image): copies share one
    latent_position_ids: Tensor | None = None  # (n_vae,) long
    vae_token_indexes: Tensor | None = None  # (n_vae,) long
    timesteps: Tensor | None = None  # (n_vae,) raw draws, -inf for clean images
    mse_indexes: Tensor | None = None  # (n_mse,) long
    mse_sample: Tensor | None = None  # (n_mse,) long
    vit_tokens: Tensor | None = None  # (n_vit, 14*14*3)
    vit_position_ids: Tensor | None = None  # (n_vit,) long
    vit_token_indexes: Tensor | None = None  # (n_vit,) long
    vit_seqlens: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # sample ids
    kinds: list[str] = field(default_factory=list)  # sample kinds
    posterior_eps: Tensor | None = None  # (N, 16, Hm/8, Wm/8): the VAE posterior draw
    flow_noise: Tensor | None = None  # (n_vae, P): the rectified-flow noise

    @property
    def padded_images(self) -> Tensor:
        """(N, 3, Hm, Wm): the VAE inputs zero-padded at the bottom and right (the official batch)."""
        h = max(x.shape[1] for x in self.vae_images)
        w = max(x.shape[2] for x in self.vae_images)
        out = torch.zeros(len(self.vae_images), 3, h, w)
        for i, x in enumerate(self.vae_images):
            out[i, :, : x.shape[1], : x.shape[2]] = x
        return out

    def attention_mask(self, sample: int, device: torch.device | str = "cpu") -> Tensor:
        return attention_mask(self.split_lens[sample], self.attn_modes[sample], device)

    @property
    def num_ce(self) -> int:
        return len(self.ce_indexes)

    @property
    def num_mse(self) -> int:
        return 0 if self.mse_indexes is None else len(self.mse_indexes)

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor on `device` (images and draws included)."""
        moved = {}
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
            elif name == "vae_images":
                moved[name] = [x.to(device) for x in value]
            else:
                moved[name] = value
        return PackedBatch(**moved)


def attention_mask(
    split_lens: list[int], attn_modes: list[str], device: torch.device | str = "cpu"
) -> Tensor:
    """(Ls, Ls) bool, True where a query may attend (`prepare_attention_mask_per_sample`): causal
    splits see what came before and themselves causally; full and noise splits see what came before
    and all of themselves; nothing outside a noise split sees it."""
    total = sum(split_lens)
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    start = 0
    for length, mode in zip(split_lens, attn_modes, strict=True):
        end = start + length
        mask[start:end, :start] = True
        if mode == "causal":
            mask[start:end, start:end] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        else:
            mask[start:end, start:end] = True
        start = end
    start = 0
    for length, mode in zip(split_lens, attn_modes, strict=True):
        end = start + length
        if mode == "noise":
            mask[:, start:end] = False
            mask[start:end, start:end] = True
        start = end
    return mask


def len2weight(n: int) -> float:
    """The official 'square' CE weight of a text of n tokens (used with ce_loss_reweighting)."""
    return 0.0 if n == 0 else 1.0 / n**0.5


class _Packer:
    """The running state of `pack_sequence` over several samples (the official sequence_status)."""

    def __init__(self, cfg: PackConfig):
        self.cfg = cfg
        self.curr = 0
        self.sample_lens: list[int] = []
        self.split_lens: list[list[int]] = []
        self.attn_modes: list[list[str]] = []
        self.text_ids: list[int] = []
        self.text_indexes: list[int] = []
        self.positions: list[int] = []
        self.labels: list[int] = []
        self.ce_indexes: list[int] = []
        self.ce_weights: list[float] = []
        self.ce_sample: list[int] = []
        self.vae_images: list[Tensor] = []
        self.latent_shapes: list[tuple[int, int]] = []
        self.vae_sample: list[int] = []
        self.vae_keys: list[tuple[int, int]] = []
        self.latent_positions: list[Tensor] = []
        self.vae_indexes: list[int] = []
        self.timesteps: list[float] = []
        self.mse_indexes: list[int] = []
        self.mse_sample: list[int] = []
        self.vit_tokens: list[Tensor] = []
        self.vit_positions: list[Tensor] = []
        self.vit_indexes: list[int] = []
        self.vit_seqlens: list[int] = []

    def _token(self, token: int) -> None:
        self.text_ids.append(token)
        self.text_indexes.append(self.curr)
        self.curr += 1

    def _ce(self, index: int, label: int, weight: float, sample: int) -> None:
        self.ce_indexes.append(index)
        self.labels.append(label)
        self.ce_weights.append(weight)
        self.ce_sample.append(sample)

    def add(self, s: SampleTensors, sample: int, draws: Draws) -> None:
        cfg, tok = self.cfg, self.cfg.tokens
        split_lens: list[int] = []
        modes: list[str] = []
        rope, start_len = 0, self.curr
        for item in s.plan.items:
            split_start = self.curr
            if item.type == ItemType.text:
                if item.enable_cfg and draws.uniform() < cfg.text_cond_dropout:
                    continue
                shifted = [tok.bos, *item.ids]
                for t in shifted:
                    self._token(t)
                if item.loss:
                    weight = len2weight(len(shifted))
                    targets = [*item.ids, tok.eos]
                    for offset, label in enumerate(targets):
                        self._ce(split_start + offset, label, weight, sample)
                if item.special_token_label is not None:
                    self._ce(self.curr, item.special_token_label, 1.0, sample)
                self._token(tok.eos)
                n = self.curr - split_start
                modes.append("causal")
                self.positions.extend(range(rope, rope + n))
                rope += n
            elif item.type == ItemType.vit_image:
                if item.enable_cfg and draws.uniform() < cfg.vit_cond_dropout:
                    rope += 1
                    continue
                image = s.vit[item.image]  # (3, H, W)
                self._token(tok.start_of_image)
                patches = patchify_vit(image, cfg.vit_patch)  # (M, 14*14*3)
                m = patches.shape[0]
                self.vit_indexes.extend(range(self.curr, self.curr + m))
                self.curr += m
                self.vit_tokens.append(patches)
                self.vit_seqlens.append(m)
                h, w = image.shape[1] // cfg.vit_patch, image.shape[2] // cfg.vit_patch
                self.vit_positions.append(vit_position_ids(h, w, cfg.vit_max_per_side))
                if item.special_token_label is not None:
                    self._ce(self.curr, item.special_token_label, 1.0, sample)
                self._token(tok.end_of_image)
                n = self.curr - split_start
                modes.append("full")
                self.positions.extend([rope] * n)
                rope += 1
            else:  # vae_image
                if item.enable_cfg and draws.uniform() < cfg.vae_cond_dropout:
                    rope += 1
                    continue
                image = s.vae[item.image]  # (3, H, W)
                self._token(tok.start_of_image)
                self.vae_images.append(image)
                h, w = image.shape[1] // cfg.vae_downsample, image.shape[2] // cfg.vae_downsample
                self.latent_positions.append(latent_position_ids(h, w, cfg.max_latent_size))
                self.latent_shapes.append((h, w))
                self.vae_sample.append(sample)
                self.vae_keys.append((sample, item.image))
                n_img = h * w
                self.vae_indexes.extend(range(self.curr, self.curr + n_img))
                if item.loss:
                    self.mse_indexes.extend(range(self.curr, self.curr + n_img))
                    self.mse_sample.extend([sample] * n_img)
                    timestep = draws.normal()
                else:
                    timestep = float("-inf")
                self.timesteps.extend([timestep] * n_img)
                self.curr += n_img
                if item.special_token_label is not None:
                    self._ce(self.curr, item.special_token_label, 1.0, sample)
                self._token(tok.end_of_image)
                n = self.curr - split_start
                modes.append("noise" if item.loss else "full")
                self.positions.extend([rope] * n)
                if not item.loss:
                    rope += 1
            split_lens.append(self.curr - split_start)
        self.sample_lens.append(self.curr - start_len)
        self.split_lens.append(split_lens)
        self.attn_modes.append(modes)

    def batch(self, plans: list[SamplePlan]) -> PackedBatch:
        long = torch.long
        out = PackedBatch(
            sequence_length=self.curr,
            sample_lens=self.sample_lens,
            split_lens=self.split_lens,
            attn_modes=self.attn_modes,
            text_ids=torch.tensor(self.text_ids, dtype=long),
            text_indexes=torch.tensor(self.text_indexes, dtype=long),
            position_ids=torch.tensor(self.positions, dtype=long),
            label_ids=torch.tensor(self.labels, dtype=long),
            ce_indexes=torch.tensor(self.ce_indexes, dtype=long),
            ce_weights=torch.tensor(self.ce_weights, dtype=torch.float32),
            ce_sample=torch.tensor(self.ce_sample, dtype=long),
            ids=[p.id for p in plans],
            kinds=[p.kind for p in plans],
        )
        if self.vae_images:
            out.vae_images = self.vae_images
            out.latent_shapes = self.latent_shapes
            out.vae_sample = self.vae_sample
            out.vae_keys = self.vae_keys
            out.latent_position_ids = torch.cat(self.latent_positions)
            out.vae_token_indexes = torch.tensor(self.vae_indexes, dtype=long)
            out.timesteps = torch.tensor(self.timesteps, dtype=torch.float32)
            out.mse_indexes = torch.tensor(self.mse_indexes, dtype=long)
            out.mse_sample = torch.tensor(self.mse_sample, dtype=long)
        if self.vit_tokens:
            out.vit_tokens = torch.cat(self.vit_tokens)
            out.vit_position_ids = torch.cat(self.vit_positions)
            out.vit_token_indexes = torch.tensor(self.vit_indexes, dtype=long)
            out.vit_seqlens = self.vit_seqlens
        return out


def pack(samples: list[SampleTensors], cfg: PackConfig, draws: list[Draws] | Draws) -> PackedBatch:
    """Pack the samples into one sequence. `draws`: one source for the whole pack (the official
    order), or one per sample (so a sample's randomness does not depend on its neighbours)."""
    packer = _Packer(cfg)
    for i, s in enumerate(samples):
        packer.add(s, i, draws[i] if isinstance(draws, list) else draws)
    return packer.batch([s.plan for s in samples])


def attach_noise(batch: PackedBatch, posterior_eps: list[Tensor], flow_noise: list[Tensor]) -> PackedBatch:
    """Put per-image draws into the pack: posterior_eps[i] (16, H_i/8, W_i/8) and flow_noise[i]
    (h_i*w_i, P) for the i-th vae image of the pack, assembled as the official tensors (eps
    zero-padded to (N, 16, Hm/8, Wm/8); the padding never reaches a latent token)."""
    if not batch.vae_images:
        return batch
    n = len(batch.vae_images)
    if len(posterior_eps) != n or len(flow_noise) != n:
        raise ValueError(
            f"{n} vae images in the pack, {len(posterior_eps)} eps and {len(flow_noise)} noise draws"
        )
    h = max(e.shape[1] for e in posterior_eps)
    w = max(e.shape[2] for e in posterior_eps)
    eps = torch.zeros(n, posterior_eps[0].shape[0], h, w)
    for i, e in enumerate(posterior_eps):
        eps[i, :, : e.shape[1], : e.shape[2]] = e
    batch.posterior_eps = eps
    batch.flow_noise = torch.cat(flow_noise)
    return batch
