"""Webhooks, the parts the API and the dispatcher share: which events a job may subscribe to,
the address check against server-side request forgery, and Standard Webhooks signing.

A job names `webhook_url` and `webhook_events` (default: the terminal events). The job hash keeps
`webhook_url` and `webhook_events` as ",name,name," (so the Lua emit path tests membership with
one plain `string.find`), and the emit path copies every matching event into the outbox stream
keys.WEBHOOK_OUTBOX; `strokes webhooks` (service/webhooks/dispatcher.py) delivers them.

Address check: every address the URL's host resolves to must be public (not loopback, private,
link-local, shared, multicast, reserved or unspecified) unless it lies in a network of
`webhook_allow_networks`. The API checks at submit (422); the dispatcher checks again before each
delivery and connects to the address it checked (DNS rebinding cannot swap it in between).

Signing (https://www.standardwebhooks.com/): `webhook-id` (the same on every retry of a message),
`webhook-timestamp` (Unix seconds of this attempt), `webhook-signature` =
"v1," + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")), the secret given as
"whsec_" + base64(key bytes). Each API key has its own secrets (STROKES_WEBHOOK_SECRETS), so a
tenant who can verify its deliveries holds nothing that verifies, or forges, another tenant's; the
job hash names whose secrets sign it (`webhook_signer`: the owner id, never a secret) and the
outbox entry carries it to the dispatcher (`signers` maps it to the keys). Without API keys the
one owner "" signs with STROKES_WEBHOOK_SECRET. Rotation: a key's entry (or the server-wide
secret) may hold several secrets separated by spaces (new first); every message then carries one
signature per secret, space-separated as the specification allows, so a receiver still on the old
secret and one already on the new one both verify it. Drop the old one once every receiver has
switched.

Message ids (`webhook-id`) are stable across retries and dispatchers. A terminal event's id is the
job's and its terminal kind's (`msg_<job>_job.completed`), not its event's: should a finish be
replayed (a Redis failover that lost it, so the job ran again), the second job.completed reaches
the receiver under the same id as the first, and de-duplication by id catches it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from strokes.service.shared.owners import owner_of
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import (
    ITERATION_COMPLETED,
    JOB_CANCELED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_PAUSED,
    JOB_RESUMED,
    JOB_STARTED,
    STAGE_COMPLETED,
    STAGE_STARTED,
    TERMINAL_EVENTS,
)

# text.delta and image.progress are per token / per step: far too many for HTTP callbacks (SSE
# carries them); job.queued is the POST's own answer.
EVENTS = (
    JOB_STARTED,
    STAGE_STARTED,
    STAGE_COMPLETED,
    ITERATION_COMPLETED,
    JOB_PAUSED,
    JOB_RESUMED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_CANCELED,
)
DEFAULT_EVENTS = (JOB_COMPLETED, JOB_FAILED, JOB_CANCELED)
SECRET_PREFIX = "whsec_"
MAX_URL_CHARS = 2048


class UnsafeURL(Exception):
    """The webhook URL is malformed, does not resolve, or resolves to a refused address."""


class Unresolvable(UnsafeURL):
    """The host does not resolve (now): refused at submit, retried at delivery."""


def hash_fields(url: str, events: list[str] | None, signer: str = "") -> dict[str, str]:
    """The job-hash fields of a job's subscription; `signer` is the owner id whose secrets sign it."""
    chosen = list(dict.fromkeys(events or DEFAULT_EVENTS))
    return {"webhook_url": url, "webhook_events": "," + ",".join(chosen) + ",", "webhook_signer": signer}


def signers(settings: Settings) -> dict[str, list[bytes]]:
    """Signer id (an owner id) -> its signing keys, new first: each API key's own secrets, and the
    server-wide secret for the owner "" of a service without API keys. Nothing else signs."""
    out: dict[str, list[bytes]] = {}
    for key, secrets in settings.webhook_secrets.items():
        out[owner_of(key)] = secret_keys(secrets.get_secret_value())
    if settings.webhook_secret is not None and not settings.api_keys:
        out[""] = secret_keys(settings.webhook_secret.get_secret_value())
    return out


# ---- the address check --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (`address`) and what to say in Host and SNI (`host`)."""

    scheme: str
    host: str
    port: int
    address: str
    path: str  # path and query

    def connect_url(self) -> str:
        literal = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{literal}:{self.port}{self.path}"

    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


def parse_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of an http(s) URL; raises UnsafeURL."""
    if len(url) > MAX_URL_CHARS:
        raise UnsafeURL(f"is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL("must be an http or https URL")
    if not parts.hostname:
        raise UnsafeURL("has no host")
    if parts.username or parts.password:
        raise UnsafeURL("must not carry credentials")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path


def refused(address: str, allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """Why `address` may not be called (None: it may)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allow):
        return None
    for name in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            return f"{name.replace('_', '-')} address {ip}"
    if not ip.is_global:  # shared address space (100.64/10), documentation ranges, ...
        return f"non-public address {ip}"
    return None


def networks(specs: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(spec, strict=False) for spec in specs]


async def resolve(url: str, allow: list[str], timeout_s: float) -> Target:
    """Parse and resolve `url`; every address must pass `refused`. Raises UnsafeURL."""
    scheme, host, port, path = parse_url(url)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), timeout_s
        )
    except (OSError, TimeoutError) as exc:
        raise Unresolvable(f"host {host!r} does not resolve") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise Unresolvable(f"host {host!r} does not resolve")
    allowed = networks(allow)
    for address in addresses:  # all of them: a resolver may answer in any order
        why = refused(address, allowed)
        if why is not None:
            raise UnsafeURL(f"host {host!r} resolves to a {why}, which is refused")
    return Target(scheme, host, port, addresses[0], path)


# ---- signing ------------------------------------------------------------------------------------


def secret_bytes(secret: str) -> bytes:
    """The key of a "whsec_<base64>" secret; raises ValueError for a malformed one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except ValueError:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("a webhook secret needs at least 16 bytes of key")
    return key


def secret_keys(secrets: str) -> list[bytes]:
    """The keys of a space-separated list of "whsec_<base64>" secrets (rotation: new first);
    raises ValueError naming the malformed one."""
    parts = secrets.split()
    if not parts:
        raise ValueError("no secret given")
    keys = []
    for n, secret in enumerate(parts, 1):
        try:
            keys.append(secret_bytes(secret))
        except ValueError as exc:
            raise ValueError(f"secret {n} of {len(parts)}: {exc}") from None
    return keys


def sign(keys: list[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: "v1,<base64>" per key, space-separated."""
    signed = message_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys
    )


def message_id(job_id: str, event: str, event_id: str) -> str:
    """Stable across retries and dispatchers: the job and its event's id in the event log; for a
    terminal event the job and its terminal kind, so a replayed end is never delivered as new."""
    if event in TERMINAL_EVENTS:
        return f"msg_{job_id}_{event}"
    return f"msg_{job_id}_{event_id}"


def body(event: str, event_id: str, data: str) -> bytes:
    """The delivered JSON: Standard Webhooks' {type, timestamp, data}; data is the SSE event's."""
    millis = int(event_id.split("-")[0])
    stamp = datetime.fromtimestamp(millis / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
    payload: dict[str, Any] = {
        "type": event,
        "timestamp": stamp.replace("+00:00", "Z"),
        "data": json.loads(data),
    }
    return json.dumps(payload, separators=(",", ":")).encode()
