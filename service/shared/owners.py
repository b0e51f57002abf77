"""Owners: a job belongs to the API key that created it, recorded as the key's digest (the key itself
is never stored or logged). "" is the owner of every job when the service has no API keys.

The API authenticates a caller to its owner id (service/api/auth.py); the webhook dispatcher finds
the signing secrets of a job's key by the same id (service/shared/webhooks.py `signers`).
"""

from __future__ import annotations

import hashlib


def owner_of(key: str) -> str:
    """The owner id of an API key: a short hex digest, safe in Redis keys and logs."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]
