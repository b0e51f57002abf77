"""Inference primitives of BAGEL on explicit KV caches: append text and images, decode text,
generate images. The engine yields steps and never does I/O.

Shapes: N=latent tokens of an image (h*w, 16 px each), P=packed latent channels (64),
E=LLM hidden, V=vocabulary.

A context is a `KVCache` (appendable) or a `Prefix` of one (read-only). Layouts follow the
reference exactly (BAGEL.md 2.3-4.3): a text is T(x) = <|im_start|> x <|im_end|> at consecutive
positions; an image block is <|vision_start|> tokens <|vision_end|>, every token at the context's
current position, which then advances by one. Generation reads up to three contexts (cond,
text-unconditional, image-unconditional) and never commits to them (each step's block goes into
room after each context, `branch_rooms`); its branches run batched in one forward by default
(`batch_branches`), one after another like the reference, or one per device (`branch_group`,
model/parallel.py). Text decodes through the static decoder on GPU (CUDA graphs per length
bucket, kept across a job's stages). No step of the denoising loop waits for the GPU.

Randomness is explicit: every draw comes from a caller's CPU `torch.Generator` in the reference's
order (VAE posterior noise, then initial latent noise), or the caller passes the tensors; so one
seed gives the same noise on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from model.bagel import Bagel
from model.config import BagelConfig
from model.kv_cache import Context, KVCache, branch_rooms
from model.params import ImageSettings
from model.sampler import combine_guidance, euler_step, guidance_scales, sample_token, timestep_schedule
from model.static_decode import StaticDecoder
from model.tokenizer import BagelTokenizer
from model.transforms import (
    latent_position_ids,
    pack_latent,
    patchify_vit,
    to_rgb,
    to_uint8,
    unpack_latent,
    vit_position_ids,
)
from model.vae import AutoEncoder


class Cancelled(Exception):
    """The caller's cancellation check returned True between two tokens or denoising steps."""


ShouldCancel = Callable[[], bool]


def _never() -> bool:
    return False


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


@dataclass
class TextStep:
    token: int
    delta: str
    logits: torch.Tensor = field(repr=False)  # (V,) before sampling


@dataclass
class FlowStep:
    """One Euler step; the branch predictions are kept only when tracing."""

    index: int  # 0-based
    total: int  # steps - 1
    t: float
    x_t: torch.Tensor | None = field(default=None, repr=False)  # (N, P) input latent
    v_cond: torch.Tensor | None = field(default=None, repr=False)
    v_text_uncond: torch.Tensor | None = field(default=None, repr=False)
    v_img_uncond: torch.Tensor | None = field(default=None, repr=False)
    v: torch.Tensor | None = field(default=None, repr=False)  # combined velocity
    preview: np.ndarray | None = field(default=None, repr=False)  # small uint8 image of the predicted x0


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
        # Decode with static shapes on GPU (CUDA graphs per length bucket, kept for the job's cache
        # across its text stages); eager elsewhere. Tests turn it on on the CPU (no graphs there).
        self.static_decode = model.device.type == "cuda"
        self.use_graphs = True
        self._decoder: StaticDecoder | None = None
        self._markers: torch.Tensor | None = None  # (2,) <|vision_start|>, <|vision_end|> ids on the device
        # Several devices (model/parallel.py): None, or a group that runs one branch per rank.
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

    def _image_block(self, inner: torch.Tensor) -> torch.Tensor:
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
        block = self._image_block(self.model.embed_latents(latent, 0.0, pos))  # (1, N+2, E)
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
        block = self._image_block(inner)
        cache.reserve(block.shape[1])
        self.model.language_model.forward_block(block, [cache])
        cache.advance(block.shape[1], 1)
        return VitAppend(block.shape[1], patches, vit_out, connected)

    @property
    def vae_device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # ---- text decoding ------------------------------------------------------------------------
    def decode_stepper(self, cache: KVCache, tokens: int) -> Callable[[int], torch.Tensor]:
        """A function feeding one token at the cache's end and returning the next logits (V,);
        room for `tokens` steps is reserved first so the static decoder's storage stays put. The
        static decoder (and its graphs) is reused while the cache keeps its storage: across the
        text stages of a job whose caches were sized from its budget."""
        cache.reserve(tokens)
        if not self.static_decode:
            return lambda token: self.append_ids(cache, [token])
        if self._decoder is None or not self._decoder.bound_to(cache):
            self._decoder = None  # drop the old graphs before capturing new ones
            self._decoder = StaticDecoder(self.model, cache, use_graph=self.use_graphs)
        return self._decoder.step

    def decode_text(
        self,
        cache: KVCache,
        *,
        max_tokens: int,
        do_sample: bool = False,
        temperature: float = 0.3,
        generator: torch.Generator | None = None,
        stop_ids: tuple[int, ...] | None = None,
        should_cancel: ShouldCancel = _never,
        logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
        commit: bool = True,
    ) -> TextDecoding:
        return TextDecoding(
            self,
            cache,
            max_tokens,
            do_sample,
            temperature,
            generator,
            stop_ids or (self.tokenizer.eos_id,),
            should_cancel,
            logits_processor,
            commit,
        )

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
        should_cancel: ShouldCancel = _never,
        trace: bool = False,
        preview_every: int = 0,
    ) -> ImageGeneration:
        return ImageGeneration(
            self,
            cond,
            text_uncond,
            img_uncond,
            height,
            width,
            settings,
            noise,
            generator,
            should_cancel,
            trace,
            preview_every,
        )

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


