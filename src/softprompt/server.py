"""OpenAI-compatible HTTP server: routes, schemas, request limits and the error mapping; the model
work is a backend's.

    app = create_app(Engine(load_model("default"), PromptBank("bank/")), api_key="secret")
    app = create_app(VLLMBackend(gateway_engine, "http://127.0.0.1:8001"))   # vLLM does the model work

Routes: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(`model` names a task or the base model; `stream: true` sends server-sent events),
`POST /v1/classify`, the web console at `/` with its JSON routes (`console.py`), and the admin routes `PUT /v1/prompts/{task}` (multipart upload of a prompt
folder) and `DELETE /v1/prompts/{task}`, which need `Authorization: Bearer <api key>` when a key
is set. With a keys file (`keys=`) every /v1 route needs a key and each tenant sees only its own
tasks (tenants.py: the keys, the checks, the audit log). Every error is JSON in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, mapped from exception types in `_ERRORS` and the
handlers below, and nowhere else.

What is about the HTTP request lives here, so every backend gets it: the body size, the schemas,
the per-request limits (`RequestLimits`: 413 naming the limit) and cancelling a request whose
client disconnects. The model work (and, for the built-in engine, its fair batch scheduler) is the
backend's (`backends.py`): the built-in engine, or vLLM behind a gateway.

Replicas are stateless over a shared bank folder: every request checks its task's bank version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backends import Backend, BuiltinBackend
from .bank import validate_task_name
from .console import add_console_routes
from .data import is_valid_unicode
from .engine import (
    PROMPT_FILES,
    SEED_RANGE,
    ClassifyRequest,
    ContextLengthError,
    Engine,
    GenerationRequest,
    GenerationResult,
    NoVerbalizerError,
)
from .errors import (
    AuthenticationError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    IncompatiblePromptError,
    InvalidTaskNameError,
    OverloadedError,
    PermissionDeniedError,
    PromptFileError,
    RequestLimitError,
    SoftPromptError,
    UnknownTaskError,
    UploadError,
)
from .options import flag, opt
from .scheduler import SchedulerConfig
from .tenants import Access, build_access, reload_on_sighup

log = logging.getLogger(__name__)


class BodyTooLargeError(StarletteHTTPException):
    """A request body over the server's limit (an HTTPException so FastAPI's body reader re-raises it)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the server's limit of {limit} bytes")


# ---------------------------------------------------------------- limits


@dataclass
class RequestLimits:
    """The work one request may ask for; a request over a limit is refused with 413 naming it."""

    max_inputs_per_request: int = opt(256, "Texts in one /v1/classify request at most.")
    max_prompts_per_request: int = opt(64, "Prompts in one /v1/completions request at most.")
    max_tokens_per_request: int = opt(
        65_536, "Tokens one request may make the model process at most: input plus new tokens "
        "to generate; input plus target tokens of every label to classify.")
    max_body_bytes: int = opt(0, "Largest request body in bytes, prompt uploads included (0 = room for a "
                              "64-token deep prompt of the served model, and at least 1 MB).")
    request_timeout_s: float = opt(300.0, "Seconds before a request fails with 504 (code backend_timeout) and "
                                          "its work is cancelled: builtin, from its arrival (queue wait "
                                          "included) to its result; vllm, waiting for vLLM's next answer.")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "request_timeout_s":
                if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                    raise ConfigError(f"{flag(f.name)} must be a number > 0, not {value!r}")
                continue
            least = 0 if f.name == "max_body_bytes" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{flag(f.name)} must be an integer >= {least}, not {value!r}")

    def body_bytes(self, engine: Engine) -> int:
        """The body limit: the flag, else a 64-token prompt of the largest kind the engine serves
        (a deep prompt's rows hold every layer's keys and values), fp32, plus 1 MB for the JSON
        files and multipart framing."""
        row = engine.prefix_shape.row_width if "deep" in engine.kinds else engine.token_dim
        return self.max_body_bytes or 64 * row * 4 + 1_000_000

    def check_count(self, limit_name: str, count: int, what: str, param: str) -> None:
        limit = getattr(self, limit_name)
        if count > limit:
            raise RequestLimitError(f"{count} {what} in one request; this server takes at most {limit} "
                                    f"({flag(limit_name)})", param=param)

    def check_tokens(self, prepared: list) -> None:
        tokens = sum(p.tokens for p in prepared)
        if tokens > self.max_tokens_per_request:
            raise RequestLimitError(
                f"this request asks for {tokens} tokens of work (input plus new or target tokens); "
                f"this server takes at most {self.max_tokens_per_request} "
                f"({flag('max_tokens_per_request')})")


