"""OpenAI-compatible HTTP server: the app and its routes; the model work is a backend's.

    app = create_app(Engine(load_model("default"), PromptBank("bank/")), api_key="secret")
    app = create_app(open_vllm_backend("default", "bank/", VLLMConfig()))  # vLLM runs the model

Routes: `GET /health`, `GET /v1/models` (paginated: `limit`, `after`), `POST /v1/completions`, `POST /v1/chat/completions`
(`model` names a task or the base model; `stream: true` sends server-sent events),
`POST /v1/classify`, the web console at `/` with its JSON routes (`console.py`), and the admin routes `PUT /v1/prompts/{task}` (multipart upload of a prompt
folder) and `DELETE /v1/prompts/{task}`, which need `Authorization: Bearer <api key>` when a key
is set. With a keys file (`keys=`) every /v1 route needs a key and each tenant sees only its own
tasks (tenants.py: the keys, the checks, the audit log). Every error is JSON in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, mapped from exception types in one place,
errors.py (which also holds the body-size limit).

What is about the HTTP request is the server's, so every backend gets it: the body size, the
schemas and the per-request limits (schemas.py; `RequestLimits`: 413 naming the limit), and
cancelling a request whose client disconnects (here). The model work (and, for the built-in
engine, its fair batch scheduler) is the backend's (`serving/backends.py`): the built-in engine, or vLLM
behind a gateway.

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
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.api.console import add_console_routes
from softprompt.api.errors import CLIENT_CLOSED, BodyLimit, classify_error, install_error_handlers
from softprompt.api.logprobs import (
    CompletionLogprobStream,
    chat_logprobs,
    completion_logprobs,
    merge_completion_logprobs,
)
from softprompt.api.schemas import (
    ChatBody,
    ClassifyBody,
    CompletionBody,
    ListPage,
    RequestLimits,
    SamplingFields,
    list_page,
)
from softprompt.api.tenants import Access, ProxyConfig, build_access, reload_on_sighup
from softprompt.bank import validate_task_name
from softprompt.errors import AuthenticationError, ConfigError, UploadError
from softprompt.serving.backends import Backend, BuiltinBackend
from softprompt.serving.engine import (
    PROMPT_FILES,
    ClassifyRequest,
    Engine,
    GenerationRequest,
    GenerationResult,
)
from softprompt.serving.processor import InputProcessor
from softprompt.serving.registry import TierConfig
from softprompt.serving.requests import PromptLogprobs, PromptLogprobsRequest
from softprompt.serving.scheduler import SchedulerConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the app


def create_app(
    backend: Backend | Engine,
    *,
    api_key: str | None = None,
    keys: str | os.PathLike | None = None,
    audit_log: str | os.PathLike | None = None,
    scheduling: SchedulerConfig | None = None,
    limits: RequestLimits | None = None,
    proxies: ProxyConfig | None = None,
) -> FastAPI:
    """The FastAPI app serving `backend` (an Engine: the built-in backend, batching as
    `scheduling` says); admin routes behind `api_key`; with a `keys` file, every /v1 route behind
    a tenant's key (or `api_key`), admin actions in `audit_log`, with the client a proxy in
    `proxies` names. Run it with proxy headers off (`uvicorn_options`): the app takes the ASGI
    client for the socket peer."""
    limits = limits or RequestLimits()
    if isinstance(backend, Engine):
        backend = BuiltinBackend(backend, scheduling, request_timeout_s=limits.request_timeout_s)
    processor = backend.processor

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    access = build_access(
        api_key=api_key,
        keys=keys,
        audit_log=audit_log,
        base_names=processor.base_names,
        status_of=lambda exc: classify_error(exc)[0],
        proxies=proxies,
    )
    app = FastAPI(
        title="softprompt", lifespan=lifespan, dependencies=[Depends(access.authenticate)]
    )
    app.state.processor, app.state.backend, app.state.limits = processor, backend, limits
    app.state.access = access
    app.state.scheduler = getattr(backend, "scheduler", None)  # the built-in engine's batcher
    app.add_middleware(BodyLimit, limit=limits.body_bytes(processor))
    install_error_handlers(app)
    if api_key is None and keys is None:
        log.warning("no API key set: the admin routes (PUT/DELETE /v1/prompts) are open")

    _add_info_routes(app, backend, access)
    _add_generation_routes(app, backend, limits, access)
    _add_admin_routes(app, processor, access)
    add_console_routes(app, backend, visible=access.may_use)
    return app


def _add_info_routes(app: FastAPI, backend: Backend, access: Access) -> None:
    processor = backend.processor

    @app.get("/health")
    async def health(http: Request):
        """200 while the backend can serve; 503 (same body) while it is down, e.g. vLLM restarting.
        With a keys file, only a valid key sees more than the status, and a tenant counts only the
        tasks it may use. `tasks` counts the bank's entries (a folder scan; none is read)."""
        state = await backend.health()
        up = state["status"] == "up"
        body: dict = {"status": "ok" if up else "unavailable"}
        viewer = access.health_viewer(http)
        if viewer is not None:
            names = await asyncio.to_thread(processor.task_names)
            body |= {
                "model": processor.base_model_id,
                "tasks": sum(1 for task in names if viewer.may_use(task)),
                "task_memory": processor.registry.stats(),  # counts only: no task names
                "backend": state,
            }
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/v1/models")
    async def models(http: Request, page: Annotated[ListPage, Depends(list_page)]):
        """The base model first, then the tasks by name, a page at a time (no prompt is read)."""
        data = []
        if page.after is None:
            data.append(
                {
                    "id": processor.base_model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "softprompt",
                }
            )
            page = dataclasses.replace(page, limit=page.limit - 1)
        elif page.after in processor.base_names:  # the first page ended on the base model
            page = dataclasses.replace(page, after=None)
        listed = await asyncio.to_thread(
            page.read, processor, lambda name: access.may_use(http, name)
        )
        for info in listed.infos:
            data.append(
                {
                    "id": info.name,
                    "object": "model",
                    "created": int(info.loaded_at),
                    "owned_by": "softprompt",
                    "parent": processor.base_model_id,
                    "num_virtual_tokens": info.num_virtual_tokens,
                    "kind": info.kind,
                    "classify": info.has_verbalizer,
                }
            )
        return ListPage.body(data, listed.has_more)


