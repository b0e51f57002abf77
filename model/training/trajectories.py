"""Trajectory exports of the service -> training samples in the `interleaved` protocol's format.

An export is a folder with trajectory.json (what GET /v1/generations/{id}/trajectory serves, and
what `strokes generate --out DIR` writes; model/generation/trajectory.py) and the images it names
beside it (`{image_id}.png`, plus input.png when the run started from an image). A guided run
(for example one a person steered and approved in the studio) becomes the context the
interleaved protocol (model/generation/pipeline.py) builds when the model drives by itself:

    [system: BAGEL's planning prompt, when --think]        what Run.start_context adds
    [image: input.png, when the run started from one]
    prompt: "Please create the image step-by-step: {prompt}"   (INTERLEAVED_PROMPT)
    then every stage in order: plan -> plan text, draft -> draft image,
    reflect -> reflection text, refine -> refinement image,
    a follow-up instruction -> prompt "Please create the image step-by-step: {instruction}"

The guided protocol's stage instructions are left out: the fine-tuned model decides by itself
when to draw and when to stop. A reflection followed by a refinement must carry the corrective
instruction in the paper's `<refine>...</refine>` form (the protocol labels an image after
<refine> a refinement); if the recorded text lacks the tags, the recorded `refine_instruction` is
appended as "The corrective instruction is: <refine>...</refine>". A trajectory that did not
complete, that ends with an image no reflection inspected, or whose files are missing is skipped
with its reason (`ConversionError`).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from strokes.model.spec.prompts import GEN_THINK_SYSTEM_PROMPT, INTERLEAVED_PROMPT
from strokes.model.training.samples import Sample, parse_sample, sample_json

TRAJECTORY_FILE = "trajectory.json"
_REFINE_TAG = re.compile(r"<\s*refine\s*>", re.IGNORECASE)


class ConversionError(ValueError):
    """This trajectory cannot become a sample; the message says why and names the file."""


@dataclass(frozen=True)
class Converted:
    samples: list[Sample]
    skipped: list[str]  # one message per trajectory left out


def find_exports(paths: list[Path]) -> list[Path]:
    """Every folder holding a trajectory.json, under each path (a folder of exports, or one export)."""
    found: list[Path] = []
    for path in paths:
        if (path / TRAJECTORY_FILE).is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.rglob(TRAJECTORY_FILE)))
        else:
            raise ConversionError(f"{path}: no such folder")
    return found


def _prompt(text: str) -> dict:
    return {"role": "prompt", "text": INTERLEAVED_PROMPT.replace("{prompt}", text)}


def segments_of(trajectory: dict, where: Path, think: bool) -> list[dict]:
    """The sample's segments (image paths relative to the export folder)."""
    if trajectory.get("final_image") is None:
        raise ConversionError(f"{where}: the run did not complete (no final image)")
    stages = trajectory.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConversionError(f"{where}: no stages")
    settings = trajectory.get("settings") or {}
    segments: list[dict] = []
    if think:
        segments.append({"role": "system", "text": GEN_THINK_SYSTEM_PROMPT})
    if settings.get("starting_image"):
        segments.append({"role": "image", "image": "input.png"})
    segments.append(_prompt(trajectory["prompt"]))
    for i, stage in enumerate(stages):
        kind = stage.get("stage")
        if kind in ("plan", "reflect"):
            text = (stage.get("text") or "").strip()
            if not text:
                raise ConversionError(f"{where}: stages[{i}] ({kind}) has no text")
            following = stages[i + 1].get("stage") if i + 1 < len(stages) else None
            if kind == "reflect" and following == "refine" and not _REFINE_TAG.search(text):
                instruction = (stage.get("refine_instruction") or "").strip()
                if not instruction:
                    raise ConversionError(
                        f"{where}: stages[{i}] is followed by a refinement but names no corrective instruction"
                    )
                text = f"{text} The corrective instruction is: <refine>{instruction}</refine>"
            segments.append({"role": "plan" if kind == "plan" else "reflection", "text": text})
        elif kind in ("draft", "refine"):
            image = stage.get("image")
            if not image:
                raise ConversionError(f"{where}: stages[{i}] ({kind}) names no image")
            segments.append({"role": "draft" if kind == "draft" else "refinement", "image": f"{image}.png"})
        elif kind == "instruction":
            segments.append(_prompt(stage.get("instruction") or ""))
        else:
            raise ConversionError(f"{where}: stages[{i}] has an unknown stage {kind!r}")
    if segments[-1]["role"] not in ("plan", "reflection"):
        raise ConversionError(
            f"{where}: ends with an image that no reflection inspected; the interleaved protocol "
            "inspects every image it draws before it stops"
        )
    return segments


def convert_export(folder: Path, out: Path, think: bool = True) -> Sample:
    """One export -> one validated sample; its images are copied to out/images/<id>/."""
    path = folder / TRAJECTORY_FILE
    try:
        trajectory = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not readable JSON ({e})") from None
    segments = segments_of(trajectory, path, think)
    sample_id = folder.name
    images = out / "images" / sample_id
    for seg in segments:
        if "image" in seg:
            src = folder / seg["image"]
            if not src.is_file():
                raise ConversionError(f"{path}: image file {src} is missing")
            images.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, images / seg["image"])
            seg["image"] = f"images/{sample_id}/{seg['image']}"
    kind = "conflict" if any(s["role"] == "refinement" for s in segments) else "multi_turn"
    return parse_sample({"id": sample_id, "kind": kind, "segments": segments}, out, str(path))


def convert(paths: list[Path], out: Path, think: bool = True) -> Converted:
    """Every export under `paths` -> out/samples.jsonl (+ out/images/); unconvertible ones skipped."""
    out.mkdir(parents=True, exist_ok=True)
    samples, skipped, seen = [], [], set()
    for folder in find_exports(paths):
        if folder.name in seen:
            skipped.append(f"{folder}: a trajectory named {folder.name!r} was converted already")
            continue
        try:
            samples.append(convert_export(folder, out, think))
            seen.add(folder.name)
        except (ConversionError, ValueError) as e:
            skipped.append(str(e))
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample_json(sample, out), ensure_ascii=False) + "\n")
    return Converted(samples, skipped)
