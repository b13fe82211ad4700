"""Serving backends: what the HTTP server asks of whatever runs the model.

The server (routes, schemas, the error mapping) is the same for every backend. A backend
validates a request with the engine's `prepare` (the one place that knows tasks, templates and
limits), runs it, and reports its health:

    prepared = await backend.prepare(GenerationRequest(...))   # errors here keep their status
    result = await backend.run(prepared)                       # GenerationResult / classifications
    pieces = await backend.stream(prepared)                    # str pieces, then GenerationResult

- `BuiltinBackend`: the engine's own model behind one micro-batcher (`BatchScheduler`).
- `VLLMBackend` (`vllm_backend.py`): a vLLM server fed prompt embeddings over HTTP.

Each backend names the prompt kinds it serves (`prompt_kinds`, reported by `/health`); a task of
another kind is refused with UnsupportedPromptKindError before any model work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from .engine import BatchScheduler, Engine, GenerationResult
from .errors import UnsupportedPromptKindError

log = logging.getLogger(__name__)

SOFT_PROMPT = "soft_prompt"
"""Vectors prepended to the input embeddings (PEFT PROMPT_TUNING)."""
DEEP_PROMPT = "deep_prompt"
"""Keys and values in every layer (PEFT PREFIX_TUNING)."""


class Backend(Protocol):
    name: str
    prompt_kinds: tuple[str, ...]
    engine: Engine

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def health(self) -> dict: ...
    async def prepare(self, request): ...
    async def run(self, prepared): ...
    async def stream(self, prepared) -> AsyncIterator[str | GenerationResult]: ...


def refuse_kind(backend: Backend, what: str, kind: str, why: dict[str, str] | None = None):
    """The error for a prompt of a kind `backend` does not serve (`why`: a reason per kind)."""
    return UnsupportedPromptKindError(
        f"{what}; the {backend.name} backend serves {', '.join(backend.prompt_kinds)} only"
        f"{(why or {}).get(kind, '')}", kind=kind)


def check_prompt_kinds(prepared, backend: Backend, why: dict[str, str] | None = None) -> None:
    """Refuse a request using a task whose prompt kind (meta 'kind', soft by default) is not served."""
    for task in tasks_of(prepared):
        kind = task.meta.get("kind", SOFT_PROMPT)
        if kind not in backend.prompt_kinds:
            raise refuse_kind(backend, f"task '{task.name}' is a {kind}", kind, why)


_DONE = object()


class BuiltinBackend:
    """The engine's own model; concurrent requests share mixed-task batches."""

    name = "builtin"
    prompt_kinds = (SOFT_PROMPT,)

    def __init__(self, engine: Engine, *, max_batch_size: int = 16, max_wait_ms: float = 5):
        self.engine = engine
        self.scheduler = BatchScheduler(engine, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)

    async def start(self) -> None:
        errors = await asyncio.to_thread(self.engine.refresh)
        log.info("serving %s with %d task(s)%s", self.engine.base_model_id, len(self.engine.tasks()),
                 f"; skipped {sorted(errors)}" if errors else "")

    async def close(self) -> None:
        await asyncio.to_thread(self.scheduler.close)

    async def health(self) -> dict:
        return {"name": self.name, "status": "up", "prompt_kinds": list(self.prompt_kinds)}

    async def prepare(self, request):
        prepared = await self.scheduler.prepare(request)
        check_prompt_kinds(prepared, self)
        return prepared

    async def run(self, prepared):
        future = self.scheduler.enqueue(prepared)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            prepared.cancelled = True  # the client went away: the row stops at its next token
            raise

    async def stream(self, prepared) -> AsyncIterator[str | GenerationResult]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        prepared.request.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
        future = self.scheduler.enqueue(prepared)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, _DONE))
        return self._pieces(prepared, pieces, future)

    @staticmethod
    async def _pieces(prepared, pieces: asyncio.Queue, future) -> AsyncIterator[str | GenerationResult]:
        try:
            while (piece := await pieces.get()) is not _DONE:
                yield piece
            yield future.result()  # raises if the request failed after the stream began
        finally:
            prepared.cancelled = True  # the client went away: stop generating for it


def tasks_of(prepared) -> list:
    """The tasks a prepared request uses (generation: one row; scoring: each pair's)."""
    if prepared.kind == "generate":
        return [prepared.task] if prepared.task is not None else []
    return [pair.task for pair in prepared.pairs if pair.task is not None]