def _add_generation_routes(
    app: FastAPI, backend: Backend, limits: RequestLimits, access: Access
) -> None:
    processor = backend.processor

    async def prepare(requests: list) -> list:
        """Validate a request's pieces against one snapshot of their tasks, within the limits."""
        prepared = await backend.prepare_all(requests)
        limits.check_tokens(prepared)
        return prepared

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        access.check_use(http, body.model)
        prompts = (
            [body.prompt]
            if isinstance(body.prompt, str) or _is_token_list(body.prompt)
            else body.prompt
        )
        if not prompts:
            raise ConfigError("prompt must not be empty")
        limits.check_count("max_prompts_per_request", len(prompts), "prompts", "prompt")
        if body.max_tokens == 0 and not body.echo:
            raise _invalid(
                "max_tokens 0 needs echo: true (it scores the prompt alone)", "max_tokens"
            )
        echoes = [_echo_request(body, p) for p in prompts] if body.echo else []
        generations = (
            [_generation_request(body, p, body.max_tokens, body.logprobs) for p in prompts]
            if body.max_tokens != 0
            else []
        )
        if body.stream:
            if len(prompts) != 1:
                raise ConfigError("stream supports one prompt per request")
            prepared = await prepare(echoes + generations)
            return await _stream_completion(backend, http, prepared, body, prompts[0])
        results = await _run(backend, http, await prepare(echoes + generations))
        echoed, generated = results[: len(echoes)], results[len(echoes) :]
        usage = [
            generated[i] if generated else _nothing_generated(echoed[i])
            for i in range(len(prompts))
        ]
        choices = await asyncio.to_thread(  # token texts and offsets: tokenizer work, off the loop
            lambda: [
                _completion_choice(
                    processor, i, p, echoed[i] if echoed else None, usage[i], body.logprobs
                )
                for i, p in enumerate(prompts)
            ]
        )
        return _response("cmpl", "text_completion", body.model, choices, usage)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: Request):
        access.check_use(http, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if body.top_logprobs is not None and not body.logprobs:
            raise _invalid("top_logprobs needs logprobs: true", "top_logprobs")
        ids = await asyncio.to_thread(processor.chat_prompt, messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        request = _generation_request(body, ids, body.max_completion_tokens or body.max_tokens, top)
        prepared = await prepare([request])
        if body.stream:
            return await _stream(backend, prepared[0], body, "chat.completion.chunk")
        [result] = await _run(backend, http, prepared)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": None if top is None else chat_logprobs(processor, result.logprobs),
            "finish_reason": result.finish_reason,
        }
        return _response("chatcmpl", "chat.completion", body.model, [choice], [result])

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody, http: Request):
        access.check_use(http, body.model)
        texts = body.input if isinstance(body.input, list) else [body.input]
        limits.check_count("max_inputs_per_request", len(texts), "inputs", "input")
        [results] = await _run(
            backend, http, await prepare([ClassifyRequest(body.model, texts, body.zero_shot)])
        )
        data = [
            {"index": i, "label": r.label, "probabilities": r.probabilities}
            for i, r in enumerate(results)
        ]
        return {"object": "list", "model": body.model, "data": data}


