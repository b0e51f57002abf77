"""A sample -> the official sequence plan: text, vae_image and vit_image items, as the official
datasets build them (`_add_text` / `_add_image` of data/interleave_datasets) and `pack_sequence`
reads them.

The items of a sample (model/training/samples.py), in order:
- a text segment: one text item (`loss` as the segment says; `enable_cfg` for prompts only, the
  texts the guidance contexts drop). Its closing <|im_end|> carries the model's DECISION as a
  special-token label: <|im_start|> when the model's next segment is a text, <|vision_start|> when
  it draws next, <|im_end|> when the model stops (the sample ends, or a user turn follows). The
  decision is learned after every prompt and after every model text that carries loss; those are
  exactly where the interleaved protocol (model/generation/pipeline.py) stops decoding or calls
  `choose`.
- a drawn image with loss: a noisy vae_image (loss=1, MSE); then, since later text must see it
  (every sample ends with a text), a clean vae_image (loss=0) and a vit_image, which is what the
  pipeline appends after generating it. The vit's <|vision_end|> is labelled <|im_start|> when a
  model text follows ("text comes next", as in the golden tr2 case).
- an input image (or a drawn image without loss): the clean vae_image and the vit_image only.

`official_item` reads the plan items of the golden training cases (the official dict form).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from strokes.model.network.transforms import ImageTransform
from strokes.model.training.samples import DRAWN, MODEL_TEXTS, Sample


class ItemType(str, Enum):
    text = "text"
    vae_image = "vae_image"
    vit_image = "vit_image"


@dataclass(frozen=True)
class SpecialTokens:
    bos: int  # <|im_start|>
    eos: int  # <|im_end|>
    start_of_image: int  # <|vision_start|>
    end_of_image: int  # <|vision_end|>


@dataclass(frozen=True)
class PlanItem:
    type: ItemType
    loss: bool
    enable_cfg: bool
    special_token_label: int | None = None  # CE at the item's closing token, with this label
    ids: tuple[int, ...] = ()  # a text item's token ids (without <|im_start|> / <|im_end|>)
    image: int = -1  # an image item's index into its sample's images


@dataclass(frozen=True)
class SamplePlan:
    id: str
    kind: str
    items: tuple[PlanItem, ...]
    images: tuple[Path, ...] = ()  # image files, by index
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height) of each image file


def _decision(sample: Sample, index: int, tokens: SpecialTokens) -> int | None:
    """The label at the <|im_end|> of text segment `index`: what the model does next, or None."""
    seg = sample.segments[index]
    if seg.role not in ("prompt", *MODEL_TEXTS) or (seg.role in MODEL_TEXTS and not seg.loss):
        return None
    nxt = sample.segments[index + 1] if index + 1 < len(sample.segments) else None
    if nxt is None:
        return tokens.eos
    if nxt.role in MODEL_TEXTS:
        return tokens.bos
    if nxt.role in DRAWN:
        return tokens.start_of_image
    return tokens.eos if seg.role in MODEL_TEXTS else None  # the model ends its turn for the user


def compile_sample(sample: Sample, encode: Callable[[str], list[int]], tokens: SpecialTokens) -> SamplePlan:
    """The official sequence plan of a validated sample (see the module docstring)."""
    items: list[PlanItem] = []
    images: list[Path] = []
    sizes: list[tuple[int, int]] = []
    segments = sample.segments
    for i, seg in enumerate(segments):
        if seg.is_text:
            label = _decision(sample, i, tokens)
            items.append(
                PlanItem(
                    ItemType.text,
                    loss=seg.loss,
                    enable_cfg=seg.role == "prompt",
                    special_token_label=label,
                    ids=tuple(encode(seg.text)),
                )
            )
            continue
        index = len(images)
        images.append(seg.image)
        sizes.append(seg.size)
        if seg.role in DRAWN and seg.loss:
            items.append(PlanItem(ItemType.vae_image, loss=True, enable_cfg=False, image=index))
        nxt = segments[i + 1] if i + 1 < len(segments) else None
        if nxt is None:
            continue
        text_next = nxt.role in MODEL_TEXTS and nxt.loss
        items.append(PlanItem(ItemType.vae_image, loss=False, enable_cfg=True, image=index))
        items.append(
            PlanItem(
                ItemType.vit_image,
                loss=False,
                enable_cfg=True,
                special_token_label=tokens.bos if text_next else None,
                image=index,
            )
        )
    return SamplePlan(sample.id, sample.kind, tuple(items), tuple(images), tuple(sizes))


def official_item(d: dict, ids: list[int] | None = None, image: int = -1) -> PlanItem:
    """An item of an official sequence plan (`{"type", "loss", "enable_cfg", "special_token_loss",
    "special_token_label"}`), with its text ids or image index."""
    label = d.get("special_token_label") if d.get("special_token_loss") else None
    return PlanItem(
        ItemType(d["type"]),
        loss=bool(d["loss"]),
        enable_cfg=bool(d["enable_cfg"]),
        special_token_label=label,
        ids=tuple(ids or ()),
        image=image,
    )


@dataclass(frozen=True)
class TokenGeometry:
    """How many sequence tokens an image item takes: its transforms and patch sizes."""

    vae_transform: ImageTransform
    vit_transform: ImageTransform
    vae_downsample: int = 16  # pixels per latent token side (VAE 8 x latent patch 2)
    vit_patch: int = 14

    def vae_tokens(self, width: int, height: int) -> int:
        w, h = self.vae_transform.size(width, height)
        return (w // self.vae_downsample) * (h // self.vae_downsample)

    def vit_tokens(self, width: int, height: int) -> int:
        w, h = self.vit_transform.size(width, height)
        return (w // self.vit_patch) * (h // self.vit_patch)


def plan_tokens(plan: SamplePlan, geometry: TokenGeometry) -> int:
    """The sequence length of a sample (every item with its two delimiting tokens), no dropout."""
    total = 0
    for item in plan.items:
        if item.type == ItemType.text:
            total += len(item.ids) + 2
        elif item.type == ItemType.vae_image:
            total += geometry.vae_tokens(*plan.sizes[item.image]) + 2
        else:
            total += geometry.vit_tokens(*plan.sizes[item.image]) + 2
    return total
