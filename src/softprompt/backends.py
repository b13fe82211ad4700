"""Serving backends: what the HTTP server asks of whatever runs the model.

The server (routes, schemas, request limits, the error mapping) is the same for every backend. A
backend validates a client request's pieces with the engine's `prepare_all` (the one place that
knows tasks, templates and prompt kinds, with one snapshot of the tasks per request), runs them,
and reports its health:

    prepared = await backend.prepare_all([GenerationRequest(...), ...])  # errors keep their status
    results = await backend.run(prepared)    # one result per piece; cancelling the call stops them
    pieces = await backend.stream(prepared[0])  # str pieces, then the GenerationResult

- `BuiltinBackend`: the engine's own model behind one fair micro-batcher (`BatchScheduler`).
- `VLLMBackend` (`vllm_backend.py`): a vLLM server fed prompt embeddings over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from .engine import BatchScheduler, Engine, GenerationResult

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    engine: Engine

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def health(self) -> dict: ...
    async def prepare_all(self, requests: Sequence) -> list: ...
    async def run(self, prepared: list) -> list: ...
    async def stream(self, prepared) -> AsyncIterator[str | GenerationResult]: ...


_DONE = object()


class BuiltinBackend:
    """The engine's own model; concurrent requests share mixed-task batches, taking fair turns."""

    name = "builtin"

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
        return {"name": self.name, "status": "up", "prompt_kinds": list(self.engine.kinds)}

    async def prepare_all(self, requests: Sequence) -> list:
        return await self.scheduler.prepare_all(requests)

    async def run(self, prepared: list) -> list:
        """Run a client request's pieces as one owner: one fair share of the batches, not one per piece.

        Cancelled (the client went away): rows stop at their next token, scoring before its next batch.
        """
        owner = object()
        futures = [self.scheduler.enqueue(piece, owner) for piece in prepared]
        try:
            return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except asyncio.CancelledError:
            for piece in prepared:
                piece.cancelled = True
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
