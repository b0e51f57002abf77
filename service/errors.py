"""Service exceptions and the ONE place that maps errors to HTTP responses.

Every error body is `{"error": {"type": ..., "message": ...}}` (plus `param` for a bad field).
Handlers raise the exceptions below; `install(app)` registers how each becomes a response,
including FastAPI's validation errors, Starlette's 404/405, and Redis being unreachable.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.params import InvalidParams

log = logging.getLogger("strokes.api")


class ServiceError(Exception):
    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    status, type = 422, "invalid_request"


class InvalidImage(ServiceError):
    status, type = 422, "invalid_image"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str = "a valid bearer API key is required"):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotReady(ServiceError):
    status, type = 409, "not_ready"


class NotAcceptable(ServiceError):
    status, type = 406, "not_acceptable"


class IdempotencyKeyReused(ServiceError):
    # draft-ietf-httpapi-idempotency-key-header: a reused key with another payload is a 422
    status, type = 422, "idempotency_key_reused"


class QueueFull(ServiceError):
    status, type = 429, "queue_full"

    def __init__(self, retry_after: int):
        super().__init__(
            f"the queue is full; retry in {retry_after} s", headers={"Retry-After": str(retry_after)}
        )
        self.retry_after = retry_after


class OverBudget(ServiceError):
    status, type = 422, "budget_exceeded"


class QuotaExceeded(ServiceError):
    status, type = 429, "quota_exceeded"

    def __init__(self, limit: int, retry_after: int):
        super().__init__(
            f"this API key has {limit} queued or running jobs, its limit (STROKES_KEY_MAX_JOBS); "
            f"retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


class Unavailable(ServiceError):
    status, type = 503, "service_unavailable"

    def __init__(self, message: str = "the job store is unreachable; retry shortly"):
        super().__init__(message, headers={"Retry-After": "1"})


# Error replies of a Redis that is up but cannot serve now (also inside a script's error message).
UNAVAILABLE_REPLIES = ("OOM", "READONLY", "LOADING", "MASTERDOWN", "BUSY", "NOREPLICAS", "TRYAGAIN")


def redis_unavailable(exc: Exception) -> bool:
    if isinstance(exc, (OutOfMemoryError, ReadOnlyError)):  # redis-py strips the code from these
        return True
    text = str(exc)
    return any(text.startswith(code) or f": {code} " in text for code in UNAVAILABLE_REPLIES)


def error_body(type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if param:
        error["param"] = param
    return {"error": error}


def error_response(
    status: int, type_: str, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(type_, message, param), status_code=status, headers=headers)


_HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
}


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return (f"{param}: {message}" if param else message), param


def install(app: FastAPI) -> None:
    """Register every exception -> response mapping on the app."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_response(exc.status, exc.type, exc.message, param=exc.param, headers=exc.headers)

    @app.exception_handler(InvalidParams)
    async def _invalid_params(request: Request, exc: InvalidParams):
        return error_response(422, "invalid_request", str(exc), param=exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _describe_validation(exc)
        return error_response(422, "invalid_request", message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = _HTTP_TYPES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else type_.replace("_", " ")
        if exc.status_code == 404:
            message = "no such resource"
        return error_response(exc.status_code, type_, message, headers=getattr(exc, "headers", None))

    async def _redis_down(request: Request, exc: Exception):
        log.warning("redis unreachable: %s", exc)
        return error_response(
            503, Unavailable.type, "the job store is unreachable; retry shortly", headers={"Retry-After": "1"}
        )

    app.add_exception_handler(RedisConnectionError, _redis_down)  # includes LOADING (BusyLoadingError)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(TimeoutError, _redis_down)  # the per-request Redis deadline

    @app.exception_handler(RedisResponseError)
    async def _redis_refused(request: Request, exc: RedisResponseError):
        # Out of memory, a read-only replica, a dataset still loading, a busy script: Redis is
        # there but cannot take the request now. Anything else is our bug (500).
        if redis_unavailable(exc):
            log.warning("redis refused the request: %s", exc)
            return error_response(
                503,
                Unavailable.type,
                "the job store cannot take requests right now; retry shortly",
                headers={"Retry-After": "5"},
            )
        log.exception("redis error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error")
