"""Image preprocessing and latent packing rules of the official BAGEL code, as pure functions.

Contract (all reproduce the reference bit for bit in float32):
- The size rule (`resize_size`) and `to_rgb` live in model/spec/sizing.py, torch-free for the API.
- `ImageTransform(max_size, min_size, stride, max_pixels)`: resize (PIL bicubic, which is what
  torchvision's functional resize does to a PIL image) then ToTensor + Normalize(0.5, 0.5), giving
  (3, H, W) float32 in [-1, 1]. Real instances: `VAE_TRANSFORM` and `VIT_TRANSFORM`; the reference
  applies the ViT one to the image already resized by the VAE one (two resizes in a row).
- `patchify_vit` / `pack_latent`: einsum "chpwq->hwpqc", so a patch vector is ordered (py, px, c) and
  patches go row-major; `unpack_latent` inverts `pack_latent` with a batch axis of 1.
- `vit_position_ids` / `latent_position_ids`: row * max_per_side + col over the patch grid.
- `to_uint8`: `(x * 0.5 + 0.5).clamp(0, 1) * 255`, then a TRUNCATING cast to uint8, as the reference.

Shape letters: H W image size in pixels, h w patch-grid size, p patch side, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from strokes.model.spec.sizing import DEFAULT_MAX_PIXELS, resize_size  # torch-free, so the API can use them


@dataclass(frozen=True)
class ImageTransform:
    max_size: int
    min_size: int
    stride: int
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def size(self, width: int, height: int) -> tuple[int, int]:
        return resize_size(width, height, self.max_size, self.min_size, self.stride, self.max_pixels)

    def resize(self, img: Image.Image) -> Image.Image:
        w, h = self.size(*img.size)
        if (w, h) == img.size:
            return img  # torchvision returns the image untouched when the size already matches
        return img.resize((w, h), resample=Image.Resampling.BICUBIC)

    @staticmethod
    def to_tensor(img: Image.Image) -> Tensor:
        """RGB PIL image -> (3, H, W) float32 in [-1, 1] (ToTensor, then Normalize(0.5, 0.5))."""
        a = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # (H, W, 3)
        x = torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        return x.to(torch.float32).div(255).sub_(0.5).div_(0.5)

    def __call__(self, img: Image.Image) -> Tensor:
        return self.to_tensor(self.resize(img))


VAE_TRANSFORM = ImageTransform(1024, 512, 16, max_pixels=DEFAULT_MAX_PIXELS)
VIT_TRANSFORM = ImageTransform(980, 224, 14, max_pixels=DEFAULT_MAX_PIXELS)


def _patchify(x: Tensor, p: int) -> Tensor:
    C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"size {H}x{W} is not a multiple of the patch size {p}")
    x = x.reshape(C, H // p, p, W // p, p)  # (C, h, p, w, p)
    x = torch.einsum("chpwq->hwpqc", x)  # (h, w, p, p, C)
    return x.reshape(-1, p * p * C)  # (h*w, p*p*C)


def _grid_position_ids(h: int, w: int, max_per_side: int) -> Tensor:
    rows = torch.arange(h, dtype=torch.long)
    cols = torch.arange(w, dtype=torch.long)
    return (rows[:, None] * max_per_side + cols).flatten()  # (h*w,)


def patchify_vit(x: Tensor, patch: int) -> Tensor:
    """Image (3, H, W) -> ViT patches (h*w, patch*patch*3), each ordered (py, px, c)."""
    return _patchify(x, patch)


def vit_position_ids(h: int, w: int, max_per_side: int) -> Tensor:
    """Patch grid h x w -> LongTensor (h*w,) of row * max_per_side + col."""
    return _grid_position_ids(h, w, max_per_side)


def pack_latent(z: Tensor, p: int = 2) -> Tensor:
    """Latent (C, H8, W8) -> tokens (h*w, p*p*C), h = H8/p, w = W8/p; index (py*p + px)*C + c."""
    return _patchify(z, p)


def unpack_latent(tokens: Tensor, h: int, w: int, p: int = 2, channels: int = 16) -> Tensor:
    """Tokens (h*w, p*p*C) -> latent (1, C, h*p, w*p), the inverse of pack_latent."""
    x = tokens.reshape(1, h, w, p, p, channels)  # (1, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (1, C, h, p, w, p)
    return x.reshape(1, channels, h * p, w * p)  # (1, C, h*p, w*p)


def latent_position_ids(h: int, w: int, max_latent_size: int) -> Tensor:
    """Latent token grid h x w -> LongTensor (h*w,) of row * max_latent_size + col."""
    return _grid_position_ids(h, w, max_latent_size)


def to_uint8(x: Tensor) -> np.ndarray:
    """Decoded image (1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8, truncating as the reference does.

    The arithmetic runs in x's dtype, as in the reference (pass x.float() for float32 arithmetic).
    """
    img = (x * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255  # (H, W, 3)
    return img.to(torch.uint8).cpu().numpy()
