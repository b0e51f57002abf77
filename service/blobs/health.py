"""How the blob store fails, and how it is doing: its two kinds of error, its state, its metrics.

A blob store's failure is never an OSError (service/queue/client.py's TRANSIENT is Redis being
away, nothing else), and never one thing:

    BlobUnavailable  transient: unreachable, too slow, overloaded, a server error. The store
                     retries it itself with a bounded backoff (store.py) and raises it once the
                     retries are spent: a worker retries the job later (or defers one it was
                     preparing, without a failure mark); the API answers 503.
    BlobRefused      permanent: the store answers and refuses (a missing bucket, access denied,
                     a full or read-only disk). Nothing changes until an operator acts, so it is
                     never retried: a worker fails the job at once with `storage_unavailable`
                     (its cause in words) and lives on, its model loaded; the API answers 503.

`BlobHealth` is one store's state, from the outcome of its latest call (ok, unavailable or refused,
with the cause and since when) and its errors counted by kind. /readyz reports it (after a probe,
`check()`), and `BlobStoreCollector` exposes it to Prometheus, in the API and in every worker:

    strokes_blob_store_up                 1 when the latest call succeeded, else 0
    strokes_blob_store_state{state}       1 for the current state (ok, unavailable, refused)
    strokes_blob_store_errors_total{kind} failed calls, by kind (unavailable, refused); a transient
                                          error retried inside one call counts each time
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from enum import Enum

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class BlobError(Exception):
    """The blob store failed a call. `cause` says why, in words (for the job's error and logs)."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


class BlobUnavailable(BlobError):
    """Transient: unreachable, too slow, overloaded, or a server error (retried, then raised)."""


class BlobRefused(BlobError):
    """Permanent: the store refuses (missing bucket, access denied, disk full, read-only)."""


class BlobState(str, Enum):
    ok = "ok"
    unavailable = "unavailable"
    refused = "refused"


# A local file system's errors that retrying cannot mend, in words.
_REFUSED_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EISDIR: "the path is a directory",
    errno.ENAMETOOLONG: "the path is too long",
}


def classify_os_error(exc: OSError, what: str) -> BlobError:
    """A local file system's OSError as a BlobError: refused when retrying cannot help."""
    words = _REFUSED_ERRNOS.get(exc.errno or -1)
    where = f" ({exc.filename})" if exc.filename else ""
    if words is not None:
        return BlobRefused(f"{what}: {words}{where}")
    return BlobUnavailable(f"{what}: {exc.strerror or exc}{where}")


@dataclass
class BlobHealth:
    """One store's state: its latest call's outcome, and its errors counted by kind."""

    state: BlobState = BlobState.ok
    cause: str = ""
    since: float = field(default_factory=time.time)  # when the state last changed
    errors: dict[BlobState, int] = field(
        default_factory=lambda: {BlobState.unavailable: 0, BlobState.refused: 0}
    )

    def succeeded(self) -> None:
        self._become(BlobState.ok, "")

    def failed(self, exc: BlobError) -> None:
        kind = BlobState.refused if isinstance(exc, BlobRefused) else BlobState.unavailable
        self.errors[kind] += 1
        self._become(kind, exc.cause)

    def _become(self, state: BlobState, cause: str) -> None:
        if state != self.state:
            self.since = time.time()
        self.state, self.cause = state, cause

    def describe(self) -> dict[str, object]:
        """What /readyz shows: the state, its cause and since when."""
        return {"state": self.state.value, "cause": self.cause or None, "since": round(self.since, 3)}


class BlobStoreCollector:
    """The store's state for a Prometheus registry (read at scrape time)."""

    def __init__(self, health: BlobHealth):
        self.health = health

    def collect(self):
        h = self.health
        up = GaugeMetricFamily("strokes_blob_store_up", "1 when the blob store's latest call succeeded")
        up.add_metric([], 1.0 if h.state == BlobState.ok else 0.0)
        state = GaugeMetricFamily(
            "strokes_blob_store_state", "the blob store's state (1 for the current one)", labels=["state"]
        )
        for s in BlobState:
            state.add_metric([s.value], 1.0 if h.state == s else 0.0)
        errors = CounterMetricFamily(
            "strokes_blob_store_errors", "failed blob store calls, by kind", labels=["kind"]
        )
        for kind, count in h.errors.items():
            errors.add_metric([kind.value], float(count))
        return [up, state, errors]
