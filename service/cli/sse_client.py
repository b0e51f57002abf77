"""A minimal Server-Sent Events reader for httpx responses (the demo, the benchmark, the tests).

Parses the WHATWG event-stream format: `event:`, `data:` (joined with newlines), `id:` (kept
across events until replaced), `retry:`, and `:` comments; a blank line dispatches the event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SSE:
    event: str
    data: str
    id: str | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


class _Parser:
    def __init__(self) -> None:
        self.event, self.data, self.last_id, self.comments = "", [], None, []

    def feed(self, line: str) -> SSE | None:
        if line == "":
            if not self.data and not self.event:
                self.comments = []
                return None
            out = SSE(self.event or "message", "\n".join(self.data), self.last_id, self.comments)
            self.event, self.data, self.comments = "", [], []
            return out
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "id" and "\x00" not in value:
            self.last_id = value
        return None


def iter_sse(lines: Iterable[str]) -> Iterator[SSE]:
    parser = _Parser()
    for line in lines:
        event = parser.feed(line.rstrip("\r\n"))
        if event is not None:
            yield event


async def aiter_sse(lines: AsyncIterator[str]) -> AsyncIterator[SSE]:
    parser = _Parser()
    async for line in lines:
        event = parser.feed(line.rstrip("\r\n"))
        if event is not None:
            yield event