class VisibleText:
    """The one rule for what of a decoded text the client sees, applied alike to the streamed
    pieces (TextStep.delta) and to the final text: after <|im_start|>, up to the next
    <|im_start|> or <|im_end|> (control-token pieces are dropped, and so is what follows them).
    So the deltas concatenate to exactly `TextDecoding.text`."""

    def __init__(self, bos_text: str, eos_text: str):
        self.bos, self.eos = bos_text, eos_text
        self.raw = bos_text  # everything decoded so far, as the reference decodes it
        self.sent = ""  # the visible text handed out as deltas
        self.cut = False  # a control token ended the visible text

    def rule(self, raw: str) -> str:
        return raw.split(self.eos)[0].split(self.bos)[1]

    def push(self, piece: str) -> str:
        if self.cut or not piece:
            return ""
        self.raw += piece
        text = self.rule(self.raw)
        self.cut = len(self.raw) > len(self.bos) + len(text)  # something was cut off
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def rest(self, text: str) -> str:
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


class TextDecoding:
    """Decode text token by token after `cache`; iterate for `TextStep`s.

    Tokens are fed into the cache in place (the first is <|im_start|> at the context's position).
    It stops when a token in `stop_ids` is sampled (it is neither kept nor fed) or after
    `max_tokens` new tokens. Then, like the reference, the decode scratch is dropped and the decoded
    string is re-tokenised and prefilled as T(text) when `commit` (so a cache that reused the decode
    equals one rebuilt from the texts). Afterwards: `ids`, `text`, `stop_token` (None: length
    limit), `prefilled` tokens and `next_logits` (what the model predicts after the committed text).
    """

    def __init__(
        self,
        engine: Engine,
        cache: KVCache,
        max_tokens,
        do_sample,
        temperature,
        generator,
        stop_ids,
        should_cancel,
        logits_processor,
        commit,
    ):
        self.engine, self.cache = engine, cache
        self.max_tokens, self.do_sample, self.temperature = max_tokens, do_sample, temperature
        self.generator, self.stop_ids, self.should_cancel = generator, stop_ids, should_cancel
        self.logits_processor, self.commit = logits_processor, commit
        self.ids: list[int] = []
        self.text = ""
        self.stop_token: int | None = None
        self.prefilled = 0
        self.next_logits: torch.Tensor | None = None

    def __iter__(self) -> Iterator[TextStep]:
        engine, cache, tok = self.engine, self.cache, self.engine.tokenizer
        start = (cache.length, cache.rope)
        stream = tok.stream_decoder()
        bos_text, eos_text = tok.decode([tok.bos_id]), tok.decode([tok.eos_id])
        visible = VisibleText(bos_text, eos_text)
        token = tok.bos_id
        step = engine.decode_stepper(cache, self.max_tokens)
        try:
            for _ in range(self.max_tokens):
                if self.should_cancel():
                    raise Cancelled
                logits = step(token)  # (V,)
                if self.logits_processor is not None:
                    logits = self.logits_processor(self.ids, logits)
                token = sample_token(logits, self.do_sample, self.temperature, self.generator)
                if token in self.stop_ids:
                    self.stop_token = token
                    break
                self.ids.append(token)
                yield TextStep(token, visible.push(stream.push(token)), logits)
            tail = visible.push(stream.flush())
            if tail:
                yield TextStep(-1, tail, torch.empty(0))
        finally:
            cache.truncate(*start)
        # The reference's result: decode(bos + ids), cut at <|im_end|>, after <|im_start|>.
        self.text = visible.rule(tok.decode([tok.bos_id, *self.ids]))
        rest = visible.rest(self.text)  # what the streamed pieces lacked (a decoder's clean-up)
        if rest:
            yield TextStep(-1, rest, torch.empty(0))
        if self.commit:
            self.prefilled, self.next_logits = engine.append_generated_text(cache, self.text)


