"""Pipelines for `strokes worker --pipeline tests.service.scripted_pipelines:NAME` in tests that
need a process whose course is known (the tiny model's reflections are noise)."""

from __future__ import annotations

from svc_testkit import ScriptedPipeline


def two_refined_iterations(checkpoint: str, device: str, dtype: str | None) -> ScriptedPipeline:
    """plan, draft, reflect (wrong), refine, twice: four images, the last one final."""
    return ScriptedPipeline(steps=2, iterations=2)
