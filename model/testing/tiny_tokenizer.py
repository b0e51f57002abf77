"""A tiny byte-level BPE tokenizer in the official Qwen2 layout, for tiny test checkpoints.

Contract: `write_tiny_tokenizer(folder, vocab_size=384)` trains (deterministically, with the
`tokenizers` library) a byte-level BPE on the English corpus below (drawing, shapes, colours,
scenes, planning and inspecting images) and writes vocab.json, merges.txt, tokenizer.json,
tokenizer_config.json (Qwen2Tokenizer), special_tokens_map.json and added_tokens.json. The BPE
vocabulary has ids 0..vocab_size-1 (the 256 byte symbols, then one token per merge); the added
tokens follow it, like the golden tiny checkpoint: <|endoftext|> = vocab_size (special), then
<|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|> (normal added tokens). Normalizer (NFC),
pre-tokenizer (Qwen2's split regex, then byte-level) and decoder are Qwen2's. Two runs write
byte-identical files; the result loads with `BagelTokenizer.from_folder` and with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from strokes.model.network.tokenizer import BAGEL_TOKENS

# Qwen2's pre-tokenizer split pattern (tokenization_qwen2.py, and the golden tiny tokenizer.json).
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"

CORPUS = """\
Draw a red cube on top of a blue sphere.
A red cube sits on top of a blue sphere in the middle of the image.
Please create the image step-by-step.
First plan the scene, then draw a rough draft, then inspect it and refine it.
The planning process is enclosed within think tags.
You should first think about the planning process in the mind and then generate the image.
The intermediate step is correct.
The intermediate step is wrong.
The corrective instruction is: make the sphere larger and move the cube to the left.
Step one: draw the background. Step two: draw the main object. Step three: add the details.
The background is a soft blue sky with a few white clouds.
A yellow sun shines in the top right corner of the picture.
A green tree stands on the left side of the image, next to a small brown house.
The house has a red roof, a white door and two square windows.
A black cat sleeps on a wooden table in front of a window.
Sketch the outline of the shape with thin dark lines before adding colour.
Fill the circle with a bright orange colour and add a darker shadow below it.
The triangle points up and the square sits below it.
A purple cone stands behind a green cylinder.
The pyramid is made of sand and casts a long shadow in the evening light.
Two blue spheres float above a grey plane.
Three small cubes are stacked on top of each other: red at the bottom, green in the middle, blue on top.
The camera looks at the scene from above, so the table appears as a rectangle.
Light comes from the left, so every shadow falls to the right.
Inspect the draft: is the cube really on top of the sphere?
Check the colours: the cube should be red and the sphere should be blue.
Compare the draft with the prompt and list what is missing.
The draft shows the sphere, but the cube is floating to the side instead of resting on top.
Move the cube down until it touches the top of the sphere.
Make the edges of the cube sharper and the shading of the sphere smoother.
The image is too dark; raise the brightness of the whole scene.
The colours are too pale; make the red stronger and the blue deeper.
Add a thin white highlight on the upper left of the sphere.
Keep the composition simple: one object on top of another, centred in the frame.
A watercolor painting of a lighthouse on a rocky coast.
A photo of a red cube on a blue table.
Make the sky purple and add a yellow sun.
What color is the object in the picture?
The object in the picture is a large orange ball.
Once upon a time there was a little robot who loved to paint.
The robot painted circles, squares and triangles in every colour it could find.
A white horse runs across a green field under a grey sky.
A small boat with a red sail floats on a calm blue lake.
Snow covers the tops of the mountains in the distance.
A bowl of fruit: two red apples, a yellow banana and a bunch of purple grapes.
A glass vase with three white flowers stands on the corner of the desk.
The street is wet after the rain and reflects the orange lights of the shops.
A child draws a house, a tree and a smiling sun with a box of crayons.
The artist starts with large shapes and only later adds the small details.
Use a light pencil for the first lines so that mistakes are easy to erase.
A good plan names every object, its colour, its size and its position.
The position of an object can be left, right, above, below, behind or in front of another object.
The size of an object can be small, medium, large or very large.
The cube is larger than the sphere, so it would fall off; make the cube smaller.
The sphere should be under the cube, not next to it.
The scene is balanced when the main object is near the centre of the image.
Look at the whole image, then at each part, then at the whole image again.
Describe the scene after each step: what is drawn, where it is and what colour it has.
After this step the image shows a blue sphere resting on a grey floor.
After this step the image shows a red cube on top of a blue sphere, on a grey floor, under a white light.
The instruction is clear: draw a red cube on top of a blue sphere.
The result matches the instruction, so no change is needed.
The result does not match the instruction, so the image must be refined.
Refine the image by changing only what is wrong and keeping everything else.
A cylinder is a circle pushed up into a tube; a cone is a circle that meets at a point.
A cube has six square faces, twelve edges and eight corners.
A sphere looks round from every side and has no edges.
A rectangle is longer than it is wide; a square has four equal sides.
A star has five points; a heart has two round tops and one point at the bottom.
Lines can be straight, curved, thick, thin, solid or dashed.
Colours can be warm like red, orange and yellow, or cool like blue, green and purple.
Black and white are not on the colour wheel, but grey sits between them.
Mixing blue and yellow gives green; mixing red and blue gives purple.
A shadow is darker than the object and has the same shape, bent by the ground.
Reflections on a shiny surface are bright and show the colours of the room.
The texture of wood has long lines; the texture of stone is rough and spotted.
The picture has a clear foreground, a middle ground and a background.
In the foreground there is a path; in the middle ground a bridge; in the background a castle.
A red bird sits on the branch of a tall green tree.
A blue car is parked in front of a yellow building.
An old man reads a book on a bench in the park.
A girl in a red coat walks her dog along the beach at sunset.
The moon is full and lights the quiet village with a silver glow.
A cup of hot coffee stands next to an open notebook and a pencil.
The table is round and made of dark wood; the chairs around it are white.
A map of the city hangs on the wall above the desk.
Two cats, one black and one white, sit side by side on the window sill.
The garden is full of flowers: red roses, yellow tulips and blue bells.
The river bends to the left and disappears behind the hills.
The road leads from the bottom of the image to a small town on the horizon.
The kite is high in the sky, tied to a long string held by a boy.
A pile of books leans against a lamp on the floor.
The clock on the tower shows ten past three.
A bright rainbow crosses the sky after the storm.
The ocean is calm and the sky is clear; a white ship sails toward the sun.
Draw the horizon line first, a little below the middle of the image.
Place the largest object first, then arrange the smaller objects around it.
Check that the light and the shadows agree with each other.
Check that every object named in the prompt appears in the image.
Check that the count is right: two apples means exactly two apples.
Check that the spatial relation is right: on top of means above and touching.
Check that the colour of each object matches the prompt.
If an object is missing, add it; if an object is wrong, change it; if it is right, keep it.
The first draft is rough; the refined image is clean and detailed.
The plan has three steps, and each step adds one part of the scene.
Think about what the viewer sees first and make it stand out.
A simple image with a clear subject is easier to check than a busy one.
The image should look natural, with soft light and believable colours.
The cube is made of red plastic and the sphere of blue glass.
The sphere is shiny and reflects the red cube above it.
The cube casts a small shadow on the top of the sphere.
The sphere casts a round shadow on the floor below it.
The floor is light grey and the wall behind it is white.
"""

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "brown")
SHAPES = ("cube", "sphere", "cone", "cylinder", "pyramid", "box", "ball", "ring", "disk", "star")
RELATIONS = (
    "on top of",
    "next to",
    "behind",
    "in front of",
    "to the left of",
    "to the right of",
    "under",
    "above",
)


def scene_lines() -> list[str]:
    """Deterministic scene and inspection sentences from the word lists (a few hundred lines)."""
    lines = []
    for i, relation in enumerate(RELATIONS):
        for j, shape in enumerate(SHAPES):
            colour = COLOURS[(i + j) % len(COLOURS)]
            other_colour = COLOURS[(i + 3 * j + 5) % len(COLOURS)]
            other_shape = SHAPES[(j + i + 1) % len(SHAPES)]
            lines.append(f"Draw a {colour} {shape} {relation} a {other_colour} {other_shape}.")
            lines.append(
                f"Is the {colour} {shape} {relation} the {other_colour} {other_shape}? Inspect the image."
            )
    for j, shape in enumerate(SHAPES):
        for k in range(0, len(COLOURS), 3):
            lines.append(
                f"The {shape} should be {COLOURS[(j + k) % len(COLOURS)]}, not {COLOURS[k]}; refine it."
            )
    return lines


def corpus() -> list[str]:
    return CORPUS.splitlines() + scene_lines()


def _train(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    if tokenizer.get_vocab_size(with_added_tokens=False) != vocab_size:
        raise ValueError(
            f"the corpus yields only {tokenizer.get_vocab_size(with_added_tokens=False)} BPE tokens, "
            f"fewer than vocab_size={vocab_size}"
        )
    # Added tokens right after the BPE vocabulary, with the golden tiny tokenizer's flags.
    tokenizer.add_special_tokens([AddedToken(ENDOFTEXT, normalized=False, special=True)])
    tokenizer.add_tokens([AddedToken(t, normalized=True, special=False) for t in BAGEL_TOKENS])
    return tokenizer


def _added_token_entry(content: str, special: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": not special,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_tokenizer(folder: Path, vocab_size: int = 384) -> None:
    """Train on `corpus()` and write the Qwen2 files into `folder` (the corpus supports up to ~790)."""
    if vocab_size <= 256:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols, got {vocab_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train(vocab_size)
    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges: list[list[str]] = spec["model"]["merges"]

    added = {ENDOFTEXT: vocab_size} | {t: vocab_size + 1 + i for i, t in enumerate(BAGEL_TOKENS)}
    for content, expected in added.items():
        if tokenizer.token_to_id(content) != expected:
            raise RuntimeError(f"{content} got id {tokenizer.token_to_id(content)}, expected {expected}")

    # Qwen2's tokenizer.json uses the ByteLevel post-processor (it adds nothing).
    spec["post_processor"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": False,
        "use_regex": True,
    }
    _write_json(folder / "tokenizer.json", spec)
    _write_json(folder / "vocab.json", dict(sorted(vocab.items(), key=lambda item: item[1])))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )
    _write_json(folder / "added_tokens.json", dict(sorted(added.items())))
    endoftext = _added_token_entry(ENDOFTEXT, special=True)
    endoftext_map = {k: v for k, v in endoftext.items() if k != "special"}
    _write_json(
        folder / "special_tokens_map.json",
        {"eos_token": endoftext_map, "pad_token": endoftext_map, "unk_token": endoftext_map},
    )
    _write_json(
        folder / "tokenizer_config.json",
        {
            "added_tokens_decoder": {
                str(i): _added_token_entry(content, special=content == ENDOFTEXT)
                for content, i in added.items()
            },
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": ENDOFTEXT,
            "errors": "replace",
            "extra_special_tokens": {},
            "model_max_length": 32768,
            "pad_token": ENDOFTEXT,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": ENDOFTEXT,
        },
    )
