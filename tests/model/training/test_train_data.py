"""The training data: the sample format and its validation, the sequence plan (what the model
learns to decide), packing against the inference engine's positions, and the conversion of the
service's trajectory exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from strokes.model.generation.contexts import ContextItem, Contexts
from strokes.model.spec.prompts import INTERLEAVED_PROMPT
from strokes.model.testing.tiny_data import shape_image, write_exports
from strokes.model.training.data import SampleRandom, TrainData, pack_config_of
from strokes.model.training.plan import ItemType, SpecialTokens, compile_sample
from strokes.model.training.samples import DataError, load_samples
from strokes.model.training.trajectories import convert

TOKENS = SpecialTokens(bos=385, eos=386, start_of_image=387, end_of_image=388)


def encode(text: str) -> list[int]:
    return [ord(c) % 300 for c in text]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for name, kind in (("a.png", "square"), ("b.png", "circle")):
        Image.fromarray(shape_image(kind, (200, 40, 40), 0.5, 64)).save(tmp_path / name)
    return tmp_path


def write_jsonl(folder: Path, *samples: dict) -> Path:
    path = folder / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def conflict(sample_id: str = "c1") -> dict:
    return {
        "id": sample_id,
        "kind": "conflict",
        "segments": [
            {"role": "prompt", "text": "Please create the image step-by-step: a red square"},
            {"role": "plan", "text": "<ins>draw a square</ins> <des>a red square</des>"},
            {"role": "draft", "image": "a.png"},
            {"role": "reflection", "text": "The intermediate step is wrong. <refine>make it round</refine>"},
            {"role": "refinement", "image": "b.png"},
            {"role": "reflection", "text": "The intermediate step is correct."},
        ],
    }


@pytest.mark.parametrize(
    "change, where",
    [
        (
            lambda s: s["segments"][2].update(image="missing.png"),
            "sample 'c1', segments[2].image: file not found",
        ),
        (lambda s: s["segments"][1].update(role="planner"), "sample 'c1', segments[1].role: must be one of"),
        (
            lambda s: s["segments"][3].update(text="ok <|im_end|> more"),
            "segments[3].text: contains the control token",
        ),
        (lambda s: s["segments"].pop(), "segments[4].role: a sample ends with the model's own text"),
        (
            lambda s: s["segments"].insert(0, s["segments"].pop(1)),
            "segments[0]: the model writes or draws only after a prompt",
        ),
        (lambda s: s["segments"][2].update(colour="red"), "segments[2].colour: unknown field"),
        (lambda s: s["segments"][0].update(loss="yes"), "segments[0].loss: must be true or false"),
        (lambda s: s.update(kind="two words"), "sample 'c1', kind: must be a short name"),
        (lambda s: s.update(segments=[]), "sample 'c1', segments: must be a non-empty list"),
    ],
)
def test_validation_names_the_sample_and_the_field(images: Path, change, where: str):
    sample = conflict()
    change(sample)
    path = write_jsonl(images, conflict("ok"), sample)
    with pytest.raises(DataError) as e:
        load_samples(path)
    assert f"{path}:2:" in str(e.value) and where in str(e.value), str(e.value)


def test_validation_rejects_duplicate_ids_and_bad_json(images: Path):
    with pytest.raises(DataError, match=r"samples.jsonl:2: sample 'c1', id: duplicate \(first at .*:1\)"):
        load_samples(write_jsonl(images, conflict(), conflict()))
    (images / "bad.jsonl").write_text('{"id": "x"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: not valid JSON"):
        load_samples(images / "bad.jsonl")


def test_the_papers_three_kinds_are_expressible(images: Path):
    multi_turn = {
        "id": "m1",
        "kind": "multi_turn",
        "segments": [
            {"role": "prompt", "text": "Please create the image step-by-step: a square and a circle"},
            {"role": "plan", "text": "<ins>draw a square</ins> <des>a square</des>"},
            {"role": "draft", "image": "a.png"},
            {"role": "reflection", "text": "The intermediate step is correct."},
            {"role": "plan", "text": "<ins>add a circle</ins> <des>a square and a circle</des>"},
            {"role": "draft", "image": "b.png"},
            {"role": "reflection", "text": "The intermediate step is correct."},
        ],
    }
    alignment = {
        "id": "a1",
        "kind": "alignment",
        "segments": [
            {"role": "prompt", "text": "Does the image show a red square?"},
            {"role": "image", "image": "a.png"},
            {"role": "reflection", "text": "The intermediate step is correct. It shows a red square."},
        ],
    }
    samples = load_samples(write_jsonl(images, multi_turn, conflict(), alignment))
    assert [s.kind for s in samples] == ["multi_turn", "conflict", "alignment"]
    plans = [compile_sample(s, encode, TOKENS) for s in samples]
    noisy = [sum(i.type == ItemType.vae_image and i.loss for i in p.items) for p in plans]
    assert noisy == [2, 2, 0]  # drawn images carry MSE; a seen image does not


def test_the_plan_labels_every_decision_of_the_interleaved_protocol(images: Path):
    (sample,) = load_samples(write_jsonl(images, conflict()))
    plan = compile_sample(sample, encode, TOKENS)
    summary = [(i.type.value, i.loss, i.special_token_label) for i in plan.items]
    assert summary == [
        ("text", False, TOKENS.bos),  # after the prompt the model starts a text
        ("text", True, TOKENS.start_of_image),  # after the plan it draws
        ("vae_image", True, None),  # the draft, noisy: MSE
        ("vae_image", False, None),  # fed back clean ...
        ("vit_image", False, TOKENS.bos),  # ... and through the ViT; then it inspects (text)
        ("text", True, TOKENS.start_of_image),  # after <refine> it draws the refinement
        ("vae_image", True, None),
        ("vae_image", False, None),
        ("vit_image", False, TOKENS.bos),
        ("text", True, TOKENS.eos),  # the last reflection: it stops
    ]
    assert [i.enable_cfg for i in plan.items if i.type == ItemType.text] == [True, False, False, False]


def test_packed_positions_equal_the_inference_contexts(own_engine, images: Path):
    """The position of every text of a packed sample is where the interleaved pipeline's context
    has its RoPE position when that text starts (draft + clean copy share a position)."""
    (sample,) = load_samples(write_jsonl(images, conflict()))
    engine = own_engine
    tok = engine.tokenizer
    tokens = SpecialTokens(tok.bos_id, tok.eos_id, tok.start_of_image, tok.end_of_image)
    plan = compile_sample(sample, tok.encode, tokens)
    cfg = engine.cfg
    data = TrainData([plan], cfg, pack_config_of(cfg, tokens, 0, 0, 0), max_tokens=4096, seed=0)
    batch = data.load_pack(0, [0])
    starts = [
        int(batch.position_ids[i])
        for i, t in zip(batch.text_indexes, batch.text_ids, strict=True)
        if t == tok.bos_id
    ]

    contexts = Contexts(engine)
    expected = []
    for seg in sample.segments:
        if seg.is_text:
            expected.append(contexts.cond.rope)
            kind = "user" if seg.role == "prompt" else "generated"
            contexts.add(ContextItem(kind, seg.text))
        elif seg is not sample.segments[-1]:
            image = Image.open(seg.image).convert("RGB")
            contexts.add(ContextItem("image", image=image, resize=False), torch.Generator().manual_seed(0))
    assert starts == expected
    assert batch.sequence_length == contexts.cond.length + 2 * (16 + 2)  # + the two noisy images


def test_a_samples_draws_do_not_depend_on_its_pack(images: Path, own_engine):
    samples = load_samples(write_jsonl(images, conflict("x"), conflict("y")))
    tok = own_engine.tokenizer
    tokens = SpecialTokens(tok.bos_id, tok.eos_id, tok.start_of_image, tok.end_of_image)
    plans = [compile_sample(s, tok.encode, tokens) for s in samples]
    data = TrainData(
        plans, own_engine.cfg, pack_config_of(own_engine.cfg, tokens, 0.5, 0.5, 0.5), max_tokens=4096, seed=3
    )
    both, alone = data.load_pack(0, [0, 1]), data.load_pack(0, [1])
    n = len(alone.vae_images)
    assert torch.equal(both.flow_noise[-alone.flow_noise.shape[0] :], alone.flow_noise)
    assert torch.equal(both.posterior_eps[-n:], alone.posterior_eps)
    assert both.timesteps[-1] == alone.timesteps[-1]
    assert (
        SampleRandom(3, 0, 1).uniform() == SampleRandom(3, 0, 1).uniform() != SampleRandom(3, 1, 1).uniform()
    )


def test_packs_of_an_epoch_are_split_over_ranks_and_micro_steps(images: Path, own_engine):
    samples = load_samples(write_jsonl(images, *[conflict(f"s{i}") for i in range(8)]))
    tok = own_engine.tokenizer
    tokens = SpecialTokens(tok.bos_id, tok.eos_id, tok.start_of_image, tok.end_of_image)
    plans = [compile_sample(s, tok.encode, tokens) for s in samples]
    one = max(
        TrainData(
            plans, own_engine.cfg, pack_config_of(own_engine.cfg, tokens, 0, 0, 0), max_tokens=4096, seed=0
        ).tokens
    )
    kwargs = {"max_tokens": one, "seed": 0, "accumulation": 2}  # one sample per pack: 8 packs
    ranks = [
        TrainData(
            plans,
            own_engine.cfg,
            pack_config_of(own_engine.cfg, tokens, 0, 0, 0),
            world_size=2,
            rank=r,
            **kwargs,
        )
        for r in (0, 1)
    ]
    packs = ranks[0].epoch_packs(0)
    assert (
        len(packs) == 8
        and packs == ranks[1].epoch_packs(0)
        and sorted(i for p in packs for i in p) == list(range(8))
    )
    assert ranks[0].steps_in(packs) == 2
    mine = [ranks[r].my_packs(packs, 0) for r in (0, 1)]
    assert sorted(i for m in mine for p in m for i in p) == sorted(i for p in packs[:4] for i in p)
    with pytest.raises(DataError, match="more than max_tokens 10"):
        TrainData(
            plans, own_engine.cfg, pack_config_of(own_engine.cfg, tokens, 0, 0, 0), max_tokens=10, seed=0
        )


def test_trajectory_exports_become_samples_in_the_interleaved_format(tmp_path: Path):
    exports = write_exports(tmp_path / "exports")
    (exports[1] / "it1-refine.png").unlink()  # a broken export is skipped with its reason
    unfinished = json.loads((exports[0] / "trajectory.json").read_text())
    unfinished["final_image"] = None
    (tmp_path / "exports" / "paused").mkdir()
    (tmp_path / "exports" / "paused" / "trajectory.json").write_text(json.dumps(unfinished))
    converted = convert([tmp_path / "exports"], tmp_path / "data", think=False)
    assert [s.id for s in converted.samples] == ["red-square"]
    assert len(converted.skipped) == 2
    assert any("it1-refine.png is missing" in r for r in converted.skipped)
    assert any("did not complete" in r for r in converted.skipped)
    (sample,) = load_samples(tmp_path / "data" / "samples.jsonl")
    assert [s.role for s in sample.segments] == ["prompt", "plan", "draft", "reflection"]
    assert sample.segments[0].text == INTERLEAVED_PROMPT.replace("{prompt}", "a red square")
    assert np.asarray(Image.open(sample.segments[2].image)).shape == (64, 64, 3)


def test_a_reflection_before_a_refinement_gets_the_refine_tag(tmp_path: Path):
    (_, export) = write_exports(tmp_path / "exports")
    trajectory = json.loads((export / "trajectory.json").read_text())
    trajectory["stages"][2]["text"] = "It is wrong: the circle is too small."  # no tags, as guided runs write
    (export / "trajectory.json").write_text(json.dumps(trajectory))
    converted = convert([export], tmp_path / "data", think=True)
    (sample,) = converted.samples
    assert sample.segments[0].role == "system"
    reflection = sample.segments[4]
    assert reflection.text == (
        "It is wrong: the circle is too small. The corrective instruction is: <refine>make the circle bigger</refine>"
    )
    assert sample.kind == "conflict"