class ImageGeneration:
    """Denoise one image with up to three guidance contexts; iterate for `FlowStep`s.

    Afterwards `latent` (N, P) holds the final packed latent and `pixels` the decoded uint8 image.
    `img_uncond` may be the very same object as `cond` (BAGEL's plain text-to-image, where the
    image-unconditional context equals the conditional one): its prediction is then reused, not
    recomputed.
    """

    def __init__(
        self,
        engine: Engine,
        cond,
        text_uncond,
        img_uncond,
        height,
        width,
        settings: ImageSettings,
        noise,
        generator,
        should_cancel,
        trace,
        preview_every=0,
    ):
        cfg = engine.cfg
        ds = cfg.latent_downsample
        if height % ds or width % ds:
            raise ValueError(f"image height and width must be multiples of {ds}, got {height}x{width}")
        if max(height, width) > cfg.max_image_side:
            raise ValueError(f"image sides must be at most {cfg.max_image_side}, got {height}x{width}")
        self.engine, self.contexts = engine, (cond, text_uncond, img_uncond)
        self.height, self.width, self.settings = height, width, settings
        self.h, self.w = height // ds, width // ds
        n = self.h * self.w
        if noise is None:
            noise = torch.randn(n, cfg.patch_latent_dim, generator=generator)
        if tuple(noise.shape) != (n, cfg.patch_latent_dim):
            raise ValueError(f"noise must have shape {(n, cfg.patch_latent_dim)}, got {tuple(noise.shape)}")
        self.noise = noise
        self.should_cancel, self.trace, self.preview_every = should_cancel, trace, preview_every
        self.latent: torch.Tensor | None = None
        self.pixels: np.ndarray | None = None
        self.forwards = 0  # branch forwards run

    def _velocities(self, block: torch.Tensor, branches: list[Context]) -> list[torch.Tensor]:
        """One (N, P) prediction per branch context, batched in one forward or one after another
        like the reference (several devices: `BranchGroup.step` instead)."""
        lm, model = self.engine.model.language_model, self.engine.model
        gen = slice(1, block.shape[1] - 1)
        if self.engine.batch_branches:
            hidden = lm.forward_block(block.expand(len(branches), -1, -1), branches, gen=gen)  # (B, N+2, E)
            v = model.velocity(hidden[:, gen])  # (B, N, P)
            return list(v.unbind(0))
        return [model.velocity(lm.forward_block(block, [ctx], gen=gen)[0, gen]) for ctx in branches]

    def _branch_counts(self, ts: torch.Tensor) -> list[int]:
        """How many branches each step runs (decided on the CPU copy of the schedule)."""
        s, same = self.settings, self.contexts[2] is self.contexts[0]
        counts = []
        for t in ts:
            text_scale, img_scale = guidance_scales(t, s.cfg_text_scale, s.cfg_img_scale, s.cfg_interval)
            counts.append(1 if text_scale <= 1.0 else 3 if img_scale > 1.0 and not same else 2)
        return counts

    @torch.inference_mode()
    def __iter__(self) -> Iterator[FlowStep]:
        engine, s = self.engine, self.settings
        cond, text_uncond, img_uncond = self.contexts
        device = engine.device
        pos = latent_position_ids(self.h, self.w, engine.cfg.max_latent_size).to(device)
        x = self.noise.to(device, torch.float32)  # (N, P), the ODE state stays float32
        ts, dts = timestep_schedule(s.steps, s.timestep_shift)  # CPU: decisions and event values
        ts_dev, dts_dev = ts.to(device), dts.to(device)  # copied once, not once per step
        counts = self._branch_counts(ts)
        # Each branch reads its context plus room for the block, set up once for the whole image
        # (several devices: on the rank that runs the branch).
        contexts, room = [cond, text_uncond, img_uncond][: max(counts)], self.h * self.w + 2
        group = engine.branch_group
        if group is None:
            rooms = branch_rooms(contexts, room)
        else:
            group.start_image(contexts, room, self.h, self.w)
        try:
            yield from self._denoise(x, pos, ts, ts_dev, dts_dev, counts, rooms if group is None else None)
        finally:
            if group is not None:
                group.end_image()

    def _denoise(self, x, pos, ts, ts_dev, dts_dev, counts, rooms) -> Iterator[FlowStep]:
        engine, s, group = self.engine, self.settings, self.engine.branch_group
        for i in range(len(ts)):
            if self.should_cancel():
                raise Cancelled
            t = ts[i]
            text_scale, img_scale = guidance_scales(t, s.cfg_text_scale, s.cfg_img_scale, s.cfg_interval)
            if group is not None:
                v_all = group.step(x, ts_dev[i : i + 1], counts[i])
            else:
                block = engine._image_block(
                    engine.model.embed_latents(x, ts_dev[i : i + 1], pos)
                )  # (1, N+2, E)
                v_all = self._velocities(block, rooms[: counts[i]])
            self.forwards += counts[i]
            c = v_all[0].float()
            ut = v_all[1].float() if text_scale > 1.0 else None
            ui = (v_all[2].float() if len(v_all) > 2 else c) if text_scale > 1.0 and img_scale > 1.0 else None
            v = combine_guidance(c, ut, ui, text_scale, img_scale, s.cfg_renorm_type, s.cfg_renorm_min)
            step = FlowStep(i, len(ts), float(t))
            if self.trace:
                step.x_t, step.v_cond, step.v_text_uncond, step.v_img_uncond, step.v = x, c, ut, ui, v
            if self.preview_every and (i + 1) % self.preview_every == 0 and i + 1 < len(ts):
                step.preview = self._preview(x - ts_dev[i] * v)  # x0 = x_t - t v (the event needs it)
            x = euler_step(x, v, dts_dev[i])
            yield step
        self.latent = x
        self.pixels = engine.decode_latent(x, self.height, self.width)

    def _preview(self, x0: torch.Tensor, side: int = 256) -> np.ndarray:
        """The current estimate of the clean image, at most `side` pixels on its long edge."""
        pixels = Image.fromarray(self.engine.decode_latent(x0, self.height, self.width))
        pixels.thumbnail((side, side), Image.Resampling.BICUBIC)
        return np.asarray(pixels)
