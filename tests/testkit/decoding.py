"""Greedy decoding of the engine, step by step: the static decoder (CUDA graphs on a GPU, their
step run eagerly on the CPU) and the eager one compared on the same prompt (model tests; needs
torch only, so the GPU check runs it on its bare device machine)."""

from __future__ import annotations

import torch

STEPS = 300  # enough greedy steps to cross two length buckets of the static decoder


def greedy(engine, static: bool, steps: int):
    """Greedy-decode `steps` tokens (stop tokens fed back like any other) after a prompt:
    (token ids, logits (steps, V), the cache)."""
    engine.static_decode = static
    cache = engine.new_cache(capacity=64 + steps)
    engine.append_text(cache, "Once upon a time there was a little robot who")
    step = engine.decode_stepper(cache, steps)
    token, ids, logits = engine.tokenizer.bos_id, [], []
    for _ in range(steps):
        out = step(token).float()
        token = int(out.argmax())
        ids.append(token)
        logits.append(out)
    engine.static_decode = False
    return ids, torch.stack(logits), cache
