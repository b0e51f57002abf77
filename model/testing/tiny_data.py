"""Small synthetic process trajectories for tests, benchmarks and the CPU proof of training.

`write_exports(folder, size)` writes trajectory exports exactly as the service makes them
(trajectory.json in the format of model/generation/trajectory.py, images as `{image_id}.png`
beside it): flat-colour shapes drawn without randomness, and texts in the paper's format. Two
kinds: a multi-turn one (plan, draft, "correct") and an instruction-intermediate conflict (plan,
a wrong draft, a reflection with a corrective <refine>, the refinement, "correct").
`write_samples(folder, size, copies)` converts them into a dataset (samples.jsonl + images/).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Step:
    stage: str  # plan | draft | reflect | refine
    text: str | None = None
    shape: tuple[str, tuple[int, int, int], float] | None = None  # (square | circle, rgb, relative size)
    verdict: str | None = None
    refine_instruction: str | None = None


TRAJECTORIES: dict[str, tuple[str, list[Step]]] = {
    "red-square": (
        "a red square",
        [
            Step("plan", "<ins>draw a red square</ins> <des>a red square on white</des>"),
            Step("draft", shape=("square", (220, 30, 30), 0.6)),
            Step("reflect", "The intermediate step is correct. The square is red.", verdict="correct"),
        ],
    ),
    "blue-circle": (
        "a big blue circle",
        [
            Step("plan", "<ins>draw a blue circle</ins> <des>a big blue circle on white</des>"),
            Step("draft", shape=("circle", (30, 60, 220), 0.3)),
            Step(
                "reflect",
                "The intermediate step is wrong. The circle is too small. "
                "The corrective instruction is: <refine>make the circle bigger</refine>",
                verdict="wrong",
                refine_instruction="make the circle bigger",
            ),
            Step("refine", shape=("circle", (30, 60, 220), 0.8)),
            Step("reflect", "The intermediate step is correct. The circle is big.", verdict="correct"),
        ],
    ),
}


def shape_image(kind: str, rgb: tuple[int, int, int], scale: float, size: int) -> np.ndarray:
    """(size, size, 3) uint8: a centred square or circle on white."""
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    c, r = (size - 1) / 2, scale * size / 2
    inside = (
        (np.abs(yy - c) <= r) & (np.abs(xx - c) <= r)
        if kind == "square"
        else (yy - c) ** 2 + (xx - c) ** 2 <= r * r
    )
    img[inside] = rgb
    return img


def write_export(folder: Path, name: str, size: int = 64) -> Path:
    """One trajectory export (as `strokes generate --out` writes it) under folder/name."""
    prompt, steps = TRAJECTORIES[name]
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    stages = []
    it = 1
    final = None
    for step in steps:
        record = {"iteration": it, "stage": step.stage}
        if step.text is not None:
            record.update(text=step.text, tokens=len(step.text.split()), stop="eos")
            if step.verdict:
                record["verdict"] = step.verdict
            if step.refine_instruction:
                record["refine_instruction"] = step.refine_instruction
        else:
            image_id = f"it{it}-{step.stage}"
            Image.fromarray(shape_image(*step.shape, size)).save(out / f"{image_id}.png")
            record.update(image=image_id, width=size, height=size, appended_to_context=True)
            final = image_id
        stages.append(record)
    trajectory = {
        "version": 2,
        "method": "Think in Strokes, Not Pixels (arXiv 2604.04746): plan, draft, reflect, refine",
        "prompt": prompt,
        "protocol": "interleaved",
        "seed": 0,
        "width": size,
        "height": size,
        "settings": {"max_iterations": 3, "think": True, "starting_image": False, "templates": {}},
        "parent": None,
        "stages": stages,
        "iterations": it,
        "final_image": final,
        "seconds": 1.0,
        "usage": {},
    }
    (out / "trajectory.json").write_text(json.dumps(trajectory, indent=2) + "\n")
    return out


def write_exports(folder: Path, size: int = 64) -> list[Path]:
    return [write_export(folder, name, size) for name in TRAJECTORIES]


def write_samples(folder: Path, size: int = 64, think: bool = True) -> Path:
    """The synthetic exports converted into a dataset; returns the JSONL path."""
    from strokes.model.training.trajectories import convert

    exports = folder / "exports"
    write_exports(exports, size)
    converted = convert([exports], folder / "data", think=think)
    assert not converted.skipped, converted.skipped
    return folder / "data" / "samples.jsonl"


def proof_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny checkpoint for the CPU proof of training (tests/e2e/test_train_proof.py).

    The tiny geometry with four changes that make the random weights behave like trained ones
    where a few hundred steps of fine-tuning depend on it:
    - lm_head scaled by 4, as in the golden tiny checkpoint: a random head of std 0.02 caps every
      token's probability near 0.3 (the logits cannot spread), which LoRA, leaving the head
      frozen, could not lift;
    - the LLM is 256 wide, so that a latent token's 64 values have room beside the fixed 2-D
      position table in the residual stream (at width 64 they share every dimension and the
      velocity is not learned in a few hundred steps);
    - the posterior is (nearly) deterministic, as FLUX's is (a random VAE's posterior std is ~0.4:
      latents that noisy cannot be memorised);
    - the latents are rescaled to unit standard deviation over the synthetic images, as FLUX's
      scale factor does (the random encoder maps every image to almost the same latent, std
      0.01). This is an exact reparametrisation: the encoder's mean rows times k, the decoder's
      first convolution divided by k, so decode(encode(x)) is unchanged.
    """
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file, save_file

    from strokes.model.network.config import load_config
    from strokes.model.network.vae import AutoEncoder
    from strokes.model.testing.tiny import PRESETS, make_tiny

    out = make_tiny(folder, seed=seed, sizes=replace(PRESETS["tiny"], hidden=256, intermediate=512))
    weights = load_file(str(out / "ae.safetensors"))
    z = weights["encoder.conv_out.bias"].shape[0] // 2  # rows [z:] are the log-variance
    weights["encoder.conv_out.weight"][z:] = 0.0
    weights["encoder.conv_out.bias"][z:] = -30.0  # posterior std e^-15
    cfg = load_config(out)
    vae = AutoEncoder(cfg.vae)
    vae.load_state_dict(weights)
    shapes = [s.shape for _, steps in TRAJECTORIES.values() for s in steps if s.shape]
    images = torch.stack([cfg.vae_transform(Image.fromarray(shape_image(*sh, 64))) for sh in shapes])
    with torch.no_grad():
        k = 1.0 / vae.posterior(*vae.encode_moments(images)).std().item()
    weights["encoder.conv_out.weight"][:z] *= k
    weights["encoder.conv_out.bias"][:z] *= k
    weights["decoder.conv_in.weight"] /= k
    save_file(weights, str(out / "ae.safetensors"))
    model = load_file(str(out / "ema.safetensors"))
    model["language_model.lm_head.weight"] *= 4.0
    save_file(model, str(out / "ema.safetensors"))
    return out
