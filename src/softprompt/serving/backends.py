"""Serving backends: what the HTTP server asks of whatever runs the model.

The server (routes, schemas, request limits, the error mapping) is the same for every backend. A
backend validates a client request's pieces with its `processor` (processor.py, the one place
that knows tasks, templates and prompt kinds, with one snapshot of the tasks per request), runs
them, and reports its health:

    prepared = await backend.prepare_all([GenerationRequest(...), ...])  # errors keep their status
    results = await backend.run(prepared)    # one result per piece; cancelling the call stops them
    pieces = await backend.stream(prepared[0])  # str pieces, then the GenerationResult

- `BuiltinBackend`: the engine's own model behind one fair continuous batcher (`scheduler.py`),
  with a bounded queue (503 when full) and a per-request timeout (504).
- `VLLMBackend` (`vllm/backend.py`): a vLLM server fed prompt embeddings over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from softprompt.errors import BackendTimeoutError, ConfigError
from softprompt.options import flag
from softprompt.serving.engine import Engine, GenerationResult
from softprompt.serving.processor import InputProcessor
from softprompt.serving.scheduler import BatchScheduler, SchedulerConfig

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    processor: InputProcessor
    """Tasks, tokenizer and request checks: what the HTTP layer reads besides running work."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def health(self) -> dict: ...
    async def prepare_all(self, requests: Sequence) -> list: ...
    async def run(self, prepared: list) -> list: ...
    async def stream(self, prepared) -> AsyncIterator[str | GenerationResult]: ...


_DONE = object()


class BuiltinBackend:
    """The engine's own model; concurrent requests share batches step by step, taking fair turns.

    A request waiting in the queue and running together may take `request_timeout_s` at most:
    then its rows stop at their next step and it fails with BackendTimeoutError (504).
    """

    name = "builtin"

    def __init__(
        self,
        engine: Engine,
        scheduling: SchedulerConfig | None = None,
        *,
        request_timeout_s: float = 300,
    ):
        if not isinstance(request_timeout_s, int | float) or request_timeout_s <= 0:
            raise ConfigError(f"{flag('request_timeout_s')} must be > 0, not {request_timeout_s!r}")
        self.engine = self.processor = engine  # an engine is its own input processor
        self.request_timeout_s = request_timeout_s
        self.scheduler = BatchScheduler.from_config(engine, scheduling or SchedulerConfig())

    async def start(self) -> None:
        """Reads no prompt: each task is loaded on its first request."""
        errors = await asyncio.to_thread(self.engine.refresh)  # what is already in memory
        log.info(
            "serving %s over a bank of %d task(s)%s",
            self.engine.base_model_id,
            len(await asyncio.to_thread(self.engine.task_names)),
            f"; skipped {sorted(errors)}" if errors else "",
        )

    async def close(self) -> None:
        await asyncio.to_thread(self.scheduler.close)

    async def health(self) -> dict:
        return {
            "name": self.name,
            "status": "up",
            "prompt_kinds": list(self.engine.kinds),
            "queued": self.scheduler.queued,
        }

    async def prepare_all(self, requests: Sequence) -> list:
        return await self.scheduler.prepare_all(requests)

    async def run(self, prepared: list) -> list:
        """Run a client request's pieces as one owner: one fair share of the batches, not one per piece.

        Cancelled (the client went away) or timed out: rows stop at their next step, scoring
        before its next slice.
        """
        futures = self.scheduler.enqueue_all(prepared, object())  # OverloadedError when full
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), self.request_timeout_s
            )
        except TimeoutError:
            for piece in prepared:
                piece.cancelled = True
            raise self._timeout() from None
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
        return self._pieces(prepared, pieces, future, loop.time() + self.request_timeout_s)

    async def _pieces(
        self, prepared, pieces: asyncio.Queue, future, deadline: float
    ) -> AsyncIterator[str | GenerationResult]:
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        piece = await pieces.get()
                except TimeoutError:
                    raise self._timeout() from None
                if piece is _DONE:
                    break
                yield piece
            yield future.result()  # raises if the request failed after the stream began
        finally:
            prepared.cancelled = (
                True  # the client went away (or time ran out): stop generating for it
            )

    def _timeout(self) -> BackendTimeoutError:
        return BackendTimeoutError(
            f"the request did not finish within {self.request_timeout_s:g} s "
            f"({flag('request_timeout_s')}); it was cancelled"
        )
