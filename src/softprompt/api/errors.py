"""HTTP errors, the one mapping: every exception becomes OpenAI's JSON error shape
`{"error": {"message", "type", "param", "code"}}` with its status code here (`_ERRORS`, first match
wins), and nowhere else; plus the request-body size limit, refused with 413 as it streams in.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from softprompt.errors import (
    AuthenticationError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    ContextLengthError,
    IncompatiblePromptError,
    InvalidTaskNameError,
    NoVerbalizerError,
    OverloadedError,
    PermissionDeniedError,
    PromptFileError,
    RequestLimitError,
    SoftPromptError,
    UnknownTaskError,
    UploadError,
)

log = logging.getLogger(__name__)


class BodyTooLargeError(StarletteHTTPException):
    """A request body over the server's limit (an HTTPException so FastAPI's body reader re-raises it)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the server's limit of {limit} bytes")


# ---------------------------------------------------------------- errors: the one mapping

CLIENT_CLOSED = 499
"""The client went away before its answer (nginx's code): its outcome, not a server error."""

_ERRORS: list[tuple[type[Exception], int, str, str | None]] = [  # first match wins
    (AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    (PermissionDeniedError, 403, "permission_error", "permission_denied"),
    (InvalidTaskNameError, 400, "invalid_request_error", "invalid_task_name"),
    (UnknownTaskError, 404, "invalid_request_error", "model_not_found"),
    (ContextLengthError, 400, "invalid_request_error", "context_length_exceeded"),
    (NoVerbalizerError, 400, "invalid_request_error", "no_verbalizer"),
    (RequestLimitError, 413, "invalid_request_error", "request_too_large"),
    (IncompatiblePromptError, 422, "invalid_request_error", "invalid_prompt"),
    (PromptFileError, 422, "invalid_request_error", "invalid_prompt"),
    (UploadError, 422, "invalid_request_error", "invalid_upload"),
    (ConfigError, 422, "invalid_request_error", "invalid_value"),
    (BackendTimeoutError, 504, "server_error", "backend_timeout"),
    (OverloadedError, 503, "server_error", "overloaded"),
    (BackendUnavailableError, 503, "server_error", "backend_unavailable"),
    (SoftPromptError, 400, "invalid_request_error", None),
]
_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}
_HTTP_CODES = {413: "request_too_large", CLIENT_CLOSED: "client_closed"}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def classify_error(exc: Exception) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for any exception."""
    if isinstance(exc, ClientDisconnect):  # e.g. mid-upload: nobody is left to answer
        return CLIENT_CLOSED, error_body(
            "client closed the request", "invalid_request_error", "client_closed"
        )
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code)
        return exc.status_code, error_body(
            str(exc.detail), _HTTP_TYPES.get(exc.status_code, "invalid_request_error"), code
        )
    for kind, status, type_, code in _ERRORS:
        if isinstance(exc, kind):
            return status, error_body(str(exc), type_, code, exc.param)
    return 500, error_body("internal server error", "server_error", "internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        first = first or loc or None
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts), first


class _ErrorResponse(JSONResponse):
    """JSON in ASCII: an error message may quote the client's text, lone surrogates included."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def install_error_handlers(app: FastAPI) -> None:
    async def known(request: Request, exc: Exception) -> JSONResponse:
        status, body = classify_error(exc)
        if status >= 500:
            log.exception("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return _ErrorResponse(body, status_code=status)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _ErrorResponse(
            error_body(message, "invalid_request_error", "invalid_value", param), status_code=422
        )

    app.add_exception_handler(SoftPromptError, known)
    app.add_exception_handler(StarletteHTTPException, known)
    # Its own handler: the catch-all one below (Starlette's ServerErrorMiddleware) re-raises to
    # the HTTP server, which logs a traceback.
    app.add_exception_handler(ClientDisconnect, known)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, known)


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes, by Content-Length and by bytes received."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        received = 0

        async def limited_receive():
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                raise BodyTooLargeError(self.limit)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLargeError(self.limit)
            return message

        await self.app(scope, limited_receive, send)


__all__ = [
    "BodyLimit",
    "BodyTooLargeError",
    "CLIENT_CLOSED",
    "classify_error",
    "error_body",
    "install_error_handlers",
]
