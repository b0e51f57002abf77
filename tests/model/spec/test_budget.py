"""The one formula of what a generation can cost (model/spec/budget.py), torch-free: the latent grid
of the model's geometry, the guidance branches, and the worst case of each protocol."""

from __future__ import annotations

from strokes.model.spec.budget import (
    BAGEL_7B_MOT,
    IMAGE_POSITIONS,
    TEXT_TOKEN_WEIGHT,
    Geometry,
    branches,
    estimate,
    generation_tokens,
)
from strokes.model.spec.params import GenerationParams, ImageSettings, TextSettings


def _params(**changes) -> GenerationParams:
    base = GenerationParams(
        prompt="a red cube",
        width=256,
        height=128,
        max_iterations=2,
        draft=ImageSettings(steps=10),
        refine=ImageSettings(steps=20, cfg_img_scale=2.0),
        plan=TextSettings(max_tokens=7),
        reflect=TextSettings(max_tokens=5),
    )
    return base.replace(**changes)


def test_an_images_tokens_are_its_latent_grid_in_the_models_geometry():
    assert generation_tokens(BAGEL_7B_MOT, 1024, 1024) == 64 * 64
    assert generation_tokens(BAGEL_7B_MOT, 256, 128) == 16 * 8
    assert generation_tokens(Geometry(latent_downsample=8), 256, 128) == 32 * 16  # another model's


def test_each_guidance_scale_above_one_is_a_branch():
    assert branches(ImageSettings(cfg_text_scale=1.0, cfg_img_scale=1.0)) == 1
    assert branches(ImageSettings(cfg_text_scale=4.0, cfg_img_scale=1.0)) == 2
    assert branches(ImageSettings(cfg_text_scale=4.0, cfg_img_scale=2.0)) == 3


def test_a_guided_job_costs_its_two_images_and_two_texts_per_iteration():
    p = _params()
    est = estimate(p, input_image=False, iterations=2)
    tokens = 16 * 8
    per_iteration = tokens * 2 * 10 + tokens * 3 * 20 + (7 + 5) * TEXT_TOKEN_WEIGHT
    assert est.cost == 2 * per_iteration and est.images == 4
    assert est.events == 2 * (7 + 5 + 10 + 20 + 9)
    # an input image adds its two blocks (ViT and VAE) to the context, and costs no steps
    with_image = estimate(p, input_image=True, iterations=2)
    assert with_image.positions == est.positions + 2 * IMAGE_POSITIONS and with_image.cost == est.cost


def test_an_interleaved_job_is_priced_at_the_dearer_image_settings_for_every_image():
    p = _params(protocol="interleaved")
    est = estimate(p, input_image=False, iterations=2)
    dearer = 16 * 8 * 3 * 20  # the refine settings: three branches, 20 steps
    assert est.cost == 4 * dearer + (3 * 2 + 1) * 7 * TEXT_TOKEN_WEIGHT


def test_previews_and_more_iterations_only_ever_cost_more():
    p = _params()
    base = estimate(p, input_image=False, iterations=2)
    assert estimate(p.replace(preview_every=2), input_image=False, iterations=2).cost > base.cost
    longer = estimate(p, input_image=False, iterations=4)  # a follow-up replays its parent's first
    assert longer.cost == 2 * base.cost and longer.positions > base.positions
