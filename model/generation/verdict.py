"""Parse a reflection into a verdict and, when wrong, the corrective instruction.

Lenient by design: the public BAGEL was not trained on the paper's templates, and even fine-tuned
models drift. Accepted, in order of trust:
1. a `<refine> ... </refine>` block (also `<\\refine>`, `</ refine>`, any casing, or no closing tag)
   means "wrong", with its content as the instruction;
2. the paper's sentences, "The intermediate step is correct." / "The intermediate step is wrong."
   (any casing; also "the image is not correct" and the like);
3. otherwise verdict words anywhere ("incorrect", "not correct", "wrong", "correct", "accurate"...),
   the earliest one deciding;
4. "The corrective instruction is: ..." (tags or not) means wrong and gives the instruction.
Nothing recognisable gives `Verdict.unknown`, which the pipeline treats as wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from strokes.model.spec.events import Verdict

_REFINE = re.compile(r"<\s*refine\s*>(.*?)(?:<\s*[/\\]\s*refine\s*>|$)", re.IGNORECASE | re.DOTALL)
_INSTRUCTION = re.compile(r"corrective\s+instruction\s*(?:is)?\s*:?\s*(.+)", re.IGNORECASE | re.DOTALL)
_SENTENCE = re.compile(
    r"\b(?:step|image|result|drawing|picture|draft)\s+is\s+(not\s+)?(correct|right|wrong|incorrect)\b",
    re.IGNORECASE,
)
_WRONG = re.compile(
    r"\b(?:wrong|incorrect|not\s+correct|isn't\s+correct|inaccurate|not\s+accurate|"
    r"does\s+not\s+match|doesn't\s+match|mismatch)\b",
    re.IGNORECASE,
)
_CORRECT = re.compile(r"\b(?:correct|accurate|matches)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Reflection:
    verdict: Verdict
    refine_instruction: str | None = None


def _clean(text: str) -> str | None:
    text = re.sub(r"<\s*[/\\]?\s*refine\s*>", "", text, flags=re.IGNORECASE).strip()
    return text or None


def parse_reflection(text: str) -> Reflection:
    tagged = _REFINE.search(text)
    if tagged:
        return Reflection(Verdict.wrong, _clean(tagged.group(1)))
    instruction = _INSTRUCTION.search(text)
    instruction_text = _clean(instruction.group(1)) if instruction else None
    sentence = _SENTENCE.search(text)
    if sentence:
        negated, word = sentence.group(1), sentence.group(2).lower()
        good = (word in ("correct", "right")) != bool(negated)
    else:  # the earliest verdict word decides; "not correct" starts before its "correct"
        hits = [(m.start(), False) for m in _WRONG.finditer(text)] + [
            (m.start(), True) for m in _CORRECT.finditer(text)
        ]
        if not hits:
            return Reflection(Verdict.wrong, instruction_text) if instruction else Reflection(Verdict.unknown)
        good = min(hits)[1]
    if good and not instruction:
        return Reflection(Verdict.correct)
    return Reflection(Verdict.wrong, instruction_text)
