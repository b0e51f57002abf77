"""Inference primitives of BAGEL on explicit KV caches: append text and images to a context, decode
a latent to pixels, and start the two loops built on them: text decoding (model/generation/text_decoding.py)
and image generation (model/generation/image_generation.py). The engine yields steps and never does I/O.

Shapes: N=latent tokens of an image (h*w, 16 px each), P=packed latent channels (64), M=ViT
patches, C=ViT hidden, E=LLM hidden, V=vocabulary.

A context is a `KVCache` (appendable) or a `Prefix` of one (read-only). Layouts follow the
reference exactly (BAGEL.md 2.3-4.3): a text is T(x) = <|im_start|> x <|im_end|> at consecutive
positions; an image block is <|vision_start|> tokens <|vision_end|>, every token at the context's
current position, which then advances by one. Image generation reads up to three contexts and never
commits to them; its branches run batched (`batch_branches`) or one per device (`branch_group`,
model/generation/parallel.py). Text decodes through the static decoder on GPU (CUDA graphs per length bucket
on the decoder's own arena, kept across jobs).

Randomness is explicit: every draw comes from a caller's CPU `torch.Generator` in the reference's
order (VAE posterior noise, then initial latent noise), or the caller passes the tensors; so one
seed gives the same noise on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from strokes.model.generation.cancel import ShouldCancel, never
from strokes.model.generation.image_generation import ImageGeneration, ImageGenerationOptions
from strokes.model.generation.text_decoding import LogitsProcessor, TextDecoding, TextDecodingOptions
from strokes.model.network.bagel import Bagel
from strokes.model.network.config import BagelConfig
from strokes.model.network.kv_cache import Context, KVCache
from strokes.model.network.static_decode import StaticDecoder
from strokes.model.network.tokenizer import BagelTokenizer
from strokes.model.network.transforms import (
    latent_position_ids,
    pack_latent,
    patchify_vit,
    to_uint8,
    unpack_latent,
    vit_position_ids,
)
from strokes.model.network.vae import AutoEncoder
from strokes.model.spec.params import ImageSettings
from strokes.model.spec.sizing import to_rgb


@dataclass
class VaeAppend:
    tokens: int
    image: torch.Tensor  # (3, H, W) in [-1, 1], the VAE input
    latent: torch.Tensor  # (N, P) packed clean latent
    noise: torch.Tensor  # (1, 16, H/8, W/8) the posterior draw used (replay it to rebuild the context)


@dataclass
class VitAppend:
    tokens: int
    patches: torch.Tensor  # (M, 14*14*3)
    vit_out: torch.Tensor  # (M, C)
    connector_out: torch.Tensor  # (M, E)


class Engine:
    def __init__(
        self,
        model: Bagel,
        vae: AutoEncoder,
        tokenizer: BagelTokenizer,
        *,
        batch_branches: bool = True,
        vae_dtype: torch.dtype = torch.float32,
    ):
        self.model = model.eval()
        self.vae = vae.eval()
        self.tokenizer = tokenizer
        self.cfg: BagelConfig = model.cfg
        self.batch_branches = batch_branches
        self.vae_dtype = vae_dtype
        self.weights = "bf16"  # "fp8" once the decoder layers are quantized (model/network/fp8.py)
        # Decode with static shapes on GPU (CUDA graphs per length bucket on the decoder's own arena,
        # kept across jobs); eager elsewhere. Tests turn it on on the CPU (no graphs there).
        self.static_decode = model.device.type == "cuda"
        self.use_graphs = True
        # The static decoder's attention (model/network/static_decode.py): None picks flex when the
        # regions are compiled, else the masked SDPA.
        self.decode_kernel: str | None = None
        self._decoder: StaticDecoder | None = None
        self._markers: torch.Tensor | None = None  # (2,) <|vision_start|>, <|vision_end|> ids on the device
        # Several devices (model/generation/parallel.py): None, or a group that runs one branch per rank.
        self.branch_group = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def new_cache(self, capacity: int = 1024) -> KVCache:
        llm = self.cfg.llm
        return KVCache(
            llm.num_layers,
            llm.num_kv_heads,
            llm.head_dim,
            capacity=capacity,
            dtype=self.dtype,
            device=self.device,
        )

    # ---- context appends ----------------------------------------------------------------------
    @torch.inference_mode()
    def append_ids(self, cache: KVCache, ids: list[int]) -> torch.Tensor:
        """Prefill token ids (causal) after the cache; returns the last position's logits (V,)."""
        x = self.model.embed_tokens(torch.tensor(ids, device=self.device))[None]  # (1, T, E)
        cache.reserve(len(ids))
        hidden = self.model.language_model.forward_block(x, [cache], causal=True)
        cache.advance(len(ids), len(ids))
        return self.model.logits(hidden[0, -1])

    def append_text(self, cache: KVCache, text: str) -> int:
        """Append user text as T(text); special-token strings in it stay plain text. Returns tokens."""
        ids = self.tokenizer.segment(text)
        self.append_ids(cache, ids)
        return len(ids)

    def append_generated_text(self, cache: KVCache, text: str) -> tuple[int, torch.Tensor]:
        """Append the model's own decoded text as T(text), re-tokenised as the reference does (control
        tokens the model emitted stay control tokens). Returns (tokens, logits after <|im_end|>)."""
        tok = self.tokenizer
        ids = [tok.bos_id, *tok.hf_tokenizer.encode(text, add_special_tokens=False), tok.eos_id]
        return len(ids), self.append_ids(cache, ids)

    def prepare_image(self, image: Image.Image | np.ndarray) -> Image.Image:
        """An input image as the reference feeds it: RGB (transparency on white), VAE-resized."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return self.cfg.vae_transform.resize(to_rgb(image))

    def image_block(self, inner: torch.Tensor) -> torch.Tensor:
        """inner (N, E) -> (1, N + 2, E) with the <|vision_start|> / <|vision_end|> embeddings."""
        if self._markers is None:  # once: a host-to-device copy per denoising step would block
            tok = self.tokenizer
            with torch.inference_mode(False):  # a plain tensor: usable in and out of inference mode
                self._markers = torch.tensor([tok.start_of_image, tok.end_of_image], device=self.device)
        markers = self.model.embed_tokens(self._markers)  # (2, E)
        return torch.cat([markers[:1], inner.to(markers.dtype), markers[1:]])[None]

    @torch.inference_mode()
    def append_vae_image(
        self,
        cache: KVCache,
        image: Image.Image,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        resize: bool = True,
    ) -> VaeAppend:
        """Append an image as clean VAE latents (t = 0). The posterior is sampled as in the reference:
        `noise` (1, 16, H/8, W/8), or drawn from `generator` on the CPU. `resize=False` keeps an image
        that is already a valid generation size (a generated one) as it is."""
        cfg = self.cfg
        x = cfg.vae_transform(image) if resize else cfg.vae_transform.to_tensor(image)  # (3, H, W)
        h, w = x.shape[1] // cfg.latent_downsample, x.shape[2] // cfg.latent_downsample
        if noise is None:
            shape = (
                1,
                cfg.latent_channels,
                x.shape[1] // cfg.vae.downsample,
                x.shape[2] // cfg.vae.downsample,
            )
            noise = torch.randn(shape, generator=generator)
        dev = self.vae_device
        z = self.vae.encode(
            x[None].to(dev, self.vae_dtype), noise.to(dev, self.vae_dtype)
        )  # (1, 16, H/8, W/8)
        latent = pack_latent(
            z[0, :, : h * cfg.latent_patch_size, : w * cfg.latent_patch_size], cfg.latent_patch_size
        ).to(self.device)  # (N, P)
        pos = latent_position_ids(h, w, cfg.max_latent_size).to(self.device)
        block = self.image_block(self.model.embed_latents(latent, 0.0, pos))  # (1, N+2, E)
        cache.reserve(block.shape[1])
        self.model.language_model.forward_block(block, [cache], gen=slice(1, block.shape[1] - 1))
        cache.advance(block.shape[1], 1)
        return VaeAppend(block.shape[1], x, latent, noise)

    @torch.inference_mode()
    def append_vit_image(self, cache: KVCache, image: Image.Image) -> VitAppend:
        """Append an image as SigLIP tokens (the understanding path)."""
        cfg = self.cfg
        x = cfg.vit_transform(image)  # (3, H, W)
        patch = cfg.vit.patch_size
        patches = patchify_vit(x, patch).to(self.device)  # (M, 14*14*3)
        pos = vit_position_ids(x.shape[1] // patch, x.shape[2] // patch, cfg.vit_max_num_patch_per_side).to(
            self.device
        )
        vit_out, connected = self.model.vit_features(patches, pos)
        inner = connected + self.model.vit_pos_embed(pos).to(connected.dtype)  # (M, E)
        block = self.image_block(inner)
        cache.reserve(block.shape[1])
        self.model.language_model.forward_block(block, [cache])
        cache.advance(block.shape[1], 1)
        return VitAppend(block.shape[1], patches, vit_out, connected)

    @property
    def vae_device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # ---- text decoding ------------------------------------------------------------------------
    def decode_stepper(self, cache: KVCache, tokens: int) -> Callable[[int], torch.Tensor]:
        """A function feeding one token after the cache's committed tokens and returning the next
        logits (V,), for up to `tokens` steps. Eager: the tokens go into the cache (room reserved
        first; the caller truncates). Static: into the decoder's own arena, the cache only read;
        one decoder (and its CUDA graphs) serves every text stage of every job."""
        if not self.static_decode:
            cache.reserve(tokens)
            return lambda token: self.append_ids(cache, [token])
        kernel = self.decode_kernel or ("flex" if self.model.language_model.regions.compiled else "mask")
        if self._decoder is None or self._decoder.kernel != kernel:
            self._decoder = None  # drop the old graphs before capturing new ones
            self._decoder = StaticDecoder(
                self.model,
                use_graph=self.use_graphs,
                kernel=kernel,
                compiled=self.model.language_model.regions.compiled and self.device.type == "cuda",
            )
        return self._decoder.begin(cache, tokens)

    def decode_text(
        self,
        cache: KVCache,
        *,
        max_tokens: int,
        do_sample: bool = False,
        temperature: float = 0.3,
        generator: torch.Generator | None = None,
        stop_ids: tuple[int, ...] | None = None,
        should_cancel: ShouldCancel = never,
        logits_processor: LogitsProcessor | None = None,
        commit: bool = True,
    ) -> TextDecoding:
        """Decode text after `cache` (model/generation/text_decoding.py); `stop_ids` default to <|im_end|>."""
        options = TextDecodingOptions(
            max_tokens=max_tokens,
            do_sample=do_sample,
            temperature=temperature,
            generator=generator,
            stop_ids=stop_ids or (self.tokenizer.eos_id,),
            should_cancel=should_cancel,
            logits_processor=logits_processor,
            commit=commit,
        )
        return TextDecoding(self, cache, options)

    # ---- image generation ---------------------------------------------------------------------
    def generate_image(
        self,
        cond: Context,
        text_uncond: Context,
        img_uncond: Context,
        *,
        height: int,
        width: int,
        settings: ImageSettings,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        should_cancel: ShouldCancel = never,
        trace: bool = False,
        preview_every: int = 0,
    ) -> ImageGeneration:
        """Generate an image under the three contexts (model/generation/image_generation.py)."""
        options = ImageGenerationOptions(
            height=height,
            width=width,
            settings=settings,
            noise=noise,
            generator=generator,
            should_cancel=should_cancel,
            trace=trace,
            preview_every=preview_every,
        )
        return ImageGeneration(self, cond, text_uncond, img_uncond, options)

    @torch.inference_mode()
    def decode_latent(self, latent: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Packed latent (N, P) -> uint8 image (H, W, 3), truncating like the reference."""
        cfg = self.cfg
        h, w = height // cfg.latent_downsample, width // cfg.latent_downsample
        z = unpack_latent(
            latent.float(), h, w, cfg.latent_patch_size, cfg.latent_channels
        )  # (1, 16, H/8, W/8)
        pixels = self.vae.decode(z.to(self.vae_device, self.vae_dtype))  # (1, 3, H, W)
        return to_uint8(pixels.float())