# ---------------------------------------------------------------- schemas


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI options are accepted and ignored

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value):
        """JSON's \\u escapes allow lone surrogates, which no tokenizer or UTF-8 encoder accepts."""
        where = _lone_surrogate(value)
        if where is not None:
            raise ValueError(f"{where or 'text'} holds a lone surrogate (a \\ud800-\\udfff escape), "
                             "which is not valid Unicode")
        return value


class _SamplingFields(_Request):
    model: str = Field(description="A task name (its soft prompt is prepended) or the base model's id.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy; higher = more random.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    n: int = Field(1, description="Completions per prompt; only 1 is supported.")
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings; the text is cut before one.")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="Seed for reproducible sampling.")
    stream: bool = Field(False, description="Send the text as server-sent events while it is generated.")
    stream_options: dict[str, Any] | None = Field(None, description='{"include_usage": true} adds a usage chunk.')

    @field_validator("n")
    @classmethod
    def _only_one(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return stops


class CompletionBody(_SamplingFields):
    prompt: str | list[str] | list[int] = Field(description="Text, a list of texts, or one list of token ids.")
    max_tokens: int | None = Field(16, ge=1, description="New tokens at most (default 16).")


class ChatMessage(_Request):
    role: str = Field(description="system, user, assistant, ...")
    content: str | list[dict[str, Any]] | None = Field(None, description="Text, or a list of text parts.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatBody(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="New tokens at most (default: up to the context).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens (newer name).")


class ClassifyBody(_Request):
    model: str = Field(description="A task whose saved prompt has a verbalizer.")
    input: str | dict[str, str] | list[str | dict[str, str]] = Field(
        description="What to classify: a text (a template with one field), an object of the template's "
                    "fields (e.g. {\"question\": ...}), or a list of either.")
    zero_shot: bool = Field(False, description="Score with the task's template and labels but without its "
                                               "prompt: the plain model's answer, as `eval --zero-shot` gives it.")


def _lone_surrogate(value) -> str | None:
    """Where in a raw JSON value (a path like '2.text'; '' = the value itself) a string holds a
    lone surrogate, or None. Iterative: the value may be nested deeper than the stack."""
    stack = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str) and not is_valid_unicode(item):
            return where
        if isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and not is_valid_unicode(key):
                    return where
                stack.append((child, f"{where}.{key}".lstrip(".")))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{i}".lstrip(".")) for i, child in enumerate(item))
    return None


# ---------------------------------------------------------------- errors: the one mapping

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


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def classify_error(exc: Exception) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for any exception."""
    if isinstance(exc, StarletteHTTPException):
        code = "request_too_large" if exc.status_code == 413 else None
        return exc.status_code, error_body(str(exc.detail), _HTTP_TYPES.get(exc.status_code, "invalid_request_error"), code)
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


def _install_error_handlers(app: FastAPI) -> None:
    async def known(request: Request, exc: Exception) -> JSONResponse:
        status, body = classify_error(exc)
        if status >= 500:
            log.exception("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return _ErrorResponse(body, status_code=status)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _ErrorResponse(error_body(message, "invalid_request_error", "invalid_value", param), status_code=422)

    app.add_exception_handler(SoftPromptError, known)
    app.add_exception_handler(StarletteHTTPException, known)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, known)


class _BodyLimit:
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


# ---------------------------------------------------------------- the app


def create_app(backend: Backend | Engine, *, api_key: str | None = None, keys: str | os.PathLike | None = None,
               audit_log: str | os.PathLike | None = None, scheduling: SchedulerConfig | None = None,
               limits: RequestLimits | None = None) -> FastAPI:
    """The FastAPI app serving `backend` (an Engine: the built-in backend, batching as
    `scheduling` says); admin routes behind `api_key`; with a `keys` file, every /v1 route behind
    a tenant's key (or `api_key`), admin actions in `audit_log`."""
    limits = limits or RequestLimits()
    if isinstance(backend, Engine):
        backend = BuiltinBackend(backend, scheduling, request_timeout_s=limits.request_timeout_s)
    engine = backend.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    access = build_access(api_key=api_key, keys=keys, audit_log=audit_log, base_names=engine.base_names,
                          status_of=lambda exc: classify_error(exc)[0])
    app = FastAPI(title="softprompt", lifespan=lifespan, dependencies=[Depends(access.authenticate)])
    app.state.engine, app.state.backend, app.state.limits = engine, backend, limits
    app.state.access = access
    app.state.scheduler = getattr(backend, "scheduler", None)  # the built-in engine's batcher
    app.add_middleware(_BodyLimit, limit=limits.body_bytes(engine))
    _install_error_handlers(app)
    if api_key is None and keys is None:
        log.warning("no API key set: the admin routes (PUT/DELETE /v1/prompts) are open")

    _add_info_routes(app, backend, access)
    _add_generation_routes(app, backend, limits, access)
    _add_admin_routes(app, engine, access)
    add_console_routes(app, backend, visible=access.may_use)
    return app


def _add_info_routes(app: FastAPI, backend: Backend, access: Access) -> None:
    engine = backend.engine

    @app.get("/health")
    async def health():
        """200 while the backend can serve; 503 (same body) while it is down, e.g. vLLM restarting."""
        state = await backend.health()
        up = state["status"] == "up"
        body = {"status": "ok" if up else "unavailable", "model": engine.base_model_id,
                "tasks": len(engine.tasks()), "backend": state}
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/v1/models")
    async def models(http: Request):
        await asyncio.to_thread(engine.refresh)
        data = [{"id": engine.base_model_id, "object": "model", "created": 0, "owned_by": "softprompt"}]
        for info in (i for i in engine.task_infos() if access.may_use(http, i.name)):
            data.append({"id": info.name, "object": "model", "created": int(info.loaded_at),
                         "owned_by": "softprompt", "parent": engine.base_model_id,
                         "num_virtual_tokens": info.num_virtual_tokens, "kind": info.kind,
                         "classify": info.has_verbalizer})
        return {"object": "list", "data": data}


def _add_generation_routes(app: FastAPI, backend: Backend, limits: RequestLimits, access: Access) -> None:
    engine = backend.engine

    async def prepare(requests: list) -> list:
        """Validate a request's pieces against one snapshot of their tasks, within the limits."""
        prepared = await backend.prepare_all(requests)
        limits.check_tokens(prepared)
        return prepared

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        access.check_use(http, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) or _is_token_list(body.prompt) else body.prompt
        if not prompts:
            raise ConfigError("prompt must not be empty")
        limits.check_count("max_prompts_per_request", len(prompts), "prompts", "prompt")
        requests = [_generation_request(body, p, body.max_tokens) for p in prompts]
        if body.stream:
            if len(requests) != 1:
                raise ConfigError("stream supports one prompt per request")
            return await _stream(backend, (await prepare(requests))[0], body, "text_completion")
        results = await _run(backend, http, await prepare(requests))
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        return _response("cmpl", "text_completion", body.model, choices, results)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: Request):
        access.check_use(http, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await asyncio.to_thread(engine.chat_prompt, messages)
        request = _generation_request(body, ids, body.max_completion_tokens or body.max_tokens)
        prepared = await prepare([request])
        if body.stream:
            return await _stream(backend, prepared[0], body, "chat.completion.chunk")
        [result] = await _run(backend, http, prepared)
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "logprobs": None, "finish_reason": result.finish_reason}
        return _response("chatcmpl", "chat.completion", body.model, [choice], [result])

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody, http: Request):
        access.check_use(http, body.model)
        texts = body.input if isinstance(body.input, list) else [body.input]
        limits.check_count("max_inputs_per_request", len(texts), "inputs", "input")
        [results] = await _run(backend, http, await prepare([ClassifyRequest(body.model, texts, body.zero_shot)]))
        data = [{"index": i, "label": r.label, "probabilities": r.probabilities} for i, r in enumerate(results)]
        return {"object": "list", "model": body.model, "data": data}


