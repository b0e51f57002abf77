"""The trajectory: a JSON record of every stage of one generation, usable as a dataset sample.

One record per stage, in order: the instruction the pipeline added (if any), the text the model
wrote (plans, reflections) with its verdict, or the image it drew (by its image id, e.g.
`it1-draft`, with the exact settings), plus timings and token counts. The image id is the same
everywhere: the API serves it at /v1/generations/{job}/images/{image_id}, and `strokes generate`
(and the client's example script) write it to the file `{image_id}.png`. For forks and resumes
(model/spec/forks.py) each stage also records the random generator's state after it (`rng`, and
`rng_vae` before an image's VAE posterior draw); a fork's record names its `parent` and marks
replayed stages `inherited`. `strokes generate` writes it as
trajectory.json beside the images; the service stores it with the job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from strokes.model.spec.params import GenerationParams, settings_dict

VERSION = 2  # 2: images are named by their id (it1-draft), not a file name (it1-draft.png)


@dataclass
class Trajectory:
    params: GenerationParams
    seed: int
    stages: list[dict[str, Any]] = field(default_factory=list)
    parent: dict[str, Any] | None = None  # a fork's lineage (model/spec/forks.py): job, fork point, edit
    started: float = field(default_factory=time.perf_counter)

    def add(self, **record: Any) -> dict[str, Any]:
        record = {k: v for k, v in record.items() if v is not None}
        self.stages.append(record)
        return record

    def to_dict(self, final_image_id: str | None, iterations: int, usage: dict[str, int]) -> dict[str, Any]:
        p = self.params
        return {
            "version": VERSION,
            "method": "Think in Strokes, Not Pixels (arXiv 2604.04746): plan, draft, reflect, refine",
            "prompt": p.prompt,
            "protocol": p.protocol,
            "seed": self.seed,
            "width": p.width,
            "height": p.height,
            "settings": {
                "max_iterations": p.max_iterations,
                "think": p.think,
                "draft": settings_dict(p.draft),
                "refine": settings_dict(p.refine),
                "plan": settings_dict(p.plan),
                "reflect": settings_dict(p.reflect),
                "templates": dict(p.templates),
                "starting_image": p.input_image is not None,
            },
            "parent": self.parent,
            "stages": self.stages,
            "iterations": iterations,
            "final_image": final_image_id,
            "seconds": round(time.perf_counter() - self.started, 4),
            "usage": usage,
        }
