"""The training dataset format: process trajectories as JSONL, one sample per line, images as files.

A sample is an ordered list of segments; each segment is a text or an image with a role, and
whether it carries loss (docs/training.md has the full description and examples):

    {"id": "cube-0001", "kind": "conflict", "segments": [
      {"role": "system", "text": "..."},
      {"role": "prompt", "text": "Please create the image step-by-step: a red cube"},
      {"role": "plan", "text": "<ins>draw a red cube</ins> <des>a red cube on grey</des>"},
      {"role": "draft", "image": "cube-0001/it1-draft.png"},
      {"role": "reflection", "text": "The intermediate step is wrong. ... <refine>...</refine>"},
      {"role": "refinement", "image": "cube-0001/it1-refine.png"},
      {"role": "reflection", "text": "The intermediate step is correct. ..."}]}

Roles: texts `system`, `prompt` (a user turn), `plan` and `reflection` (the model's own texts);
images `image` (an input the model sees), `draft` and `refinement` (images the model draws).
`loss` defaults by role: the model's texts and drawn images carry it, the rest does not. Image
paths are relative to the JSONL file. What the model decides after each segment (write text, draw,
stop) is not written down: it follows from the order (model/training/plan.py).

`load_samples` validates everything it can without a model: a failure raises `DataError` whose
message names the file and line, the sample id and the field (`segments[3].image`). Why JSONL plus
image files: the service exports trajectories as JSON plus PNGs, so a converted folder is readable,
diffable and editable by hand; a sample is loaded with its images alone (random access, no shard
index). Tens of thousands of trajectories are a few hundred thousand PNGs, which a filesystem or
an object-store mount serves fine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from strokes.model.network.tokenizer import BAGEL_TOKENS

TEXT_ROLES = ("system", "prompt", "plan", "reflection")
IMAGE_ROLES = ("image", "draft", "refinement")
MODEL_TEXTS = ("plan", "reflection")  # what the model writes
DRAWN = ("draft", "refinement")  # what the model draws
DEFAULT_LOSS = {
    "system": False,
    "prompt": False,
    "plan": True,
    "reflection": True,
    "image": False,
    "draft": True,
    "refinement": True,
}
SAMPLE_KEYS = {"id", "kind", "segments"}
SEGMENT_KEYS = {"role", "text", "image", "loss"}
KIND = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_TEXT_CHARS = 20_000


class DataError(ValueError):
    """A sample (or the file) is malformed; the message names where: file:line, sample id, field."""


@dataclass(frozen=True)
class Segment:
    role: str
    loss: bool
    text: str | None = None
    image: Path | None = None  # resolved path
    size: tuple[int, int] | None = None  # (width, height) of the image file

    @property
    def is_text(self) -> bool:
        return self.text is not None


@dataclass(frozen=True)
class Sample:
    id: str
    kind: str
    segments: tuple[Segment, ...]
    where: str = ""  # file:line, for messages


def _fail(where: str, sample_id: str | None, field: str, message: str) -> DataError:
    who = f" sample {sample_id!r}," if sample_id is not None else ""
    return DataError(f"{where}:{who} {field}: {message}")


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def parse_segment(obj: object, base: Path, where: str, sample_id: str, index: int) -> Segment:
    field = f"segments[{index}]"
    if not isinstance(obj, dict):
        raise _fail(where, sample_id, field, "must be an object")
    unknown = sorted(set(obj) - SEGMENT_KEYS)
    if unknown:
        raise _fail(
            where, sample_id, f"{field}.{unknown[0]}", f"unknown field (known: {sorted(SEGMENT_KEYS)})"
        )
    role = obj.get("role")
    if role not in TEXT_ROLES + IMAGE_ROLES:
        raise _fail(where, sample_id, f"{field}.role", f"must be one of {list(TEXT_ROLES + IMAGE_ROLES)}")
    loss = obj.get("loss", DEFAULT_LOSS[role])
    if not isinstance(loss, bool):
        raise _fail(where, sample_id, f"{field}.loss", "must be true or false")
    if role in TEXT_ROLES:
        if "image" in obj:
            raise _fail(where, sample_id, f"{field}.image", f"a {role} segment is a text, not an image")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _fail(where, sample_id, f"{field}.text", "must be a non-empty string")
        if len(text) > MAX_TEXT_CHARS:
            raise _fail(where, sample_id, f"{field}.text", f"longer than {MAX_TEXT_CHARS} characters")
        control = next((t for t in BAGEL_TOKENS if t in text), None)
        if control:
            raise _fail(
                where,
                sample_id,
                f"{field}.text",
                f"contains the control token {control} (it cannot be learned)",
            )
        if loss and role == "system":
            raise _fail(where, sample_id, f"{field}.loss", "a system prompt carries no loss")
        return Segment(role, loss, text=text)
    if "text" in obj:
        raise _fail(where, sample_id, f"{field}.text", f"a {role} segment is an image, not a text")
    name = obj.get("image")
    if not isinstance(name, str) or not name:
        raise _fail(where, sample_id, f"{field}.image", "must be a path relative to the JSONL file")
    if loss and role == "image":
        raise _fail(
            where, sample_id, f"{field}.loss", "an input image carries no loss (use draft or refinement)"
        )
    path = (base / name).resolve()
    if not path.is_file():
        raise _fail(where, sample_id, f"{field}.image", f"file not found: {path}")
    try:
        size = _image_size(path)
    except (UnidentifiedImageError, OSError) as e:
        raise _fail(where, sample_id, f"{field}.image", f"not a readable image: {path} ({e})") from None
    return Segment(role, loss, image=path, size=size)


def parse_sample(obj: object, base: Path, where: str) -> Sample:
    if not isinstance(obj, dict):
        raise _fail(where, None, "sample", "must be a JSON object")
    sample_id = obj.get("id")
    if not isinstance(sample_id, str) or not sample_id:
        raise _fail(where, None, "id", "must be a non-empty string")
    unknown = sorted(set(obj) - SAMPLE_KEYS)
    if unknown:
        raise _fail(where, sample_id, unknown[0], f"unknown field (known: {sorted(SAMPLE_KEYS)})")
    kind = obj.get("kind", "unspecified")
    if not isinstance(kind, str) or not KIND.match(kind):
        raise _fail(where, sample_id, "kind", "must be a short name (letters, digits, _ . -)")
    raw = obj.get("segments")
    if not isinstance(raw, list) or not raw:
        raise _fail(where, sample_id, "segments", "must be a non-empty list")
    segments = tuple(parse_segment(s, base, where, sample_id, i) for i, s in enumerate(raw))
    check_order(segments, where, sample_id)
    return Sample(sample_id, kind, segments, where)


def check_order(segments: tuple[Segment, ...], where: str, sample_id: str) -> None:
    """What the interleaved protocol can produce: a system prompt only first; the model speaks only
    after a prompt; the sample ends with the model's own text (the model inspects every image it
    draws, then decides to stop); something carries loss."""
    roles = [s.role for s in segments]
    for i, role in enumerate(roles):
        if role == "system" and i != 0:
            raise _fail(where, sample_id, f"segments[{i}].role", "a system prompt can only come first")
    first_prompt = roles.index("prompt") if "prompt" in roles else None
    first_model = next((i for i, r in enumerate(roles) if r in MODEL_TEXTS + DRAWN), None)
    if first_prompt is None or (first_model is not None and first_model < first_prompt):
        where_ = f"segments[{first_model if first_model is not None else 0}]"
        raise _fail(where, sample_id, where_, "the model writes or draws only after a prompt segment")
    if roles[-1] not in MODEL_TEXTS:
        raise _fail(
            where,
            sample_id,
            f"segments[{len(roles) - 1}].role",
            "a sample ends with the model's own text (plan or reflection): the interleaved protocol "
            "inspects every image the model draws, and the model decides to stop after a text",
        )
    if not any(s.loss for s in segments):
        raise _fail(where, sample_id, "segments", "no segment carries loss")


def load_samples(path: str | Path) -> list[Sample]:
    """Every sample of a JSONL file, validated (images opened); ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            sample = parse_sample(obj, path.parent, where)
            if sample.id in seen:
                raise _fail(where, sample.id, "id", f"duplicate (first at {seen[sample.id]})")
            seen[sample.id] = where
            samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def segment_json(segment: Segment, base: Path) -> dict:
    out: dict = {"role": segment.role}
    if segment.is_text:
        out["text"] = segment.text
    else:
        out["image"] = Path(segment.image).resolve().relative_to(base.resolve()).as_posix()
    if segment.loss != DEFAULT_LOSS[segment.role]:
        out["loss"] = segment.loss
    return out


def sample_json(sample: Sample, base: Path) -> dict:
    """The JSONL object of a sample whose image paths are made relative to `base`."""
    return {
        "id": sample.id,
        "kind": sample.kind,
        "segments": [segment_json(s, base) for s in sample.segments],
    }
