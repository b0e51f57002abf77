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
