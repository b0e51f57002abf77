"""The FLUX autoencoder that BAGEL uses as its VAE, computed as the official BAGEL code does.

Contract:
- `AutoEncoder(cfg)` holds exactly the parameters of the checkpoint's ae.safetensors (FLUX key names:
  encoder.down.{i}.block.{j}.conv1, decoder.mid.attn_1.q, ...), so `load_state_dict(sd, strict=True)`
  accepts it unchanged. The real model is `VAEConfig()`; a tiny checkpoint overrides ch, ch_mult and
  num_res_blocks with `dataclasses.replace`.
- `encode_moments(x)`: image x (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, Z, H/8, W/8).
- `encode(x, noise)`: samples the posterior as the reference's `DiagonalGaussian(sample=True)`,
  `mean + exp(0.5 * logvar) * noise` (logvar is NOT clamped: the reference does not clamp it), with
  `noise` the caller's draw of mean's shape (the reference uses `torch.randn_like(mean)`); noise None
  takes the mean. Then `scale_factor * (z - shift_factor)`.
- `decode(z)`: `z / scale_factor + shift_factor`, then the decoder -> image (B, 3, H, W), about [-1, 1].
- Runs in the dtype and on the device of its parameters (float32 or bfloat16, CPU or CUDA); H and W
  must be multiples of 2**(len(ch_mult) - 1) (8 for the real model).

Shape letters: B batch, C channels, H W spatial size at the current level, Z latent channels (16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class VAEConfig:
    resolution: int = 256  # unused by the computation; kept because FLUX's params carry it
    in_channels: int = 3
    downsample: int = 8  # 2 ** (len(ch_mult) - 1): pixels per latent cell
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with C-dim queries/keys (scale 1/sqrt(C))."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # one head of width C; contiguous as in the reference, which fused SDPA kernels prefer
        q = self.q(h).reshape(B, 1, C, H * W).transpose(2, 3).contiguous()  # (B, 1, H*W, C)
        k = self.k(h).reshape(B, 1, C, H * W).transpose(2, 3).contiguous()  # (B, 1, H*W, C)
        v = self.v(h).reshape(B, 1, C, H * W).transpose(2, 3).contiguous()  # (B, 1, H*W, C)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        a = a.transpose(2, 3).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(a)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = _conv3(cin, cout)
        self.norm2 = _norm(cout)
        self.conv2 = _conv3(cout, cout)
        self.nin_shortcut = nn.Conv2d(cin, cout, kernel_size=1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: resnet blocks, then an optional resampler (named as in the checkpoint)."""

    def __init__(self, cin: int, cout: int, n_blocks: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(n_blocks))
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """(B, 3, H, W) -> moments (B, 2Z, H/8, W/8): mean then logvar along channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.ch_mult
        self.conv_in = _conv3(cfg.in_channels, cfg.ch)
        chans = [cfg.ch * m for m in (1, *mult)]  # chans[i] -> chans[i + 1] at level i
        last = len(mult) - 1
        self.down = nn.ModuleList(
            _Level(chans[i], chans[i + 1], cfg.num_res_blocks, "down" if i != last else None)
            for i in range(len(mult))
        )
        c = chans[-1]
        self.mid = _Mid(c)
        self.norm_out = _norm(c)
        self.conv_out = _conv3(c, 2 * cfg.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, Z, h, w) -> (B, 3, 8h, 8w). up[i] is level i (up[0] at full resolution); runs from the last."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.ch_mult
        n = len(mult)
        c = cfg.ch * mult[-1]
        self.conv_in = _conv3(cfg.z_channels, c)
        self.mid = _Mid(c)
        levels: list[_Level] = []
        for i in reversed(range(n)):
            cout = cfg.ch * mult[i]
            levels.insert(0, _Level(c, cout, cfg.num_res_blocks + 1, "up" if i != 0 else None))
            c = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = _conv3(c, cfg.out_ch)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.scale_factor = cfg.scale_factor
        self.shift_factor = cfg.shift_factor

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, Z, H/8, W/8)."""
        moments = self.encoder(x)  # (B, 2Z, H/8, W/8)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, logvar

    def encode(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """x (B, 3, H, W) -> scaled latent (B, Z, H/8, W/8); noise (B, Z, H/8, W/8) samples the posterior."""
        mean, logvar = self.encode_moments(x)
        return self.posterior(mean, logvar, noise)

    def posterior(self, mean: Tensor, logvar: Tensor, noise: Tensor | None = None) -> Tensor:
        """Moments (B, Z, h, w) -> the scaled latent: the mean, or the sample with `noise`."""
        if noise is None:
            z = mean
        else:
            if noise.shape != mean.shape:
                raise ValueError(
                    f"posterior noise has shape {tuple(noise.shape)}, expected {tuple(mean.shape)}"
                )
            z = mean + torch.exp(0.5 * logvar) * noise.to(device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent (B, Z, h, w) -> image (B, 3, 8h, 8w), nominally in [-1, 1]."""
        z = z / self.scale_factor + self.shift_factor
        return self.decoder(z)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x, noise))