def _add_admin_routes(app: FastAPI, engine: Engine, access: Access) -> None:
    @app.put("/v1/prompts/{task:path}")
    async def upload(task: str, request: Request):
        async with access.admin_action(request, "upload", task) as outcome:
            validate_task_name(task)  # before reading the body or touching the disk
            files = await _uploaded_files(request)
            info = await asyncio.to_thread(engine.install, task, files)
            outcome["version"] = info.version
        return {"object": "prompt", "id": info.name, "num_virtual_tokens": info.num_virtual_tokens,
                "version": info.version, "classify": info.has_verbalizer}

    @app.delete("/v1/prompts/{task:path}")
    async def delete(task: str, request: Request):
        async with access.admin_action(request, "delete", task):
            validate_task_name(task)  # before touching the disk
            await asyncio.to_thread(engine.remove, task)
        return {"object": "prompt", "id": task, "deleted": True}


# ---------------------------------------------------------------- helpers


def _is_token_list(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(x, int) for x in prompt)


def _generation_request(body: _SamplingFields, prompt, max_tokens: int | None) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, task=body.model, max_new_tokens=max_tokens,
                             temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                             stop=tuple(body.stop or ()))


def _usage(results: list[GenerationResult]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _response(prefix: str, obj: str, model: str, choices: list, results: list[GenerationResult]) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
            "model": model, "system_fingerprint": None, "choices": choices, "usage": _usage(results)}


