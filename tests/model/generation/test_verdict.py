"""Verdict parsing is lenient: both paper templates, odd casing, missing or odd tags."""

import pytest

from strokes.model.generation.verdict import parse_reflection
from strokes.model.spec.events import Verdict

CASES = [
    (
        "The intermediate step is correct. The red cube sits on the blue sphere as requested.",
        Verdict.correct,
        None,
    ),
    (
        "The intermediate step is wrong. The cube is floating beside the sphere instead of on top of it. "
        "The corrective instruction is: <refine> Move the red cube so it rests on top of the blue sphere. </refine>",
        Verdict.wrong,
        "Move the red cube so it rests on top of the blue sphere.",
    ),
    (
        "the intermediate step is WRONG. The corrective instruction is: <refine>make the sky purple<\\refine>",
        Verdict.wrong,
        "make the sky purple",
    ),
    (
        "The intermediate step is wrong. The corrective instruction is: <REFINE>add a yellow sun in the corner",
        Verdict.wrong,
        "add a yellow sun in the corner",
    ),
    (
        "The intermediate step is wrong. The corrective instruction is: brighten the background.",
        Verdict.wrong,
        "brighten the background.",
    ),
    ("<think>the cube is green, not red</think> The image is not correct.", Verdict.wrong, None),
    ("The sun in the top right corner is wrong; otherwise fine.", Verdict.wrong, None),
    ("Everything matches the prompt.", Verdict.correct, None),
    ("I cannot tell.", Verdict.unknown, None),
    ("", Verdict.unknown, None),
]


@pytest.mark.parametrize(("text", "verdict", "instruction"), CASES)
def test_reflection_is_parsed(text, verdict, instruction):
    result = parse_reflection(text)
    assert result.verdict == verdict
    assert result.refine_instruction == instruction
