"""Optional bearer API keys. With none configured the service is open and every job has owner "".

A job belongs to the key that created it: its owner is a digest of that key (the key itself is
never stored or logged: service/shared/owners.py), and every read, stream and cancel checks it. Another key's job answers
404, exactly like an unknown id, so ids cannot be probed.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from strokes.service.api.deps import SettingsDep
from strokes.service.api.errors import Unauthorized
from strokes.service.shared.owners import owner_of
from strokes.service.shared.settings import Settings

bearer = HTTPBearer(auto_error=False, description="API key, when the service is configured with keys")


def authenticate(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The owner id of the caller ("" when the service has no keys); raises Unauthorized."""
    if not settings.api_keys:
        return ""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized()
    presented = owner_of(credentials.credentials)
    match = False
    for key in settings.api_keys:  # constant time per key, and every key is checked
        secret = key.get_secret_value() if isinstance(key, SecretStr) else str(key)
        match |= hmac.compare_digest(presented, owner_of(secret))
    if not match:
        raise Unauthorized("the API key is not valid")
    return presented


async def get_owner(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    return authenticate(settings, credentials)


OwnerDep = Annotated[str, Depends(get_owner)]
