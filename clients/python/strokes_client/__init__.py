"""strokes_client: a small client (sync and async) for the strokes image generation API.

    from strokes_client import Client

    with Client("http://127.0.0.1:8000") as client:
        job = client.create(prompt="a red cube on a blue sphere", width=256, height=256)
        for event in client.events(job.id):
            print(event.name, event.data)
        job = client.wait(job.id)
        client.download_image(job.id, job.final_image, path="final.png")

Only dependency: httpx. See README.md beside this package.
"""

from strokes_client import events
from strokes_client.aio import AsyncClient
from strokes_client.events import (
    Event,
    ImageProgress,
    IterationCompleted,
    JobCanceled,
    JobCompleted,
    JobPaused,
    JobQueued,
    JobResumed,
    JobStarted,
    StageCompleted,
    StageStarted,
    TextDelta,
    UnknownEvent,
)
from strokes_client.models import (
    APIError,
    GenerationFailed,
    ImageRef,
    Job,
    Page,
    ParentRef,
    PauseInfo,
    StrokesError,
)
from strokes_client.sync import Client

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AsyncClient",
    "Client",
    "Event",
    "GenerationFailed",
    "ImageProgress",
    "ImageRef",
    "IterationCompleted",
    "Job",
    "JobCanceled",
    "JobCompleted",
    "JobPaused",
    "JobQueued",
    "JobResumed",
    "JobStarted",
    "Page",
    "ParentRef",
    "PauseInfo",
    "StageCompleted",
    "StageStarted",
    "StrokesError",
    "TextDelta",
    "UnknownEvent",
    "events",
]
