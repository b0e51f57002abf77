"""The S3-compatible backend of the blob store (service/blobs/store.py has the contract).

AWS S3, MinIO, Cloudflare R2, GCS interoperability: bucket, prefix, endpoint, region and
credentials from settings (`STROKES_S3_*`); without static keys botocore's default chain is
used (environment, IRSA / instance role, files). Requests go through aiobotocore; presigned URLs
are signed locally with botocore (no request is made).

Errors (health.py): a server error (5xx), throttling, a timeout or no connection is
BlobUnavailable, retried by the store (store.py `_call`; botocore's own retries are off, so the
policy is one); any other 4xx (NoSuchBucket, AccessDenied, a bad key id or secret) and missing
credentials are BlobRefused, with the cause in words.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from strokes.service.blobs.health import BlobError, BlobRefused, BlobUnavailable
from strokes.service.blobs.store import BlobStoreBase, check_key, content_type, max_age
from strokes.service.shared.settings import Settings

# Error codes that say "not now" rather than "no": retried.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
# The refusals an operator meets, in words ({bucket} filled in); others keep the store's message.
REFUSED_WORDS = {
    "NoSuchBucket": "the bucket {bucket} does not exist",
    "AccessDenied": "access to the bucket {bucket} is denied (check the credentials and the bucket policy)",
    "AllAccessDisabled": "all access to the bucket {bucket} is disabled",
    "InvalidAccessKeyId": "the access key id is not known to the store",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "InvalidBucketName": "the bucket name {bucket} is not valid",
    "AccountProblem": "the storage account has a problem that prevents the operation",
    "QuotaExceeded": "the storage quota is exceeded",
}


class S3Blobs(BlobStoreBase):
    """Objects `s3_prefix` + key in `s3_bucket`, through aiobotocore (AWS S3, MinIO, R2, GCS
    interoperability). Presigned URLs are signed locally (botocore), with `s3_public_endpoint_url`
    when clients reach the store under another name than the service does."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        if not settings.s3_bucket:
            raise ValueError("STROKES_S3_BUCKET is required with STROKES_BLOB_BACKEND=s3")
        self.bucket, self.prefix = settings.s3_bucket, settings.s3_prefix
        self._client: Any = None
        self._presigner: Any = None
        self._lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()

    def _client_args(self, endpoint: str | None) -> dict[str, Any]:
        from botocore.config import Config

        s = self.settings
        args: dict[str, Any] = {
            "region_name": s.s3_region or "us-east-1",
            "endpoint_url": endpoint or None,  # "" (an empty Secret key) means AWS too
            "config": Config(
                signature_version="s3v4",
                s3={"addressing_style": s.s3_addressing_style},
                connect_timeout=min(5.0, s.blob_timeout_s),
                read_timeout=s.blob_timeout_s,
                retries={"max_attempts": 1, "mode": "standard"},  # the store retries (store.py)
            ),
        }
        key_id, secret = (
            v.get_secret_value() if v else "" for v in (s.s3_access_key_id, s.s3_secret_access_key)
        )
        if key_id and secret:  # else botocore's default chain: env, IRSA / instance role, files
            args["aws_access_key_id"], args["aws_secret_access_key"] = key_id, secret
        return args

    async def _c(self) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    from aiobotocore.session import get_session

                    creating = get_session().create_client(
                        "s3", **self._client_args(self.settings.s3_endpoint_url)
                    )
                    self._client = await self._stack.enter_async_context(creating)
        return self._client

    async def _request(self, op: str, **params: Any) -> Any:
        """One S3 request; a missing object is KeyError, any other failure a BlobError."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        client = await self._c()
        try:
            return await getattr(client, op)(Bucket=self.bucket, **params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if op != "head_bucket" and code in ("NoSuchKey", "404", "NotFound"):
                raise KeyError(params.get("Key")) from exc
            if op == "head_bucket" and code in ("404", "NotFound"):
                code = "NoSuchBucket"
            raise self._client_error(op, code, status, str(error.get("Message", ""))) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise BlobRefused(f"s3 {op}: no usable credentials ({exc})") from exc
        except BotoCoreError as exc:
            raise BlobUnavailable(f"s3 {op}: {exc}") from exc

    def _client_error(self, op: str, code: str, status: int, message: str) -> BlobError:
        if status >= 500 or status in (408, 429) or code in TRANSIENT_CODES:
            return BlobUnavailable(f"s3 {op}: {code or status} {message}".rstrip())
        words = REFUSED_WORDS.get(code, message or "refused").format(bucket=self.bucket)
        return BlobRefused(f"s3 {op}: {words} ({code or status})")

    async def put(self, key: str, data: bytes) -> None:
        check_key(key)
        name = self.prefix + key
        await self._call(
            "put", lambda: self._request("put_object", Key=name, Body=data, ContentType=content_type(key))
        )

    async def get(self, key: str) -> bytes | None:
        import aiohttp

        check_key(key)

        async def fetch() -> bytes | None:
            try:
                reply = await self._request("get_object", Key=self.prefix + key)
            except KeyError:
                return None
            try:
                async with reply["Body"] as body:
                    return await body.read()
            except (aiohttp.ClientError, OSError) as exc:
                raise BlobUnavailable(f"s3 get_object: reading the body failed: {exc}") from exc

        return await self._call("get", fetch)

    async def delete(self, key: str) -> None:
        check_key(key)
        await self._call("delete", lambda: self._request("delete_object", Key=self.prefix + key))

    async def check(self) -> None:
        await self._call("check", lambda: self._request("head_bucket"))

    async def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        client = await self._c()
        expired: list[str] = []
        async for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        ):
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                try:
                    limit = max_age(self.settings, key)
                except ValueError:
                    continue  # not ours: leave it
                if now - obj["LastModified"].timestamp() > limit:
                    expired.append(obj["Key"])
        for start in range(0, len(expired), 1000):
            batch = [{"Key": k} for k in expired[start : start + 1000]]
            await self._call(
                "sweep", lambda b=batch: self._request("delete_objects", Delete={"Objects": b, "Quiet": True})
            )
        return len(expired)

    def url(self, key: str) -> str | None:
        if not self.settings.s3_presign:
            return None
        check_key(key)
        if self._presigner is None:
            import botocore.session

            s = self.settings
            endpoint = s.s3_public_endpoint_url or s.s3_endpoint_url
            self._presigner = botocore.session.get_session().create_client(
                "s3", **self._client_args(endpoint)
            )
        return self._presigner.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.prefix + key},
            ExpiresIn=self.settings.s3_presign_ttl_s,
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None
