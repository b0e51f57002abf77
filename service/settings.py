"""Service settings: one pydantic-settings object, read from STROKES_* environment variables.

Handlers get it through the `get_settings` dependency (`SettingsDep`), so tests build a Settings
and override the dependency instead of patching globals. Command-line flags of `strokes api`,
`strokes worker` and `strokes serve` override the environment.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from fastapi import Depends
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STROKES_", extra="ignore")

    # Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_connect_timeout_s: float = 0.5
    redis_timeout_s: float = 1.5  # socket timeout of ordinary commands: Redis down -> 503 within 2 s
    redis_deadline_s: float = 1.9  # hard ceiling on one API request's Redis work
    waitaof_timeout_ms: int = 500  # the accept path waits this long for the AOF fsync (Redis >= 7.2)

    # Admission and limits
    queue_cap: int = Field(200, ge=1)  # accepted-but-not-started jobs; beyond it POST answers 429
    mean_job_seconds: float = 30.0  # prior for Retry-After until finished jobs have measured one
    max_body_bytes: int = 16 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096  # decompression-bomb guard for input images
    max_side: int = 1024  # largest width/height a request may ask for (BAGEL's bound)
    max_job_cost: int = Field(16_000_000, ge=1)  # token-steps per job (service/budget.py's formula)
    max_positions: int = Field(32768, ge=1)  # the model's max_position_embeddings
    key_max_jobs: int = Field(20, ge=0)  # queued + running jobs per API key (0: none; no keys: none)

    # Job life
    max_attempts: int = Field(3, ge=1)  # failures (errors or dead workers) before the dead letters
    heartbeat_interval_s: float = 2.0
    lease_ttl_s: float = 10.0  # a worker whose heartbeat is older than this has lost its jobs
    reclaim_interval_s: float = 1.0
    # Nothing is reclaimed until Redis has been up this long (default: a lease + a heartbeat), so
    # live workers re-establish their heartbeats after a Redis restart before anyone reclaims.
    restart_grace_s: float | None = Field(None, ge=0)
    poll_block_ms: int = 1000
    cancel_poll_s: float = 0.05  # the pipeline thread reads the cancel flag at most this often
    handback_wait_s: float = Field(0.5, ge=0)  # SIGTERM: a step still running after this is dropped
    events_maxlen: int = 50000  # events kept per job, all attempts; requests that could emit more are refused
    job_deadline_s: float = Field(1800.0, gt=0)  # a running attempt is failed after this long
    progress_timeout_s: float = Field(300.0, gt=0)  # no event for this long: failed, the worker exits
    delta_max_tokens: int = Field(16, ge=1)  # text.delta coalescing: at most this many pieces ...
    delta_max_ms: int = Field(100, ge=0)  # ... or this old, whichever comes first
    torch_threads: int = Field(0, ge=0)  # CPU workers' torch threads; 0: cores / local_workers
    local_workers: int = Field(1, ge=1)  # workers sharing this machine's cores
    events_ttl_s: int = 3600  # the event log is kept this long after the terminal event
    result_ttl_s: int = 86400  # job hash, images and trajectory are kept this long after the end
    idempotency_ttl_s: int = 86400

    # SSE
    sse_ping_s: float = 15.0
    sse_send_timeout_s: float = 30.0
    sse_block_ms: int = 5000
    sse_retry_ms: int = 2000
    sse_max_streams: int = 2000

    # Security and readiness
    api_keys: Annotated[list[SecretStr], NoDecode] = []  # empty: no authentication
    ready_requires_worker: bool = True  # false for scale-to-zero worker pools

    # Logs
    log_level: str = "INFO"
    log_prompts: bool = False  # prompt text in INFO logs

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        # STROKES_API_KEYS="key1,key2" (or a JSON list)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()


SettingsDep = Annotated[Settings, Depends(get_settings)]
