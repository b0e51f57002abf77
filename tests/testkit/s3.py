"""The S3 blob store's settings, pointed at the test session's S3 server (the `s3_server` fixture)."""

from __future__ import annotations

from strokes.service.shared.settings import Settings

S3_BUCKET = "strokes-test"  # made by the s3_server fixture


def s3_env(endpoint: str, prefix: str) -> dict[str, str]:
    """The settings (env_with keywords) of the S3 blob store at `endpoint`, objects under `prefix`."""
    return {
        "blob_backend": "s3",
        "s3_bucket": S3_BUCKET,
        "s3_prefix": prefix,
        "s3_endpoint_url": endpoint,
        "s3_access_key_id": "test",
        "s3_secret_access_key": "test",
        "s3_addressing_style": "path",
    }


def s3_settings(base: Settings, endpoint: str, prefix: str, **changes: object) -> Settings:
    """`base` with the S3 blob store at `endpoint`, objects under `prefix`."""
    return Settings(**{**base.model_dump(), **s3_env(endpoint, prefix), **changes})
