"""Greedy decoding of the engine, step by step: the static decoder (CUDA graphs on a GPU, their
step run eagerly on the CPU) and the eager one compared on the same prompt (model tests; needs
torch only, so the GPU check runs it on its bare device machine)."""

from __future__ import annotations

STEPS = 300  # enough greedy steps to cross two length buckets of the static decoder


def greedy(engine, static: bool, steps: int, kernel: str | None = None, feed: list[int] | None = None):
    """Greedy-decode `steps` tokens (stop tokens fed back like any other) after a prompt, or feed
    `feed` (teacher forcing): (the argmax ids, the logits (steps, V), the tokens the decode reached
    (context + steps)). `kernel`: the static decoder's attention (mask, flex; None: its default)."""
    from strokes.model.testing.greedy import greedy_logits

    engine.static_decode, engine.decode_kernel = static, kernel
    cache = engine.new_cache(capacity=64 + steps)
    engine.append_text(cache, "Once upon a time there was a little robot who")
    step = engine.decode_stepper(cache, steps)
    ids, logits = greedy_logits(step, engine.tokenizer.bos_id, steps, feed)
    engine.static_decode = False
    reached = engine._decoder.length if static else cache.length
    return ids, logits, reached