def _add_admin_routes(app: FastAPI, processor: InputProcessor, access: Access) -> None:
    @app.put("/v1/prompts/{task:path}")
    async def upload(task: str, request: Request):
        async with access.admin_action(request, "upload", task) as outcome:
            validate_task_name(task)  # before reading the body or touching the disk
            files = await _uploaded_files(request)
            info = await asyncio.to_thread(processor.install, task, files)
            outcome["version"] = info.version
        return {
            "object": "prompt",
            "id": info.name,
            "num_virtual_tokens": info.num_virtual_tokens,
            "version": info.version,
            "classify": info.has_verbalizer,
        }

    @app.delete("/v1/prompts/{task:path}")
    async def delete(task: str, request: Request):
        async with access.admin_action(request, "delete", task):
            validate_task_name(task)  # before touching the disk
            await asyncio.to_thread(processor.remove, task)
        return {"object": "prompt", "id": task, "deleted": True}


# ---------------------------------------------------------------- helpers


def _is_token_list(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(x, int) for x in prompt)


def _generation_request(
    body: SamplingFields, prompt, max_tokens: int | None, logprobs: int | None = None
) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        task=body.model,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def _echo_request(body: CompletionBody, prompt) -> PromptLogprobsRequest:
    return PromptLogprobsRequest(prompt, body.model, body.logprobs)


def _invalid(message: str, param: str) -> ConfigError:
    error = ConfigError(message)
    error.param = param
    return error


def _nothing_generated(echo: PromptLogprobs) -> GenerationResult:
    """The result of `max_tokens: 0`: the prompt scored, nothing generated."""
    return GenerationResult("", [], "length", len(echo.token_ids), 0, [])


def _echo_text(processor: InputProcessor, prompt, echo: PromptLogprobs) -> str:
    """The prompt as the client sent it; token ids as their text."""
    return prompt if isinstance(prompt, str) else "".join(processor.text_pieces(echo.token_ids))


def _completion_choice(
    processor: InputProcessor,
    index: int,
    prompt,
    echo: PromptLogprobs | None,
    result: GenerationResult,
    logprobs: int | None,
) -> dict:
    """One choice of /v1/completions: the echoed prompt (if asked) and the completion, with
    their tokens' log-probabilities (if asked)."""
    head = _echo_text(processor, prompt, echo) if echo else ""
    rendered = None
    if logprobs is not None:
        first = completion_logprobs(processor, echo.logprobs, echo.token_ids) if echo else None
        new = completion_logprobs(processor, result.logprobs, result.token_ids, offset=len(head))
        rendered = merge_completion_logprobs(first, new)
    return {
        "index": index,
        "text": head + result.text,
        "logprobs": rendered,
        "finish_reason": result.finish_reason,
    }


def _usage(results: list[GenerationResult]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _response(
    prefix: str, obj: str, model: str, choices: list, results: list[GenerationResult]
) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": _usage(results),
    }