async def _run(backend: Backend, http: Request, prepared: list) -> list:
    """Run a request's pieces on the backend (as one client request) and await their results.

    If the client disconnects first it no longer wants the answer: its work is cancelled (the
    backend stops it: rows at their next token, scoring before its next batch, vLLM's requests).
    """
    work = asyncio.ensure_future(backend.run(prepared))
    if await _unless_disconnected(http, work):
        return work.result()
    work.cancel()
    work.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: no warning
    raise StarletteHTTPException(499, "client closed the request; it was cancelled")


async def _unless_disconnected(http: Request, work: asyncio.Future) -> bool:
    """Wait for `work`; False if the client disconnected first.

    The body has been read, so the next ASGI message can only be the disconnect.
    """
    gone = asyncio.ensure_future(_disconnect(http))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    return work.done()


async def _disconnect(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _stream(backend: Backend, prepared, body: _SamplingFields, obj: str) -> StreamingResponse:
    """Start a validated request now (errors keep their status), then stream OpenAI chunks ending
    in [DONE]."""
    pieces = await backend.stream(prepared)
    chat = obj == "chat.completion.chunk"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": obj,
            "created": int(time.time()), "model": body.model, "system_fingerprint": None}

    def chunk(text: str | None, finish: str | None = None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    async def events():
        try:
            if chat:
                yield chunk(None, first=True)
            async for piece in pieces:
                if isinstance(piece, str):
                    yield chunk(piece)
                else:
                    yield chunk(None, piece.finish_reason)
                    if (body.stream_options or {}).get("include_usage"):
                        yield _sse({**head, "choices": [], "usage": _usage([piece])})
        except Exception as exc:  # the request failed after the stream began
            yield _sse(classify_error(exc)[1])
        finally:
            await pieces.aclose()  # ends the backend's work for it, also when the client went away
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _uploaded_files(request: Request) -> dict[str, bytes]:
    """The prompt files of a multipart/form-data upload, by field name or file name (whichever is
    a prompt file). The body limit holds while the form is read (`_BodyLimit` wraps its stream)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UploadError("upload the prompt as multipart/form-data with the files "
                          f"{', '.join(PROMPT_FILES)}")
    try:
        async with request.form() as form:
            return await _prompt_parts(form.multi_items())
    except StarletteHTTPException as exc:
        if exc.status_code != 400:  # 413 stays 413
            raise
        raise UploadError(f"malformed multipart/form-data body: {exc.detail}") from None


async def _prompt_parts(items: list[tuple[str, UploadFile | str]]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for field_name, value in items:  # request.form() gives Starlette UploadFiles (FastAPI's subclass them)
        names = [field_name]
        if isinstance(value, UploadFile):
            names.append(os.path.basename(value.filename or ""))
        key = next((n for n in names if n in PROMPT_FILES), None)
        if key is None:
            continue
        if key in files:  # which one was meant? Taking the last would hide a bad first one
            raise UploadError(f"duplicate part '{key}' in the upload: send each file once")
        if not isinstance(value, UploadFile):  # a form field's bytes were decoded as text
            raise UploadError(f"send {key} as a file part (with a filename), e.g. curl -F {key}=@{key}")
        files[key] = await value.read()
    return files


# ---------------------------------------------------------------- running it


def serve(model_name: str = "default", bank_dir: str = "bank", host: str = "127.0.0.1",
          port: int = 8000, *, backend: Literal["builtin", "vllm"] = "builtin", vllm=None,
          scheduling: SchedulerConfig | None = None, api_key: str | None = None,
          keys: str | None = None, audit_log: str | None = None, limits: RequestLimits | None = None,
          log_level: Literal["critical", "error", "warning", "info", "debug"] = "info") -> None:
    """Serve the bank with uvicorn until stopped, on the built-in engine or through vLLM.

    `vllm` (a `VLLMConfig`) says where vLLM is, or how to start one (stopped again on exit).
    The admin key is `api_key`, else the environment variable SOFTPROMPT_API_KEY (else none).
    `keys` is a tenants' keys file (tenants.py), re-read on SIGHUP and when it changes.
    """
    import uvicorn

    from .bank import PromptBank

    limits = limits or RequestLimits()
    served = _open_backend(backend, model_name, PromptBank(bank_dir), vllm, limits.request_timeout_s)
    try:
        app = create_app(served, api_key=api_key or os.environ.get("SOFTPROMPT_API_KEY") or None, keys=keys,
                         audit_log=audit_log, scheduling=scheduling,
                         limits=limits)
        if app.state.access.keys is not None:
            reload_on_sighup(app.state.access.keys)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        process = getattr(served, "process", None)
        if process is not None:  # also when uvicorn never started the app (e.g. port taken)
            process.stop()


def _open_backend(backend: str, model_name: str, bank, vllm, timeout_s: float) -> Backend | Engine:
    if backend == "builtin":
        from .models import load_model

        return Engine(load_model(model_name), bank)
    if backend == "vllm":
        from .vllm_backend import VLLMConfig, open_vllm_backend

        return open_vllm_backend(model_name, bank, vllm or VLLMConfig(), timeout_s=timeout_s)
    raise ConfigError(f"backend must be builtin or vllm, not {backend!r}")


__all__ = ["RequestLimits", "create_app", "serve", "classify_error", "AuthenticationError", "UploadError"]
