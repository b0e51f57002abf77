#!/usr/bin/env python3
"""Container healthcheck for both roles of the strokes image: exit 0 when the role's endpoint answers 2xx.

    strokes-healthcheck [URL ...]

URLs come from the arguments, else from STROKES_HEALTHCHECK_URL (space-separated), else the two
defaults: the API's liveness endpoint on 8000 and a worker's metrics endpoint on 9100. Only one
of them listens in a given container, so "any answers 2xx" is healthy for whichever role it runs,
and the image needs one HEALTHCHECK line for both. Standard library only, no proxy (a proxy
variable set for outbound traffic must not swallow a loopback probe), a short timeout.
"""

from __future__ import annotations

import os
import sys
import urllib.request

DEFAULT_URLS = ("http://127.0.0.1:8000/healthz", "http://127.0.0.1:9100/metrics")
TIMEOUT_S = 3.0

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def answers_2xx(url: str) -> bool:
    try:
        with _opener.open(url, timeout=TIMEOUT_S) as response:
            return 200 <= response.status < 300
    except (OSError, ValueError):  # refused, timed out, HTTP 4xx/5xx (HTTPError), malformed URL
        return False


def main(argv: list[str]) -> int:
    urls = argv or os.environ.get("STROKES_HEALTHCHECK_URL", "").split() or list(DEFAULT_URLS)
    if any(answers_2xx(url) for url in urls):
        return 0
    print(f"unhealthy: no 2xx from {' '.join(urls)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
