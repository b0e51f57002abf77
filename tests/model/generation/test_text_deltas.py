"""What a client assembles from the text deltas equals the stored text, by one rule
(model.generation.text_decoding.VisibleText), and a generation without an image is a clear failure of `strokes
generate`."""

from __future__ import annotations

import subprocess
import sys

from strokes.model.generation.pipeline import Pipeline
from strokes.model.spec.events import NO_IMAGE_MESSAGE, StageCompleted, TextDelta
from strokes.model.spec.params import GenerationParams, ImageSettings, TextSettings


def test_deltas_concatenate_to_the_stage_text_even_around_control_tokens(own_engine):
    sampled = TextSettings(max_tokens=40, do_sample=True, temperature=1.0)
    compared = 0
    for seed in range(4):
        for protocol in ("guided", "interleaved"):
            params = GenerationParams(
                prompt="a red cube",
                protocol=protocol,
                width=64,
                height=64,
                max_iterations=1,
                seed=seed,
                draft=ImageSettings(steps=2),
                refine=ImageSettings(steps=2),
                plan=sampled,
                reflect=sampled,
            ).validate()
            streamed: dict = {}
            for event in Pipeline(own_engine).run(params):
                if isinstance(event, TextDelta):
                    key = (event.iteration, event.stage)
                    streamed[key] = streamed.get(key, "") + event.delta
                if isinstance(event, StageCompleted) and event.text is not None:
                    assert streamed.pop((event.iteration, event.stage), "") == event.text
                    compared += 1
                    assert "<|im_start|>" not in event.text and "<|im_end|>" not in event.text
    assert compared >= 8


def test_generate_without_an_image_exits_1_and_names_no_image_path(own_tiny, tmp_path):
    # On the tiny checkpoint this interleaved prompt ends before the model asks for an image.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "strokes.service.cli",
            "generate",
            "a red cube",
            "--checkpoint",
            str(own_tiny),
            "--protocol",
            "interleaved",
            "--width",
            "128",
            "--height",
            "128",
            "--max-text-tokens",
            "128",  # the context's worst case within the tiny model's 4096 positions
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 1, out.stderr
    assert NO_IMAGE_MESSAGE in out.stderr
    assert "final image" not in out.stdout
    assert not list((tmp_path / "out").glob("*.png"))
