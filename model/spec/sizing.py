"""The official BAGEL input-image size rule and RGB conversion, without torch.

They live apart from model/network/transforms.py (which applies them with torch) so that the API
process, which must not import torch, reduces uploads with exactly the rule the model applies (service/shared/images.py).
"""

from __future__ import annotations

from PIL import Image

# The official ImageTransform's default max_pixels, used by both the VAE and the ViT transform.
DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024


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
