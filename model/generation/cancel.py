"""Cancellation of the engine's loops: the caller passes a check, which text decoding
(model/generation/text_decoding.py) polls before each token and image generation
(model/generation/image_generation.py) before each denoising step; when it returns True the loop
raises `Cancelled`."""

from __future__ import annotations

from collections.abc import Callable


class Cancelled(Exception):
    """The caller's cancellation check returned True between two tokens or denoising steps."""


ShouldCancel = Callable[[], bool]


def never() -> bool:
    """The check of a caller that never cancels."""
    return False
