"""Text decoding on an explicit KV cache: token by token after the context, yielding `TextStep`s,
then (like the reference) the decoded string re-tokenised and prefilled as T(text).

Shapes: V=vocabulary.

Each token is fed through the engine's decode step (`Engine.decode_stepper`): on GPU the static
decoder (model/network/static_decode.py; CUDA graphs per length bucket, kept across jobs),
elsewhere an eager append. What the client sees of the text follows one rule (`VisibleText`), for
the streamed pieces and the final text alike. Randomness comes only from the caller's generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from strokes.model.generation.cancel import Cancelled, ShouldCancel
from strokes.model.generation.sampler import sample_token
from strokes.model.network.kv_cache import KVCache

if TYPE_CHECKING:
    from strokes.model.generation.engine import Engine

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]  # (ids so far, logits (V,)) -> logits


@dataclass
class TextStep:
    token: int
    delta: str
    logits: torch.Tensor = field(repr=False)  # (V,) before sampling


@dataclass(frozen=True, kw_only=True)
class TextDecodingOptions:
    """How one text is decoded; `Engine.decode_text` takes these as keywords and holds the defaults."""

    max_tokens: int  # new tokens at most
    do_sample: bool  # False: greedy
    temperature: float
    generator: torch.Generator | None  # the draws of sampling
    stop_ids: tuple[int, ...]  # a sampled one ends the text (neither kept nor fed)
    should_cancel: ShouldCancel  # polled before each token
    logits_processor: LogitsProcessor | None  # sees the tokens decoded so far and the logits
    commit: bool  # prefill the decoded text as T(text) afterwards


class VisibleText:
    """The one rule for what of a decoded text the client sees, applied alike to the streamed
    pieces (TextStep.delta) and to the final text: after <|im_start|>, up to the next
    <|im_start|> or <|im_end|> (control-token pieces are dropped, and so is what follows them).
    So the deltas concatenate to exactly `TextDecoding.text`."""

    def __init__(self, bos_text: str, eos_text: str):
        self.bos, self.eos = bos_text, eos_text
        self.raw = bos_text  # everything decoded so far, as the reference decodes it
        self.sent = ""  # the visible text handed out as deltas
        self.cut = False  # a control token ended the visible text

    def rule(self, raw: str) -> str:
        return raw.split(self.eos)[0].split(self.bos)[1]

    def push(self, piece: str) -> str:
        if self.cut or not piece:
            return ""
        self.raw += piece
        text = self.rule(self.raw)
        self.cut = len(self.raw) > len(self.bos) + len(text)  # something was cut off
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def rest(self, text: str) -> str:
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


class TextDecoding:
    """Decode text token by token after `cache`; iterate for `TextStep`s.

    Tokens are fed into the cache in place (the first is <|im_start|> at the context's position).
    It stops when a token in `stop_ids` is sampled (it is neither kept nor fed) or after
    `max_tokens` new tokens. Then, like the reference, the decode scratch is dropped and the decoded
    string is re-tokenised and prefilled as T(text) when `commit` (so a cache that reused the decode
    equals one rebuilt from the texts). Afterwards: `ids`, `text`, `stop_token` (None: length
    limit), `prefilled` tokens and `next_logits` (what the model predicts after the committed text).
    """

    def __init__(self, engine: Engine, cache: KVCache, options: TextDecodingOptions):
        self.engine, self.cache, self.options = engine, cache, options
        self.ids: list[int] = []
        self.text = ""
        self.stop_token: int | None = None
        self.prefilled = 0
        self.next_logits: torch.Tensor | None = None

    def __iter__(self) -> Iterator[TextStep]:
        engine, cache, tok, o = self.engine, self.cache, self.engine.tokenizer, self.options
        start = (cache.length, cache.rope)
        stream = tok.stream_decoder()
        bos_text, eos_text = tok.decode([tok.bos_id]), tok.decode([tok.eos_id])
        visible = VisibleText(bos_text, eos_text)
        token = tok.bos_id
        step = engine.decode_stepper(cache, o.max_tokens)
        try:
            for _ in range(o.max_tokens):
                if o.should_cancel():
                    raise Cancelled
                logits = step(token)  # (V,)
                if o.logits_processor is not None:
                    logits = o.logits_processor(self.ids, logits)
                token = sample_token(logits, o.do_sample, o.temperature, o.generator)
                if token in o.stop_ids:
                    self.stop_token = token
                    break
                self.ids.append(token)
                yield TextStep(token, visible.push(stream.push(token)), logits)
            tail = visible.push(stream.flush())
            if tail:
                yield TextStep(-1, tail, torch.empty(0))
        finally:
            cache.truncate(*start)
        # The reference's result: decode(bos + ids), cut at <|im_end|>, after <|im_start|>.
        self.text = visible.rule(tok.decode([tok.bos_id, *self.ids]))
        rest = visible.rest(self.text)  # what the streamed pieces lacked (a decoder's clean-up)
        if rest:
            yield TextStep(-1, rest, torch.empty(0))
        if o.commit:
            self.prefilled, self.next_logits = engine.append_generated_text(cache, self.text)
