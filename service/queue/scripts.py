"""The Lua scripts of service/queue/lua/, read once.

Every script lives in lua/<name>.lua (with prelude.lua in front) and is idempotent under retry: the
client re-sends a command whose reply was lost, so running a script twice with the same arguments
must leave the same state, and give the same reply, as once (tests run each twice).
"""

from __future__ import annotations

from pathlib import Path

from strokes.service.queue import keys

LUA_DIR = Path(__file__).resolve().parent / "lua"
SCRIPT_NAMES = (
    "enqueue",
    "start",
    "emit",
    "finish",
    "requeue",
    "cancel",
    "reclaim",
    "heartbeat",
    "trim",
    "position",
    "reconcile",
)


def load_script(name: str, outbox_max: int) -> str:
    """service/queue/lua/{name}.lua with the shared prelude in front (the webhook outbox's keys and
    its bound, `webhook_outbox_max`, filled in)."""
    prelude = (
        (LUA_DIR / "prelude.lua")
        .read_text()
        .replace("{{WEBHOOK_OUTBOX}}", keys.WEBHOOK_OUTBOX)
        .replace("{{WEBHOOK_DEAD}}", keys.WEBHOOK_DEAD)
        .replace("{{WEBHOOK_DROPPED}}", keys.WEBHOOK_DROPPED)
        .replace("{{WEBHOOK_OUTBOX_MAX}}", str(int(outbox_max)))
    )
    return prelude + "\n" + (LUA_DIR / f"{name}.lua").read_text()


def load_scripts(outbox_max: int) -> dict[str, str]:
    """Every script of the store, read once per store."""
    return {name: load_script(name, outbox_max) for name in SCRIPT_NAMES}
