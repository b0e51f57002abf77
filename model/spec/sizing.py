"""The official BAGEL input-image size rule and RGB conversion, without torch.

They live apart from model/network/transforms.py (which applies them with torch) so that the API
process, which must not import torch, reduces uploads with exactly the rule the model applies (service/shared/images.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

# The official ImageTransform's default max_pixels, used by both the VAE and the ViT transform.
DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024
# BAGEL's VAE input rule (max_size, min_size, stride, max_pixels): model/network/transforms.py's VAE_TRANSFORM.
BAGEL_INPUT_RESIZE = (1024, 512, 16, DEFAULT_MAX_PIXELS)
SIDECAR = "tiny_bagel_info.json"  # a generated checkpoint's own sizes (model/network/config.py reads it)


def checkpoint_input_resize(folder: str | Path) -> tuple[int, int, int, int]:
    """The VAE input rule of a checkpoint folder, read without torch: a generated (tiny)
    checkpoint's sidecar may name its own (`vae_transform`), a BAGEL checkpoint has BAGEL's. The
    API stores uploads, and records an edit's size, by it (STROKES_UPLOAD_RESIZE)."""
    sidecar = Path(folder) / SIDECAR
    if not sidecar.is_file():
        return BAGEL_INPUT_RESIZE
    rule = json.loads(sidecar.read_text()).get("vae_transform")
    if not rule:
        return BAGEL_INPUT_RESIZE
    max_size, min_size, stride, *rest = rule
    return (int(max_size), int(min_size), int(stride), int(rest[0]) if rest else DEFAULT_MAX_PIXELS)


def resize_size(
    width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int | None = None
) -> tuple[int, int]:
    """The (width, height) MaxLongEdgeMinShortEdgeResize gives an image of this size (no clamp if None)."""

    def apply(w: int, h: int, scale: float) -> tuple[int, int]:
        def divisible(v: int) -> int:
            return max(stride, int(round(v / stride) * stride))

        return divisible(round(w * scale)), divisible(round(h * scale))

    scale = max(min(max_size / max(width, height), 1.0), min_size / min(width, height))
    w, h = apply(width, height, scale)
    if max_pixels is not None and w * h > max_pixels:
        w, h = apply(w, h, max_pixels / (w * h))  # an area ratio used as a linear scale: the quirk
    if max(w, h) > max_size:
        w, h = apply(w, h, max_size / max(w, h))  # may push the short side below min_size
    return w, h


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of img; RGBA or palette/grey transparency is composited on white."""
    if img.mode == "RGBA" or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    return img.convert("RGB")
