"""Direct links to blobs: image refs in job views and events rewritten to the store's own
(presigned) URLs, where the store hands them out (S3 with `s3_presign`), so image bytes bypass the API.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from strokes.service.blobs.store import BlobStore
from strokes.service.shared.images import INPUT_IMAGE_ID, storage_key
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import image_url


def presign_refs(value: Any, job_id: str, attempt_of: Callable[[str], int | None], blobs: BlobStore) -> Any:
    """Every image ref ({"id", "url": the API's image route, ...}) in a JSON value gets the
    store's direct URL instead, where the store has one and the image's attempt is known."""
    if isinstance(value, list):
        return [presign_refs(v, job_id, attempt_of, blobs) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: presign_refs(v, job_id, attempt_of, blobs) for k, v in value.items()}
    image_id = out.get("id")
    if isinstance(image_id, str) and out.get("url") == image_url(job_id, image_id):
        attempt = attempt_of(image_id)
        if attempt is not None:
            direct = blobs.url(storage_key(job_id, attempt, image_id))
            if direct is not None:
                out["url"] = direct
    return out


def event_links(blobs: BlobStore, settings: Settings) -> Callable[[Any], Any] | None:
    """For the SSE hub: an event (with .data JSON text and .attempt) with its image links presigned,
    or None when links stay the API's (no rewriting at all)."""
    if settings.blob_backend != "s3" or not settings.s3_presign:
        return None

    def rewrite(event: Any) -> Any:
        if '"url"' not in event.data:
            return event
        data = json.loads(event.data)
        job_id = data.get("job_id")
        if not isinstance(job_id, str):
            return event

        def attempt_of(image_id: str) -> int:
            return 0 if image_id == INPUT_IMAGE_ID else event.attempt

        return dataclasses.replace(event, data=json.dumps(presign_refs(data, job_id, attempt_of, blobs)))

    return rewrite
