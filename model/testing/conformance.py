"""Replay golden cases recorded from the official BAGEL code and measure how far we are from them.

A golden folder holds tiny_ckpt/ (a checkpoint in the official layout) and cases/NAME.json +
NAME.safetensors (the format of the shipped golden/README.md). Two kinds of case are understood:

- single calls of the official `InterleaveInferencer` (the JSON has `call`): optional think system
  prompt, an optional input image, a text, then text decoding (understanding) or image generation;
- loop cases (the JSON has `stages`): a sequence of stages, each an optional decode or image
  generation followed by the recorded context operations (`ops`: add text / image to a context,
  snapshot one context into another).

Recorded random draws (`noise.K`) are injected in order. Our values are compared where the
reference recorded them: generated token ids (exact), decode logits, KV caches at every decode or
generation, ViT and VAE tensors, every denoising step's velocities, the final latent (all within
1e-4 x max(1, max |ref|)) and output images (within one level of 255).

`dtype="bfloat16"` runs the same replay in bfloat16 against the same float32 references, with the
bounds of `BF16_TOLERANCE` (docs/gpu.md): twice what the official code's own bfloat16 is from its
float32 on these cases, per quantity, max and mean. Tokens must agree only up to the first step
where the reference's top-1/top-2 logit gap is under 0.26 (there bf16 may pick the other); logits
are compared while the tokens agree. ViT, VAE and KV tensors have no official bf16 figure: they are
reported, not judged. This is a sanity bound for the fast path, not a proof of conformance.
FP8 weights (`weights="fp8"`, or emulated on the CPU) are judged the same way against
`FP8_TOLERANCE`; a case whose decoded text took the other side of a near tie is judged up to there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from strokes.model.generation.engine import Engine
from strokes.model.network.kv_cache import KVCache
from strokes.model.spec.params import ImageSettings
from strokes.model.spec.prompts import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT

RTOL = 1e-4  # of max(1, max |reference|)
IMAGE_LEVELS = 1

# 2 x the official code's bf16-vs-fp32 difference, worst over the golden cases (the numbers of
# golden/BF16.md, copied in docs/gpu.md): category -> (max, mean) absolute, for t2i and edit cases.
BF16_TOLERANCE = {
    "t2i": {"logits": (0.26, 0.06), "flow": (0.24, 0.04), "latent": (0.11, 0.02), "image": (14, 2.0)},
    "edit": {"logits": (0.26, 0.06), "flow": (0.6, 0.08), "latent": (0.2, 0.04), "image": (14, 2.0)},
}
BF16_TOKEN_GAP = 0.26  # tokens must agree while the reference's top-1/top-2 gap is at least this

# FP8 weights (model/network/fp8.py), emulated on the CPU over bfloat16: 2 x the worst difference
# measured on these cases (bench/results/fp8_golden.txt), the same rule as BF16_TOLERANCE. Its logit
# error (up to 0.97) is 7x bf16's, so a near tie is a gap under 2.0, and a case whose decoded text
# legitimately took the other token there (t5, the loop case) is judged up to that point only.
FP8_TOLERANCE = {
    "t2i": {"logits": (2.0, 0.5), "flow": (1.1, 0.18), "latent": (0.6, 0.12), "image": (48, 6.0)},
    "edit": {"logits": (2.0, 0.5), "flow": (1.9, 0.4), "latent": (1.1, 0.22), "image": (88, 11.0)},
}
FP8_TOKEN_GAP = 2.0


@dataclass
class Diffs:
    """Worst difference per category, and the checks that failed."""

    worst: dict[str, float] = field(default_factory=dict)
    worst_mean: dict[str, float] = field(default_factory=dict)  # the largest mean difference per category
    failures: list[str] = field(default_factory=list)
    checked: int = 0
    bounds: dict[str, tuple[float, float]] | None = None  # bf16: category -> (max, mean); None: fp32
    token_gap: float = BF16_TOKEN_GAP  # with bounds: a smaller top-1/top-2 gap is a near tie
    diverged: bool = False  # the decoded tokens took the other side of a near tie: later values differ

    def _judge(self, category: str, key: str, diff: float, mean: float, scale: float) -> None:
        if self.diverged:  # reported (worst, worst_mean), not judged: another text came before them
            return
        if self.bounds is None:
            if diff > (IMAGE_LEVELS if category == "image" else RTOL * scale):
                self.failures.append(f"{key}: max abs diff {diff:.3g}")
        elif category in self.bounds:
            top, avg = self.bounds[category]
            if diff > top or mean > avg:
                self.failures.append(f"{key}: bf16 diff max {diff:.3g} mean {mean:.3g} > {top} / {avg}")

    def tensor(self, category: str, key: str, ours: torch.Tensor | None, ref: torch.Tensor) -> None:
        self.checked += 1
        if ours is None:
            self.failures.append(f"{key}: not computed")
            return
        ours, ref = ours.detach().float().cpu(), ref.float()
        if tuple(ours.shape) != tuple(ref.shape):
            self.failures.append(f"{key}: shape {list(ours.shape)} != reference {list(ref.shape)}")
            return
        if not ref.numel():
            return
        delta = (ours - ref).abs()
        diff = delta.max().item()
        self.worst[category] = max(self.worst.get(category, 0.0), diff)
        self.worst_mean[category] = max(self.worst_mean.get(category, 0.0), delta.mean().item())
        self._judge(category, key, diff, delta.mean().item(), max(1.0, ref.abs().max().item()))

    def image(self, key: str, ours: np.ndarray, ref: torch.Tensor) -> None:
        self.checked += 1
        ref_np = ref.numpy().astype(np.int16)
        if ours.shape != ref_np.shape:
            self.failures.append(f"{key}: image shape {ours.shape} != reference {ref_np.shape}")
            return
        delta = np.abs(ours.astype(np.int16) - ref_np)
        diff = int(delta.max())
        self.worst["image"] = max(self.worst.get("image", 0), diff)
        self.worst_mean["image"] = max(self.worst_mean.get("image", 0.0), float(delta.mean()))
        self._judge("image", f"{key} (levels)", diff, float(delta.mean()), 1.0)

    def tokens(self, key: str, ours: list[int], ref: list[int], must_agree: int | None = None) -> None:
        """Equal ids; with `must_agree` (bf16) only the first `must_agree` of them."""
        self.checked += 1
        if must_agree is not None:
            self.diverged |= ours != ref
            ours, ref = ours[:must_agree], ref[:must_agree]
        if ours != ref:
            self.failures.append(f"{key}: token ids {ours} != reference {ref}")
            self.worst["tokens"] = float("inf")
        else:
            self.worst.setdefault("tokens", 0.0)


class Replay:
    """Runs one case through the engine, feeding recorded noise and comparing recorded tensors."""

    def __init__(
        self,
        engine: Engine,
        tensors: dict[str, torch.Tensor],
        randn_calls: list[dict],
        bounds: dict[str, tuple[float, float]] | None = None,
    ):
        fp8 = getattr(engine, "weights", "bf16") == "fp8"
        self.engine, self.t = engine, tensors
        self.diffs = Diffs(bounds=bounds, token_gap=FP8_TOKEN_GAP if fp8 else BF16_TOKEN_GAP)
        self.noise: Iterator[torch.Tensor] = iter([tensors[c["key"]] for c in randn_calls])
        self.gen = engine.new_cache()
        self.cfg_text = engine.new_cache().snapshot()
        self.cfg_img = engine.new_cache()
        self.image_shape: tuple[int, int] | None = None
        self.vit_seen = self.vae_seen = 0
        self.kv_compared: set[str] = set()

    def next_noise(self) -> torch.Tensor:
        try:
            return next(self.noise)
        except StopIteration:
            raise ValueError("the case records fewer random draws than the replay needs") from None

    # ---- context operations (the reference's InterleaveInferencer atoms) ------------------------
    def add_text(self, ctx: KVCache, text: str, generated: bool = False) -> None:
        if generated:
            self.engine.append_generated_text(ctx, text)
        else:
            self.engine.append_text(ctx, text)

    def add_user_text(self, text: str) -> None:
        self.cfg_text = self.gen.snapshot()
        self.add_text(self.gen, text)
        self.add_text(self.cfg_img, text)

    def add_image(self, ctx: KVCache, pixels: np.ndarray, vae: bool, vit: bool, prefix: str) -> None:
        image = self.engine.prepare_image(Image.fromarray(pixels))
        if vae:
            res = self.engine.append_vae_image(ctx, image, noise=self.next_noise())
            moments = self.engine.vae.encode_moments(res.image[None].to(self.engine.vae_device))
            key = f"{prefix}vae.{self.vae_seen}"
            self.check(f"{key}.encode_in", "vae", res.image[None])
            self.check(f"{key}.encoder_moments", "vae", torch.cat(moments, dim=1))
            self.vae_seen += 1
        if vit:
            res = self.engine.append_vit_image(ctx, image)
            self.check(f"{prefix}vit.{self.vit_seen}.vit_out", "vit", res.vit_out)
            self.check(f"{prefix}vit.{self.vit_seen}.connector_out", "vit", res.connector_out)
            self.vit_seen += 1
        self.image_shape = (image.height, image.width)

    # ---- comparisons ---------------------------------------------------------------------------
    def check(self, key: str, category: str, ours: torch.Tensor | None) -> None:
        if key in self.t:
            self.diffs.tensor(category, key, ours, self.t[key])

    def compare_contexts(self, prefix: str, recorded: dict) -> None:
        """Compare every recorded KV snapshot whose length matches one of our contexts now."""
        ours = {"gen": self.gen, "cfg_text": self.cfg_text, "cfg_img": self.cfg_img}
        for name, info in (recorded or {}).items():  # name like "kv.0.gen"
            full = prefix + name
            ctx = ours.get(name.split(".")[-1])
            if full in self.kv_compared or ctx is None or info["kv_lens"][0] != ctx.length:
                continue
            self.kv_compared.add(full)
            if info["ropes"][0] != ctx.rope:
                self.diffs.failures.append(f"{full}: rope {ctx.rope} != reference {info['ropes'][0]}")
            layer = 0
            while f"{full}.L{layer}.k" in self.t:
                for kind, store in (("k", ctx.cache.k), ("v", ctx.cache.v)):
                    mine = store[layer, :, : ctx.length].transpose(0, 1)  # (T, G, D) as recorded
                    self.check(f"{full}.L{layer}.{kind}", "kv", mine)
                layer += 1

    # ---- stages --------------------------------------------------------------------------------
    def decode(
        self, prefix: str, max_new_tokens: int, call: dict, recorded_contexts: dict, commit: bool
    ) -> str:
        self.compare_contexts(prefix, recorded_contexts)
        dec = self.engine.decode_text(
            self.gen,
            max_tokens=max_new_tokens,
            do_sample=call.get("do_sample", False),
            temperature=call.get("temperature", call.get("text_temperature", 1.0)),
            commit=False,
        )
        steps = [s for s in dec if s.token >= 0]
        ref_logits = self.t.get(f"{prefix}text.0.step_logits")
        ref_ids = self.t.get(f"{prefix}text.0.generated_ids")
        ref_list = ref_ids.reshape(-1).tolist()[1:] if ref_ids is not None else None
        same = len(steps)  # steps whose context equals the reference's (bf16: until tokens differ)
        if self.diffs.bounds is not None and ref_list is not None:
            same = next(
                (i + 1 for i, (a, b) in enumerate(zip(dec.ids, ref_list, strict=False)) if a != b), same
            )
        if ref_logits is not None:
            for i, step in enumerate(steps[:same]):
                self.diffs.tensor("logits", f"{prefix}text.0.step_logits[{i}]", step.logits, ref_logits[i])
        if ref_list is not None:
            must = None
            if self.diffs.bounds is not None and ref_logits is not None:  # agree while the gap is clear
                gaps = ref_logits.float().topk(2, dim=-1).values  # (steps, 2)
                close = ((gaps[:, 0] - gaps[:, 1]) < self.diffs.token_gap).nonzero()
                must = int(close[0]) if len(close) else None  # that step may go either way
            self.diffs.tokens(f"{prefix}text.0.generated_ids", dec.ids, ref_list, must)
        if commit:
            self.add_text(self.gen, dec.text, generated=True)
        return dec.text

    def generate(self, prefix: str, call: dict, recorded_contexts: dict) -> np.ndarray:
        self.compare_contexts(prefix, recorded_contexts)
        h, w = call.get("image_shape") or call.get("image_shapes") or self.image_shape or (1024, 1024)
        settings = ImageSettings(
            steps=call["num_timesteps"],
            cfg_text_scale=call["cfg_text_scale"],
            cfg_img_scale=call["cfg_img_scale"],
            cfg_interval=tuple(call["cfg_interval"]),
            cfg_renorm_type=call["cfg_renorm_type"],
            cfg_renorm_min=call["cfg_renorm_min"],
            timestep_shift=call["timestep_shift"],
        )
        # A cfg_img context that never diverged from cond is cond itself (plain text-to-image).
        img_uncond = self.cfg_img
        gen = self.engine.generate_image(
            self.gen,
            self.cfg_text,
            img_uncond,
            height=h,
            width=w,
            settings=settings,
            noise=self.next_noise(),
            trace=True,
        )
        for step in gen:
            key = f"{prefix}flow.{step.index}"
            for name, value in (
                ("x_t", step.x_t),
                ("v_cond", step.v_cond),
                ("v_uncond_text", step.v_text_uncond),
                ("v_uncond_img", step.v_img_uncond),
                ("v_t", step.v),
            ):
                self.check(f"{key}.{name}", "flow", value)
        self.check(f"{prefix}gen.final_latent_packed.0", "latent", gen.latent)
        decode_in = [k for k in self.t if k.startswith(f"{prefix}vae.") and k.endswith(".decode_in")]
        for key in decode_in:
            self.check(
                key.replace("decode_in", "decode_out"),
                "vae",
                self.engine.vae.decode(self.t[key].to(self.engine.vae_device)),
            )
        if f"{prefix}output.image_uint8" in self.t:
            self.diffs.image(f"{prefix}output.image_uint8", gen.pixels, self.t[f"{prefix}output.image_uint8"])
        return gen.pixels


def replay_call(engine: Engine, case: dict, tensors: dict[str, torch.Tensor], bounds=None) -> Diffs:
    """A single InterleaveInferencer.__call__: [image], text; think and understanding flags."""
    call = case["call"]
    r = Replay(engine, tensors, case.get("randn_calls", []), bounds)
    understanding = call.get("understanding_output", False)
    if call.get("think"):
        system = VLM_THINK_SYSTEM_PROMPT if understanding else GEN_THINK_SYSTEM_PROMPT
        r.add_text(r.gen, system)
        r.add_text(r.cfg_img, system)
    if "input.image_uint8" in tensors:
        r.add_image(r.gen, tensors["input.image_uint8"].numpy(), vae=not understanding, vit=True, prefix="")
        r.cfg_text = r.gen.snapshot()
    if call.get("text"):
        r.add_user_text(call["text"])
    contexts = case.get("contexts", {})
    max_new = call.get("max_think_token_n", 1000) - 1  # the reference's max_length counts <|im_start|>
    if understanding:
        r.decode("", max_new, call, contexts, commit=False)
    else:
        if call.get("think"):
            r.decode("", max_new, call, contexts, commit=True)
        r.generate("", case.get("gen_image_call", call), contexts)
    return r.diffs


def replay_stages(engine: Engine, case: dict, tensors: dict[str, torch.Tensor], bounds=None) -> Diffs:
    """A loop case: per stage, its decode or generation, then its recorded context operations."""
    r = Replay(engine, tensors, case.get("randn_calls", []), bounds)
    items: dict[int, dict] = {}
    for stage, info in case["stages"].items():
        prefix = f"{stage}."
        call = info.get("call", {})
        if info.get("text_generation"):
            r.decode(prefix, call["max_new_tokens"], call, info.get("contexts"), commit=False)
        if info.get("gen_image_call"):
            r.generate(prefix, info["gen_image_call"], info.get("contexts"))
        for op in info.get("ops", []):
            kind = op["op"]
            if kind == "add_input":
                items[op["item"]] = op
            elif kind == "init_gen_context":
                r.gen = engine.new_cache()
            elif kind == "deepcopy":
                src = getattr(r, op["src"])
                # cfg_text is always a prefix of gen (gen only appends); anything else is a real copy.
                copy = src.snapshot() if op["dst"] == "cfg_text" else src.cache.fork()
                setattr(r, op["dst"], copy)
            elif kind == "update_context_text":
                item = items[op["item"]]
                r.add_text(getattr(r, op["ctx"]), item["text"], generated=item["kind"] == "generated_text")
            elif kind == "update_context_image":
                pixels = tensors[f"{prefix}input.image_uint8"].numpy()
                r.add_image(getattr(r, op["ctx"]), pixels, op.get("vae", True), op.get("vit", True), prefix)
            elif kind == "set_image_shapes":
                r.image_shape = tuple(op["image_shapes"])
            else:
                raise ValueError(f"{stage}: unknown context operation {kind!r}")
        if info.get("contexts_after_stage"):
            for name, ctx in (("gen", r.gen), ("cfg_text", r.cfg_text), ("cfg_img", r.cfg_img)):
                want = info["contexts_after_stage"].get(name)
                if want and (want["cache_len"], want["ropes"][0]) != (ctx.length, ctx.rope):
                    r.diffs.failures.append(
                        f"{stage}: context {name} is {ctx.length}/{ctx.rope} tokens/rope, "
                        f"reference {want['cache_len']}/{want['ropes'][0]}"
                    )
    return r.diffs


@torch.inference_mode()
def run_case(engine: Engine, json_path: Path) -> Diffs:
    case = json.loads(json_path.read_text())
    tensors = load_file(str(json_path.with_suffix(".safetensors")))
    bounds = None
    kind = "edit" if "stages" in case or "input.image_uint8" in tensors else "t2i"  # the loop case refines
    if getattr(engine, "weights", "bf16") == "fp8":
        bounds = FP8_TOLERANCE[kind]
    elif engine.dtype != torch.float32:
        bounds = BF16_TOLERANCE[kind]
    if "stages" in case:
        return replay_stages(engine, case, tensors, bounds)
    if "call" in case:
        return replay_call(engine, case, tensors, bounds)
    raise ValueError(f"{json_path}: neither `call` nor `stages`: not a golden case")


def format_line(name: str, diffs: Diffs) -> str:
    status = "PASS" if not diffs.failures else "FAIL"
    parts = []
    for category in ("tokens", "logits", "kv", "vit", "vae", "flow", "latent", "image"):
        if category in diffs.worst:
            value = diffs.worst[category]
            if category == "tokens":
                parts.append("tokens=" + ("exact" if value == 0 else "DIFFER"))
            elif category == "image":
                parts.append(f"image={int(value)}lv")
            else:
                parts.append(f"{category}={value:.2e}")
    line = f"{status} {name:<20} checks={diffs.checked:<4} " + " ".join(parts)
    if diffs.failures:
        line += "\n    " + "\n    ".join(diffs.failures[:10])
    return line


def run_golden(
    folder: str | Path,
    device: str = "cpu",
    attn_impl: str = "sdpa",
    dtype: str = "float32",
    weights: str = "bf16",
    emulate_fp8: bool = False,
) -> tuple[list[str], bool]:
    """Load folder/tiny_ckpt in `dtype` (float32: conformance; bfloat16: the bf16 bounds) and
    replay every case; returns (lines, all passed). `weights="fp8"`: FP8 decoder layers against
    FP8_TOLERANCE (on an FP8 GPU; `emulate_fp8` on the CPU)."""
    from strokes.model.generation.loading import load_engine

    folder = Path(folder)
    cases = sorted((folder / "cases").glob("*.json"))
    if not cases:
        raise FileNotFoundError(f"{folder}/cases: no golden cases (*.json) found")
    if torch.device(device).type == "cuda":  # float32 conformance: no TF32 shortcuts in matmuls or convs
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if emulate_fp8:
        from strokes.model.network.fp8 import quantize_decoder

        engine = load_engine(folder / "tiny_ckpt", device=device, dtype=dtype, attn_impl=attn_impl)
        quantize_decoder(engine.model.language_model, emulate=True)
        engine.weights = "fp8"
    else:
        engine = load_engine(
            folder / "tiny_ckpt", device=device, dtype=dtype, attn_impl=attn_impl, weights=weights
        )
    lines, ok = [], True
    for path in cases:
        diffs = run_case(engine, path)
        ok &= not diffs.failures
        lines.append(format_line(path.stem, diffs))
    return lines, ok
