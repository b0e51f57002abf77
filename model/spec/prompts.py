"""Texts the pipeline writes into the context: BAGEL's system prompts and the stage instructions.

The guided protocol drives the public BAGEL-7B-MoT through plan -> draft -> reflect -> refine by
appending these instructions as user text. They ask for the formats of "Think in Strokes, Not
Pixels" (arXiv 2604.04746): plans as `<ins>step instruction</ins> <des>whole scene after it</des>`,
reflections as "The intermediate step is correct. ..." or "The intermediate step is wrong. ...
The corrective instruction is: <refine> ... </refine>". Every template can be overridden per
request (GenerationParams.templates) by its name below; `{prompt}` is replaced by the user prompt.
"""

from __future__ import annotations

# Exact strings of the official inferencer (inferencer.py:15-19), trailing space before \n included.
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with "
    "the answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. <think> "
    "reasoning process here </think> answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process "
    "here </think> image here"
)

# The interleaved protocol's single prompt (the paper's fine-tuning format).
INTERLEAVED_PROMPT = "Please create the image step-by-step: {prompt}"

DEFAULT_TEMPLATES: dict[str, str] = {
    # Iteration 1: the user prompt and the first planning instruction, as ONE user text, so the
    # text-unconditional context (snapshotted before a user text) holds only the system prompt,
    # exactly as in BAGEL's think-mode text-to-image.
    "plan_first": (
        "Please create the image step-by-step: {prompt}\n"
        "Plan the first step. Reply with <ins>the instruction for this step</ins> "
        "<des>a description of the whole image after this step</des>."
    ),
    # Iterations 2+: appended after the previous iteration's final image.
    "plan_next": (
        "Plan the next step that brings the image closer to: {prompt}\n"
        "Reply with <ins>the instruction for this step</ins> "
        "<des>a description of the whole image after this step</des>."
    ),
    # After each draft: the model inspects its own image against the prompt and the plan.
    "reflect": (
        'Inspect the image you just drew against the request "{prompt}" and your plan. If it is '
        "right, reply: The intermediate step is correct. followed by a short reason. If it is not, "
        "reply: The intermediate step is wrong. followed by what is wrong, then: The corrective "
        "instruction is: <refine>the instruction that fixes the image</refine>"
    ),
}
TEMPLATE_NAMES = frozenset(DEFAULT_TEMPLATES)


def render(name: str, prompt: str, overrides: dict[str, str] | None = None) -> str:
    """The template `name` (overridden if the request says so) with `{prompt}` filled in.

    Only `{prompt}` is substituted (str.replace, not str.format), so braces a user writes in an
    override or a prompt are kept as they are.
    """
    template = (overrides or {}).get(name, DEFAULT_TEMPLATES[name])
    return template.replace("{prompt}", prompt)
