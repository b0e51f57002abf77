"""The one-shot tasks reproduce the golden cases of the official inferencer end to end."""

from __future__ import annotations

import json

import numpy as np
from safetensors.torch import load_file
from testkit.paths import GOLDEN

from strokes.model.generation.tasks import edit_image, text_to_image, understand
from strokes.model.spec.params import ImageSettings, TextSettings


def _case(name):
    return json.loads((GOLDEN / "cases" / f"{name}.json").read_text()), load_file(
        str(GOLDEN / "cases" / f"{name}.safetensors")
    )


def _settings(call) -> ImageSettings:
    return ImageSettings(
        steps=call["num_timesteps"],
        cfg_text_scale=call["cfg_text_scale"],
        cfg_img_scale=call["cfg_img_scale"],
        cfg_interval=tuple(call["cfg_interval"]),
        cfg_renorm_type=call["cfg_renorm_type"],
        cfg_renorm_min=call["cfg_renorm_min"],
        timestep_shift=call["timestep_shift"],
    )


def test_text_to_image_with_seed_42_reproduces_the_reference_image(engine):
    case, t = _case("t3_t2i")
    out = text_to_image(
        engine, case["call"]["text"], height=64, width=64, settings=_settings(case["call"]), seed=42
    )
    assert np.abs(out.image.astype(int) - t["output.image_uint8"].numpy().astype(int)).max() <= 1


def test_think_mode_reproduces_the_reference_thinking_and_image(engine):
    case, t = _case("t5_think_t2i")
    call = case["call"]
    out = text_to_image(
        engine,
        call["text"],
        height=64,
        width=64,
        settings=_settings(call),
        think=True,
        think_settings=TextSettings(max_tokens=call["max_think_token_n"] - 1),
        seed=42,
    )
    assert out.text == case["output_text"]
    assert np.abs(out.image.astype(int) - t["output.image_uint8"].numpy().astype(int)).max() <= 1


def test_edit_with_seed_42_reproduces_the_reference_edit(engine):
    case, t = _case("t4_edit")
    out = edit_image(
        engine,
        t["input.image_uint8"].numpy(),
        case["call"]["text"],
        settings=_settings(case["call"]),
        seed=42,
    )
    assert out.image.shape == (64, 96, 3)
    assert np.abs(out.image.astype(int) - t["output.image_uint8"].numpy().astype(int)).max() <= 1


def test_understanding_reproduces_the_reference_answer(engine):
    case, t = _case("t2_understanding")
    out = understand(
        engine,
        t["input.image_uint8"].numpy(),
        case["call"]["text"],
        settings=TextSettings(max_tokens=case["call"]["max_think_token_n"] - 1),
    )
    assert out.text == case["output_text"]
