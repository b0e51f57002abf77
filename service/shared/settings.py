"""Service settings: one pydantic-settings object, read from STROKES_* environment variables.

The API's handlers get it through the `get_settings` dependency (service/api/deps.py `SettingsDep`),
so tests build a Settings and override the dependency instead of patching globals. Command-line flags of `strokes api`,
`strokes worker` and `strokes serve` override the environment.
"""

from __future__ import annotations

import ipaddress
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    # hide_input_in_errors: a malformed secret (API keys, S3, webhooks) must not reach the logs
    model_config = SettingsConfigDict(env_prefix="STROKES_", extra="ignore", hide_input_in_errors=True)

    # Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_connect_timeout_s: float = 0.5
    redis_timeout_s: float = 1.5  # socket timeout of ordinary commands: Redis down -> 503 within 2 s
    redis_deadline_s: float = 1.9  # hard ceiling on one API request's Redis work
    waitaof_timeout_ms: int = 500  # the accept path waits this long for the AOF fsync (Redis >= 7.2)

    # Redis high availability (service/README.md, "Failover and durability"). Sentinel is named by
    # the URL (redis+sentinel://...) or by redis_sentinels + redis_master_name, the master's password
    # and database then coming from redis_url (whose host is not used). redis_min_replicas > 0:
    # every write the service acknowledges waits for that many replicas (WAIT), and what readers pass
    # on (SSE, webhooks) is only what that many replicas hold; a failover then loses none of it.
    redis_sentinels: Annotated[list[str], NoDecode] = []  # "host:port,host:port,..."
    redis_master_name: str = "strokes"
    redis_sentinel_password: SecretStr | None = None  # the Sentinels' own password, if they have one
    redis_min_replicas: int = Field(0, ge=0)
    redis_replica_timeout_ms: int = Field(500, ge=1)  # beyond it: 503 (API), retried (workers)

    # Admission and limits
    queue_cap: int = Field(200, ge=1)  # accepted-but-not-started jobs; beyond it POST answers 429
    mean_job_seconds: float = 30.0  # prior for Retry-After until finished jobs have measured one
    max_body_bytes: int = 16 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096  # decompression-bomb guard for input images
    max_side: int = 1024  # largest width/height a request may ask for (BAGEL's bound)
    max_job_cost: int = Field(16_000_000, ge=1)  # token-steps per job (service/api/budget.py's formula)
    max_positions: int = Field(32768, ge=1)  # the model's max_position_embeddings
    key_max_jobs: int = Field(20, ge=0)  # queued + running jobs per API key (0: none; no keys: none)

    # Job life
    max_attempts: int = Field(3, ge=1)  # failures (errors or dead workers) before the dead letters
    heartbeat_interval_s: float = 2.0
    lease_ttl_s: float = 10.0  # a worker whose heartbeat is older than this has lost its jobs
    reclaim_interval_s: float = 1.0
    # Nothing a worker held is reclaimed within this long (default: a lease + a heartbeat) of Redis
    # starting, a new master (failover) or two heartbeats with no worker writing (an outage), so
    # live workers re-establish their heartbeats before anyone reclaims.
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
    result_ttl_s: int = 86400  # the job hash is kept this long after the end (blobs: blob_*_ttl_s)
    idempotency_ttl_s: int = 86400
    # The owner's job list (GET /v1/generations): the newest jobs_index_max ids; the index key
    # expires this long after the owner's last submission (keep it above the longest queue wait
    # plus result_ttl_s, or old jobs still stored drop out of the list).
    jobs_index_max: int = Field(10000, ge=1)
    jobs_index_ttl_s: int = 7 * 86400
    prefer_wait_max_s: float = 60.0  # the longest `Prefer: wait=N` a POST honours

    # Blob store (service/blobs/store.py): image bytes live here, never in Redis
    blob_backend: Literal["local", "s3"] = "local"
    blob_dir: Path = Path(tempfile.gettempdir()) / "strokes-blobs"  # local: shared by API and workers
    blob_output_ttl_s: int = Field(90000, ge=60)  # outputs and previews: the result TTL + 1 h of run
    blob_input_ttl_s: int = Field(172800, ge=60)  # an input older than this is swept, job or not
    blob_keep_inputs: bool = False  # keep an input after its job ends (until blob_input_ttl_s)
    blob_orphan_s: int = Field(3600, ge=60)  # local: a temp file of an interrupted write this old goes
    blob_sweep_interval_s: float = Field(600.0, ge=0)  # 0: never sweep (an S3 lifecycle rule does it)
    blob_timeout_s: float = 10.0  # one blob read or write, beyond which the API answers 503
    # Uploads are stored at the size the model will use: BAGEL's VAE input resize
    # (MaxLongEdgeMinShortEdgeResize: longest side, shortest side, stride, max pixels).
    upload_resize: tuple[int, int, int, int] = (1024, 512, 16, 14 * 14 * 9 * 1024)
    s3_bucket: str = ""
    s3_prefix: str = "strokes/"
    s3_endpoint_url: str | None = None  # MinIO, R2, GCS interop; None: AWS
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None  # None: the default credential chain (IAM role, ...)
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"  # MinIO: path
    s3_presign: bool = False  # events and status carry presigned URLs: image bytes bypass the API
    s3_presign_ttl_s: int = Field(3600, ge=1, le=604800)
    s3_public_endpoint_url: str | None = None  # the endpoint clients reach, when not s3_endpoint_url
    pause_timeout_s: int = Field(3600, ge=1)  # a pause unanswered this long ends the job (canceled)
    pause_sweep_interval_s: float = Field(15.0, ge=0)  # the API ends expired pauses this often (0: off)
    # A worker keeps the KV caches of its recently paused or finished jobs for resumes and forks
    # (model/generation/warm.py): this much on its GPU, then this much in host memory (both host on a CPU).
    warm_device_bytes: int = Field(4 * 1024**3, ge=0)
    warm_host_bytes: int = Field(8 * 1024**3, ge=0)

    # SSE
    sse_ping_s: float = 15.0
    sse_send_timeout_s: float = 30.0
    sse_block_ms: int = 5000
    sse_retry_ms: int = 2000
    sse_max_streams: int = 2000

    # Security and readiness
    api_keys: Annotated[list[SecretStr], NoDecode] = []  # empty: no authentication
    ready_requires_worker: bool = True  # false for scale-to-zero worker pools

    # OpenAI-compatible Images API (docs/openai.md)
    openai_wait_s: float = 600.0  # a non-streaming request waits this long, then cancels its jobs (504)

    # Webhooks (docs/webhooks.md)
    # "whsec_<base64>"; several, space-separated and new first, while rotating (service/shared/webhooks.py);
    # unset: a webhook_url is refused
    webhook_secret: SecretStr | None = None
    webhook_allow_networks: Annotated[list[str], NoDecode] = []  # CIDRs exempt from the SSRF check
    webhook_timeout_s: float = 10.0  # one delivery attempt
    webhook_retry_for_s: float = 86400.0  # retried this long after the event, then given up
    webhook_backoff_base_s: float = 5.0  # retry k waits base * 2^(k-1), at least the timeout
    webhook_backoff_max_s: float = 3600.0
    webhook_poll_ms: int = 1000  # the dispatcher looks for due retries at least this often
    webhook_concurrency: int = 16  # deliveries in flight per dispatcher
    webhook_resolve_timeout_s: float = 2.0

    # Blob store errors (service/blobs/health.py): a transient one is retried this many times inside
    # the call, waiting base, 2 x base, ...; a permanent one never. A job being prepared when the
    # store is away is deferred (requeued without a failure mark) at most storage_max_deferrals times.
    blob_retries: int = Field(2, ge=0, le=10)
    blob_retry_base_s: float = Field(0.25, ge=0, le=10)
    storage_max_deferrals: int = Field(10, ge=0)

    # Webhooks per API key (docs/webhooks.md): each key's own signing secrets, as JSON
    # {"<api key>": "whsec_new whsec_old", ...} (rotation as for webhook_secret: new first). With
    # API keys, a key without an entry cannot subscribe; webhook_secret then signs nothing.
    webhook_secrets: Annotated[dict[str, SecretStr], NoDecode] = {}
    webhook_outbox_max: int = Field(100_000, ge=1)  # messages waiting for delivery; beyond: dropped, counted

    # What a request gets for the fields it leaves out, and what GET /v1/info says (service/api/
    # defaults.py): "model" (1024 x 1024, 3 iterations, 50 steps) or "cpu" (sized for CPU workers)
    request_defaults: Literal["model", "cpu"] = "model"

    # Logs
    log_level: str = "INFO"
    log_prompts: bool = False  # prompt text in INFO logs

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value):
        # a malformed address fails every process at start, with the variable's name
        from strokes.service.queue.client import parse_redis_url

        parse_redis_url(value)
        return value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value):
        # STROKES_REDIS_SENTINELS="10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379"
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_sentinels(self):
        _ = self.redis_address  # sentinels with a redis_url they cannot take credentials from: fail now
        return self

    @property
    def redis_address(self) -> str:
        """The Redis URL every process connects to: redis_url, or (with redis_sentinels) the
        redis+sentinel:// URL made of the Sentinels, the master name and redis_url's credentials
        and database."""
        if not self.redis_sentinels:
            return self.redis_url
        from urllib.parse import quote, urlsplit

        from strokes.service.queue.client import RedisMode, parse_redis_url

        parts = urlsplit(self.redis_url)
        if parse_redis_url(self.redis_url).mode != RedisMode.direct or parts.scheme == "unix":
            raise ValueError("STROKES_REDIS_SENTINELS: STROKES_REDIS_URL must then be redis:// or rediss://")
        userinfo = parts.netloc.rpartition("@")[0]
        db = parts.path.strip("/") or "0"
        scheme = "rediss+sentinel" if parts.scheme == "rediss" else "redis+sentinel"
        url = f"{scheme}://{userinfo + '@' if userinfo else ''}{','.join(self.redis_sentinels)}"
        url += f"/{quote(self.redis_master_name, safe='')}/{db}"
        if self.redis_sentinel_password is not None:
            url += "?sentinel_password=" + quote(self.redis_sentinel_password.get_secret_value(), safe="")
        parse_redis_url(url, "STROKES_REDIS_SENTINELS")
        return url

    @field_validator("webhook_allow_networks", mode="before")
    @classmethod
    def _split_networks(cls, value):
        # STROKES_WEBHOOK_ALLOW_NETWORKS="127.0.0.0/8,10.0.0.0/8"
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for spec in value:
            ipaddress.ip_network(spec, strict=False)  # a malformed CIDR fails at start, not per request
        return value

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _empty_webhook_secret_is_none(cls, value):
        # STROKES_WEBHOOK_SECRET="" (compose's ${VAR:-}, an empty Secret key): no secret
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value):
        # a malformed secret fails every process at start (the API would accept webhook jobs that
        # no dispatcher can sign)
        if value is not None:
            from strokes.service.shared.webhooks import secret_keys

            secret_keys(value.get_secret_value())
        return value

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _parse_webhook_secrets(cls, value):
        # STROKES_WEBHOOK_SECRETS='{"key1": "whsec_...", "key2": "whsec_new whsec_old"}'; every
        # secret well-formed at start, named by its position only (neither keys nor secrets echoed)
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError:
                raise ValueError("STROKES_WEBHOOK_SECRETS must be a JSON object {api key: secrets}") from None
        if not isinstance(value, dict):
            raise ValueError("STROKES_WEBHOOK_SECRETS must be a JSON object {api key: secrets}")
        from strokes.service.shared.webhooks import secret_keys

        for n, secrets in enumerate(value.values(), 1):
            text = secrets.get_secret_value() if isinstance(secrets, SecretStr) else str(secrets)
            try:
                secret_keys(text)
            except ValueError as exc:
                raise ValueError(f"STROKES_WEBHOOK_SECRETS entry {n}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _webhook_secrets_name_api_keys(self):
        keys = {k.get_secret_value() for k in self.api_keys}
        for n, key in enumerate(self.webhook_secrets, 1):
            if key not in keys:
                raise ValueError(
                    f"STROKES_WEBHOOK_SECRETS entry {n} names a key that is not in STROKES_API_KEYS"
                )
        return self

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
