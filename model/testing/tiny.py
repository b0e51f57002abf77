"""Write a random BAGEL checkpoint in the official layout, small enough for tests, demos and CI.

`make_tiny(folder)` writes ema.safetensors (every key of the real model, at small sizes),
ae.safetensors (the FLUX autoencoder keys), llm_config.json, vit_config.json (one layer more than
used, as the official files), the project's own small tokenizer, and the sidecar
tiny_bagel_info.json with the sizes the official loader hard-codes (VAE, image transforms). The
same seed writes the same files. Presets: `tiny` (the golden checkpoint's geometry) and `small`
(the shared CPU benchmark configuration of DESIGN.md section 5).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from strokes.model.network.bagel import Bagel
from strokes.model.network.config import SIDECAR, BagelConfig, LLMConfig, ViTConfig
from strokes.model.network.transforms import ImageTransform
from strokes.model.network.vae import AutoEncoder, VAEConfig
from strokes.model.testing.tiny_tokenizer import write_tiny_tokenizer


@dataclass(frozen=True)
class TinySizes:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    bpe_vocab: int = 384
    vit_hidden: int = 32
    vit_layers: int = 2
    vit_heads: int = 2
    vit_intermediate: int = 64
    vae_ch: int = 32
    vae_ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    vae_transform: tuple[int, int, int] = (128, 64, 16)
    vit_transform: tuple[int, int, int] = (112, 56, 14)


PRESETS = {
    "tiny": TinySizes(),
    "small": TinySizes(
        hidden=512,
        layers=8,
        heads=8,
        kv_heads=2,
        intermediate=1408,
        bpe_vocab=768,
        vit_hidden=256,
        vit_layers=4,
        vit_heads=4,
        vit_intermediate=1024,
        vae_ch=64,
        vae_ch_mult=(1, 2, 4, 4),
        vae_transform=(512, 256, 16),
        vit_transform=(490, 112, 14),
    ),
}

SPECIAL_TOKENS = 5  # <|endoftext|> and BAGEL's four, right after the BPE vocabulary


def tiny_config(sizes: TinySizes) -> BagelConfig:
    vocab = sizes.bpe_vocab + SPECIAL_TOKENS
    vocab += -vocab % 8  # padding rows after the tokenizer's ids, as in the real model
    return BagelConfig(
        llm=LLMConfig(
            hidden_size=sizes.hidden,
            intermediate_size=sizes.intermediate,
            num_layers=sizes.layers,
            num_heads=sizes.heads,
            num_kv_heads=sizes.kv_heads,
            vocab_size=vocab,
            max_position_embeddings=4096,
        ),
        vit=ViTConfig(
            hidden_size=sizes.vit_hidden,
            intermediate_size=sizes.vit_intermediate,
            num_layers=sizes.vit_layers,
            num_heads=sizes.vit_heads,
        ),
        vae=replace(VAEConfig(), ch=sizes.vae_ch, ch_mult=tuple(sizes.vae_ch_mult)),
        vae_transform=ImageTransform(*sizes.vae_transform),
        vit_transform=ImageTransform(*sizes.vit_transform),
    )


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Small random weights (std 0.02, as Qwen2's initializer_range), norms at one, biases small."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("pos_embed"):
                continue
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(
                    0.02 * torch.randn(p.shape, generator=generator)
                    if p.ndim > 1
                    else 0.01 * torch.randn(p.shape, generator=generator)
                )


def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def make_tiny(
    folder: str | Path, seed: int = 0, sizes: TinySizes | str = "tiny", dtype: torch.dtype = torch.float32
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = PRESETS[sizes] if isinstance(sizes, str) else sizes
    cfg = tiny_config(sizes)
    generator = torch.Generator().manual_seed(seed)

    model = Bagel(cfg)
    _randomize(model, generator)
    model.init_position_tables()
    vae = AutoEncoder(cfg.vae)
    with torch.no_grad():  # the VAE keeps PyTorch's default init, scaled so activations stay sane
        for p in vae.parameters():
            p.copy_(
                torch.randn(p.shape, generator=generator) * (0.02 if p.ndim == 1 else p[0].numel() ** -0.5)
            )
    save_file(
        {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(folder / "ema.safetensors")
    )
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "ae.safetensors"))

    write_tiny_tokenizer(folder, vocab_size=sizes.bpe_vocab)
    llm, vit = cfg.llm, cfg.vit
    _json(
        folder / "llm_config.json",
        {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": llm.hidden_size,
            "intermediate_size": llm.intermediate_size,
            "num_hidden_layers": llm.num_layers,
            "num_attention_heads": llm.num_heads,
            "num_key_value_heads": llm.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": llm.max_position_embeddings,
            "rms_norm_eps": llm.rms_norm_eps,
            "rope_theta": llm.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "vocab_size": llm.vocab_size,
            "torch_dtype": str(dtype).removeprefix("torch."),
        },
    )
    _json(
        folder / "vit_config.json",
        {
            "model_type": "siglip_vision_model",
            "hidden_size": vit.hidden_size,
            "intermediate_size": vit.intermediate_size,
            "num_hidden_layers": vit.num_layers + 1,
            "num_attention_heads": vit.num_heads,
            "num_channels": 3,
            "image_size": vit.image_size,
            "patch_size": vit.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": vit.layer_norm_eps,
            "attention_dropout": 0.0,
        },
    )
    vae_params = asdict(cfg.vae)
    vae_params["ch_mult"] = list(vae_params["ch_mult"])
    _json(
        folder / SIDECAR,
        {
            "note": "not part of the official layout: sizes the official loader hard-codes, for tiny checkpoints",
            "vae_params": vae_params,
            "bagel_config": {
                "latent_patch_size": cfg.latent_patch_size,
                "max_latent_size": cfg.max_latent_size,
                "vit_max_num_patch_per_side": cfg.vit_max_num_patch_per_side,
            },
            "vae_transform": list(sizes.vae_transform),
            "vit_transform": list(sizes.vit_transform),
            "seed": seed,
        },
    )
    return folder