async def _run(backend: Backend, http: Request, prepared: list) -> list:
    """Run a request's pieces on the backend (as one client request) and await their results.

    If the client disconnects first it no longer wants the answer: its work is cancelled (the
    backend stops it: rows at their next token, scoring before its next batch, vLLM's requests).
    """
    work = asyncio.ensure_future(backend.run(prepared))
    if await _unless_disconnected(http, work):
        return work.result()
    work.cancel()
    work.add_done_callback(
        lambda done: done.cancelled() or done.exception()
    )  # retrieved: no warning
    raise StarletteHTTPException(CLIENT_CLOSED, "client closed the request; it was cancelled")


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


async def _stream_completion(
    backend: Backend, http: Request, prepared: list, body: CompletionBody, prompt
) -> StreamingResponse:
    """Stream a completion; with echo, the prompt (and its tokens' log-probabilities) is scored
    first and sent as the first chunk."""
    processor, head = backend.processor, None
    if body.echo:
        [echo] = await _run(backend, http, prepared[:1])
        prepared = prepared[1:]
        text = _echo_text(processor, prompt, echo)
        rendered = None
        if body.logprobs is not None:
            rendered = completion_logprobs(processor, echo.logprobs, echo.token_ids)
        head = (text, rendered, _nothing_generated(echo))
    return await _stream(backend, prepared[0] if prepared else None, body, "text_completion", head)


