"""Service exceptions and the ONE place that maps errors to HTTP responses.

Every error body is `{"error": {"type": ..., "message": ...}}` (plus `param` for a bad field, and
`errors`, [{param, message}], when a request has several: a form can mark each field at once).
Handlers raise the exceptions below; `install(app)` registers how each becomes a response,
including FastAPI's validation errors, Starlette's 404/405, and Redis being unreachable.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from strokes.model.spec.params import InvalidParams
from strokes.service.blobs.health import BlobError, BlobRefused

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


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


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


class GenerationTimedOut(ServiceError):
    # The OpenAI-compatible routes wait for their jobs; past the bound they cancel them.
    status, type = 504, "generation_timeout"


class GenerationFailed(ServiceError):
    status, type = 500, "generation_failed"


# Error replies of a Redis that is up but cannot serve now (also inside a script's error message).
UNAVAILABLE_REPLIES = ("OOM", "READONLY", "LOADING", "MASTERDOWN", "BUSY", "NOREPLICAS", "TRYAGAIN")


def redis_unavailable(exc: Exception) -> bool:
    if isinstance(exc, (OutOfMemoryError, ReadOnlyError)):  # redis-py strips the code from these
        return True
    text = str(exc)
    return any(text.startswith(code) or f": {code} " in text for code in UNAVAILABLE_REPLIES)


def error_body(
    type_: str, message: str, param: str | None = None, errors: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if param:
        error["param"] = param
    if errors:
        error["errors"] = errors
    return {"error": error}


def error_response(
    status: int,
    type_: str,
    message: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, str]] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(type_, message, param, errors), status_code=status, headers=headers)


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


def _field_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    """Every bad field of a request, {param, message}, in the order pydantic found them (one per
    field: a union's alternatives report the same field more than once)."""
    out: dict[str, str] = {}
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        param = ".".join(loc) or "body"
        out.setdefault(param, error.get("msg", "invalid value"))
    return [{"param": param, "message": f"{param}: {message}"} for param, message in out.items()]


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None, list[dict[str, str]]]:
    """(message, param of the first bad field, every bad field)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None, []
    if errors[0].get("type") == "json_invalid":
        return "the body is not valid JSON", None, []
    fields = _field_errors(exc)
    first = fields[0]
    param = None if first["param"] == "body" else first["param"]
    message = first["message"] if param else first["message"].removeprefix("body: ")
    if len(fields) > 1:
        message += f" (and {len(fields) - 1} more problem{'s' if len(fields) > 2 else ''}: see errors)"
    return message, param, fields if len(fields) > 1 else []


_FORM_MEDIA = ("multipart/form-data", "application/x-www-form-urlencoded")


def _wrong_media_type(request: Request, exc: RequestValidationError) -> str | None:
    """Why the body failed when its Content-Type is not what the route reads, else None: a JSON
    body sent as text/plain fails validation as "not a valid dictionary", which hides the cause."""
    body_field = getattr(request.scope.get("route"), "body_field", None)
    if body_field is None or not any(e.get("loc", ("",))[0] == "body" for e in exc.errors()):
        return None
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if isinstance(body_field.field_info, (params.Form, params.File)):
        if media in _FORM_MEDIA:
            return None
        expected = " or ".join(_FORM_MEDIA)
    else:
        if media in ("", "application/json") or media.endswith("+json"):
            return None
        expected = "application/json"
    return f"the body must be sent as Content-Type: {expected}, not {media}"


# ---- the OpenAI-compatible routes (service/api/routes/openai_images.py) answer in OpenAI's error shape ----

OPENAI_PATH_PREFIX = "/v1/images/"
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def openai_error(status: int, type_: str, message: str, param: str | None = None) -> tuple[int, dict]:
    """(status, body) as OpenAI's API has them: {"error": {message, type, param, code}}; our error
    type becomes `code`, and a 422 is OpenAI's 400."""
    status = 400 if status == 422 else status
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": message, "type": kind, "param": param, "code": type_}}


def _respond(
    request: Request,
    status: int,
    type_: str,
    message: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, str]] | None = None,
) -> JSONResponse:
    if request.url.path.startswith(OPENAI_PATH_PREFIX):
        status, body = openai_error(status, type_, message, param)
        return JSONResponse(body, status_code=status, headers=headers)
    return error_response(status, type_, message, param=param, headers=headers, errors=errors)


def install(app: FastAPI) -> None:
    """Register every exception -> response mapping on the app."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return _respond(request, exc.status, exc.type, exc.message, param=exc.param, headers=exc.headers)

    @app.exception_handler(InvalidParams)
    async def _invalid_params(request: Request, exc: InvalidParams):
        return _respond(request, 422, "invalid_request", str(exc), param=exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        wrong_media = _wrong_media_type(request, exc)
        if wrong_media is not None:
            return _respond(request, 415, UnsupportedMediaType.type, wrong_media)
        message, param, fields = _describe_validation(exc)
        return _respond(request, 422, "invalid_request", message, param=param, errors=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = _HTTP_TYPES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else type_.replace("_", " ")
        if exc.status_code == 404:
            message = "no such resource"
        return _respond(request, exc.status_code, type_, message, headers=getattr(exc, "headers", None))

    async def _redis_down(request: Request, exc: Exception):
        log.warning("redis unreachable: %s", exc)
        return _respond(
            request,
            503,
            Unavailable.type,
            "the job store is unreachable; retry shortly",
            headers={"Retry-After": "1"},
        )

    async def _blobs_down(request: Request, exc: Exception):
        # The cause (a bucket's name, a path) is the operator's: logged, not told to callers.
        if isinstance(exc, BlobRefused):
            log.error("the blob store refuses requests: %s", exc)
            message = "the blob store (images, trajectories) refuses requests; an operator has been told"
            return error_response(503, Unavailable.type, message, headers={"Retry-After": "30"})
        log.warning("blob store unreachable: %s", exc)
        return error_response(
            503,
            Unavailable.type,
            "the blob store (images, trajectories) is unreachable; retry shortly",
            headers={"Retry-After": "1"},
        )

    app.add_exception_handler(BlobError, _blobs_down)
    app.add_exception_handler(RedisConnectionError, _redis_down)
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
        return _respond(request, 500, "internal_error", "internal error")
