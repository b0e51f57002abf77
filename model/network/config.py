"""Configuration of a BAGEL checkpoint folder, built from its own JSON files.

Reads llm_config.json and vit_config.json and applies what the official loader (app.py:39-60)
does to them: qk_norm on, untied lm_head, the Mixture-of-Transformers layer, one ViT layer fewer
than the JSON says (27 -> 26: the last layer is never used), and BAGEL's settings (latent patch 2,
max latent size 64, 70 ViT patches per side). Sizes the official loader hard-codes (the FLUX VAE,
the image transforms) are the real model's unless the optional sidecar `tiny_bagel_info.json`
(written for tiny test checkpoints) says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from strokes.model.network.transforms import VAE_TRANSFORM, VIT_TRANSFORM, ImageTransform
from strokes.model.network.vae import VAEConfig
from strokes.model.spec.budget import Geometry

SIDECAR = "tiny_bagel_info.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or inconsistent. The message names the file."""


@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2 decoder (each of the two experts has this geometry)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise CheckpointError("llm_config.json: hidden_size must be divisible by num_attention_heads")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                "llm_config.json: num_attention_heads must be divisible by num_key_value_heads"
            )
        object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)


@dataclass(frozen=True)
class ViTConfig:
    """The SigLIP vision tower, with the layer count BAGEL actually runs (JSON value minus one)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    head_dim: int = field(init=False)
    num_positions: int = field(init=False)  # rows of the learned position table
    patch_dim: int = field(init=False)  # length of one flattened patch (py, px, c)

    def __post_init__(self):
        object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        object.__setattr__(self, "num_positions", (self.image_size // self.patch_size) ** 2)
        object.__setattr__(self, "patch_dim", self.patch_size * self.patch_size * self.num_channels)


@dataclass(frozen=True)
class BagelConfig:
    llm: LLMConfig
    vit: ViTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_transform: ImageTransform = VAE_TRANSFORM
    vit_transform: ImageTransform = VIT_TRANSFORM
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    latent_downsample: int = field(init=False)  # pixels per generation token side (8 * 2 = 16)
    latent_channels: int = field(init=False)  # VAE z channels (16)
    patch_latent_dim: int = field(init=False)  # one packed latent token (2 * 2 * 16 = 64)

    def __post_init__(self):
        object.__setattr__(self, "latent_downsample", self.vae.downsample * self.latent_patch_size)
        object.__setattr__(self, "latent_channels", self.vae.z_channels)
        object.__setattr__(self, "patch_latent_dim", self.latent_patch_size**2 * self.vae.z_channels)

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample

    @property
    def geometry(self) -> Geometry:
        """What prices a generation on this model (model/spec/budget.py)."""
        return Geometry(latent_downsample=self.latent_downsample)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (is {path.parent} a BAGEL checkpoint folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _need(d: dict, key: str, path: Path):
    if key not in d:
        raise CheckpointError(f"{path}: missing key {key!r}")
    return d[key]


def llm_config_from_json(path: Path) -> LLMConfig:
    d = _read_json(path)
    if d.get("rope_scaling") not in (None, {}):
        raise CheckpointError(f"{path}: rope_scaling is not supported by BAGEL (found {d['rope_scaling']})")
    return LLMConfig(
        hidden_size=_need(d, "hidden_size", path),
        intermediate_size=_need(d, "intermediate_size", path),
        num_layers=_need(d, "num_hidden_layers", path),
        num_heads=_need(d, "num_attention_heads", path),
        num_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
        vocab_size=_need(d, "vocab_size", path),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=d.get("rope_theta", 1_000_000.0),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
    )


def vit_config_from_json(path: Path) -> ViTConfig:
    d = _read_json(path)
    return ViTConfig(
        hidden_size=_need(d, "hidden_size", path),
        intermediate_size=_need(d, "intermediate_size", path),
        num_layers=_need(d, "num_hidden_layers", path) - 1,  # BAGEL drops the last layer (app.py:46)
        num_heads=_need(d, "num_attention_heads", path),
        patch_size=d.get("patch_size", 14),
        image_size=d.get("image_size", 980),
        num_channels=d.get("num_channels", 3),
        layer_norm_eps=d.get("layer_norm_eps", 1e-6),
    )


def load_config(folder: str | Path) -> BagelConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    llm = llm_config_from_json(folder / "llm_config.json")
    vit = vit_config_from_json(folder / "vit_config.json")
    sidecar = folder / SIDECAR
    if not sidecar.is_file():
        return BagelConfig(llm=llm, vit=vit)
    info = _read_json(sidecar)
    vae = VAEConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in info.get("vae_params", {}).items()}
    )
    bagel = info.get("bagel_config", {})
    vae_t = info.get("vae_transform")
    vit_t = info.get("vit_transform")
    return BagelConfig(
        llm=llm,
        vit=vit,
        vae=vae,
        vae_transform=ImageTransform(*vae_t) if vae_t else VAE_TRANSFORM,
        vit_transform=ImageTransform(*vit_t) if vit_t else VIT_TRANSFORM,
        latent_patch_size=bagel.get("latent_patch_size", 2),
        max_latent_size=bagel.get("max_latent_size", 64),
        vit_max_num_patch_per_side=bagel.get("vit_max_num_patch_per_side", 70),
    )