async def _stream(
    backend: Backend, prepared, body: SamplingFields, obj: str, head: tuple | None = None
) -> StreamingResponse:
    """Start a validated request now (errors keep their status), then stream OpenAI chunks ending
    in [DONE]. `head` = (text, logprobs, result) of an echoed prompt, sent first; without
    `prepared` (max_tokens 0) it is all there is."""
    pieces = await backend.stream(prepared) if prepared is not None else _only(head[2])
    chat = obj == "chat.completion.chunk"
    wants = prepared is not None and prepared.request.logprobs is not None
    wants = wants or (head is not None and head[1] is not None)
    stream_logprobs = CompletionLogprobStream(backend.processor, len(head[0]) if head else 0)
    head_info = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
    }

    def rendered(entries) -> dict | None:
        if not wants or entries is None:
            return None
        if chat:
            return chat_logprobs(backend.processor, entries)
        return stream_logprobs.render(entries)

    def chunk(text: str | None, finish: str | None = None, first=False, logprobs=None) -> str:
        if chat:
            delta = (
                {"role": "assistant", "content": ""}
                if first
                else ({} if text is None else {"content": text})
            )
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return _sse({**head_info, "choices": [choice]})

    async def events():
        sent = 0  # log-probability entries streamed so far
        try:
            if chat:
                yield chunk(None, first=True)
            if head is not None:
                yield chunk(head[0], logprobs=head[1])
            async for piece in pieces:
                if isinstance(piece, str):
                    entries = getattr(piece, "logprobs", None)
                    sent += len(entries or ())
                    yield chunk(piece, logprobs=rendered(entries))
                else:
                    rest = (piece.logprobs or [])[sent:] if wants else None
                    yield chunk(None, piece.finish_reason, logprobs=rendered(rest))
                    if (body.stream_options or {}).get("include_usage"):
                        yield _sse({**head_info, "choices": [], "usage": _usage([piece])})
        except Exception as exc:  # the request failed after the stream began
            yield _sse(classify_error(exc)[1])
        finally:
            await pieces.aclose()  # ends the backend's work for it, also when the client went away
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _only(result: GenerationResult):
    """A stream of nothing generated: just its result."""
    yield result


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _uploaded_files(request: Request) -> dict[str, bytes]:
    """The prompt files of a multipart/form-data upload, by field name or file name (whichever is
    a prompt file). The body limit holds while the form is read (`BodyLimit` wraps its stream)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UploadError(
            f"upload the prompt as multipart/form-data with the files {', '.join(PROMPT_FILES)}"
        )
    try:
        async with request.form() as form:
            return await _prompt_parts(form.multi_items())
    except StarletteHTTPException as exc:
        if exc.status_code != 400:  # 413 stays 413
            raise
        raise UploadError(f"malformed multipart/form-data body: {exc.detail}") from None


async def _prompt_parts(items: list[tuple[str, UploadFile | str]]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for (
        field_name,
        value,
    ) in items:  # request.form() gives Starlette UploadFiles (FastAPI's subclass them)
        names = [field_name]
        if isinstance(value, UploadFile):
            names.append(os.path.basename(value.filename or ""))
        key = next((n for n in names if n in PROMPT_FILES), None)
        if key is None:
            continue
        if key in files:  # which one was meant? Taking the last would hide a bad first one
            raise UploadError(f"duplicate part '{key}' in the upload: send each file once")
        if not isinstance(value, UploadFile):  # a form field's bytes were decoded as text
            raise UploadError(
                f"send {key} as a file part (with a filename), e.g. curl -F {key}=@{key}"
            )
        files[key] = await value.read()
    return files


# ---------------------------------------------------------------- running it


def serve(
    model_name: str = "default",
    bank_dir: str = "bank",
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    backend: Literal["builtin", "vllm"] = "builtin",
    vllm=None,
    scheduling: SchedulerConfig | None = None,
    tiers: TierConfig | None = None,
    api_key: str | None = None,
    keys: str | None = None,
    audit_log: str | None = None,
    limits: RequestLimits | None = None,
    proxies: ProxyConfig | None = None,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
) -> None:
    """Serve the bank with uvicorn until stopped, on the built-in engine or through vLLM.

    `vllm` (a `VLLMConfig`) says where vLLM is, or how to start one (stopped again on exit).
    The admin key is `api_key`, else the environment variable SOFTPROMPT_API_KEY (else none).
    `keys` is a tenants' keys file (tenants.py), re-read on SIGHUP and when it changes.
    `proxies` says which reverse proxies may name the client (none by default).
    `tiers` bounds the tasks the built-in engine keeps in memory and pins some (registry.py).
    """
    import uvicorn

    from softprompt.bank import PromptBank

    limits = limits or RequestLimits()
    served = _open_backend(
        backend, model_name, PromptBank(bank_dir), vllm, limits.request_timeout_s, tiers
    )
    try:
        app = create_app(
            served,
            api_key=api_key or os.environ.get("SOFTPROMPT_API_KEY") or None,
            keys=keys,
            audit_log=audit_log,
            scheduling=scheduling,
            limits=limits,
            proxies=proxies,
        )
        if app.state.access.keys is not None:
            reload_on_sighup(app.state.access.keys)
        uvicorn.run(app, **uvicorn_options(host, port, log_level))
    finally:
        process = getattr(served, "process", None)
        if process is not None:  # also when uvicorn never started the app (e.g. port taken)
            process.stop()


def uvicorn_options(host: str, port: int, log_level: str) -> dict:
    """uvicorn's settings for the app. Proxy headers off: uvicorn would otherwise trust
    X-Forwarded-For from loopback (or FORWARDED_ALLOW_IPS) and rewrite the client address the
    audit log records; the app's `ProxyConfig` decides what a proxy may say, in its own field."""
    return {"host": host, "port": port, "log_level": log_level, "proxy_headers": False}


def _open_backend(
    backend: str, model_name: str, bank, vllm, timeout_s: float, tiers: TierConfig | None = None
) -> Backend | Engine:
    if backend == "builtin":
        from softprompt.model.loading import load_model

        return Engine(load_model(model_name), bank, tiers=tiers)
    if backend == "vllm":
        if tiers is not None and tiers != TierConfig():
            raise ConfigError(
                "--max-loaded-tasks, --max-resident-tasks and --pin apply to --backend builtin only"
            )
        from softprompt.serving.vllm.backend import VLLMConfig, open_vllm_backend

        return open_vllm_backend(model_name, bank, vllm or VLLMConfig(), timeout_s=timeout_s)
    raise ConfigError(f"backend must be builtin or vllm, not {backend!r}")


__all__ = [
    "ProxyConfig",
    "RequestLimits",
    "create_app",
    "serve",
    "uvicorn_options",
    "classify_error",
    "AuthenticationError",
    "UploadError",
]
