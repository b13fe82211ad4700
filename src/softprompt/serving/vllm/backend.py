"""The vLLM backend: softprompt as a light gateway in front of a vLLM server.

vLLM does the model work (continuous batching, paged KV cache, tensor parallelism); the gateway
holds only the tokenizer, the input-embedding matrix and the bank. For each request it renders the
template or chat, resolves the task exactly like the built-in engine (the same `InputProcessor`,
processor.py: the same tasks, limits and errors), builds the embeddings [soft prompt ; token
embeddings of the input] and sends them as `prompt_embeds` (base64 of `torch.save` of an (n, d)
tensor) to vLLM's `/v1/completions`. Rows without a task are sent as token ids. Every request
carries its own embeddings, so mixed tasks need nothing special, and gateways are stateless over a
shared bank.

Classification scores the verbalizer's targets from log-probabilities: one request per distinct
target prefix asks vLLM (`logprob_token_ids`) for the log-probability of each next target token.
Single-token labels take one request per row; a multi-token target t adds one request per extra
token (the prefix t[:j] is appended as embeddings), so the scores are the same summed
log-likelihoods the built-in scorer computes.

Deep prompts (a key/value prefix in every layer) cannot ride input embeddings. They reach vLLM
through softprompt's KV connector (`plugin/softprompt_deep_connector.py`, loaded into the vLLM the
gateway starts): the gateway publishes the task's prefix once to a folder vLLM reads
(`spool.py`) and sends N placeholder ids + the input's ids naming it; the connector writes the
prefix's keys and values into those N cache slots, so vLLM computes exactly what the built-in
engine computes. Without the connector (a vLLM started elsewhere and no `--vllm-prefix-dir`), or
on a model with sliding-window layers, a deep prompt is refused like the built-in engine refuses a
kind it cannot serve (422, naming the task and the reason), never approximated.

Log-probabilities: a generation's `logprobs` (each new token's, with k alternatives) pass through
to vLLM for every row. `echo` (the prompt's own log-probabilities) passes through for rows
without a task (token ids); vLLM refuses echo and prompt logprobs with prompt embeddings, and for
a deep prompt it would score the placeholders, so for a task's row the gateway answers 422 naming
`echo` and this backend, never a silent null.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio
import httpx
import torch

from softprompt.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    ContextLengthError,
    UnsupportedPromptKindError,
)
from softprompt.model.loading import load_front_end
from softprompt.options import opt
from softprompt.serving.processor import InputProcessor
from softprompt.serving.requests import (
    GenerationResult,
    PreparedPromptLogprobs,
    PromptLogprobs,
    TextPiece,
    TokenLogprob,
)
from softprompt.serving.vllm.spool import (
    PARAMS_KEY,
    PLACEHOLDER_ID,
    SALT_PREFIX,
    PrefixSpool,
    kv_transfer_config,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's limit per request
_SAME_MODEL_TOLERANCE = 0.05  # nats: token ids vs our embeddings of them, through vLLM


@dataclass
class VLLMConfig:
    """How `softprompt serve --backend vllm` reaches (or starts) vLLM."""

    vllm_url: str | None = opt(
        None,
        "URL of a running vLLM server started with --enable-prompt-embeds; "
        "none: start one from the project's vLLM environment.",
    )
    vllm_python: str | None = opt(
        None, "Python of the vLLM environment; none: .venv-vllm/ from `make vllm`."
    )
    vllm_dtype: str = opt(
        "bfloat16",
        "dtype vLLM runs the model in: float32, bfloat16 or float16; the "
        "gateway sends embeddings in it.",
    )
    vllm_max_model_len: int = opt(
        2048, "Context length of a vLLM the gateway starts (--max-model-len)."
    )
    vllm_startup_timeout_s: float = opt(900, "Seconds to wait for a started vLLM to answer.")
    vllm_block_size: int | None = opt(
        None,
        "KV block size of a vLLM the gateway starts (--block-size; none: vLLM's, 128 on CPU). "
        "vLLM's prefix cache reuses whole blocks: a prompt as long as one block is computed "
        "once per task and reused by every request naming it.",
    )
    vllm_prefix_dir: str | None = opt(
        None,
        "Folder shared with vLLM's deep-prompt connector (deep prompts are published there); "
        "none: a temporary one when the gateway starts vLLM. With --vllm-url, deep prompts "
        "are served only when that vLLM runs the connector over this folder.",
    )

    def __post_init__(self):
        if self.vllm_dtype not in _DTYPES:
            raise ConfigError(
                f"vllm_dtype must be one of {', '.join(_DTYPES)}, not {self.vllm_dtype!r}"
            )
        if self.vllm_max_model_len < 1:
            raise ConfigError("vllm_max_model_len must be >= 1")
        if self.vllm_block_size is not None and self.vllm_block_size < 1:
            raise ConfigError("vllm_block_size must be >= 1")


def open_vllm_backend(
    model_name: str, bank, config: VLLMConfig, *, timeout_s: float = 300
) -> VLLMBackend:
    """The gateway for `model_name` over `bank`: to `config.vllm_url`, or to a vLLM it starts;
    a request waits `timeout_s` for vLLM at most (the server's --request-timeout-s)."""
    from softprompt.serving.vllm.process import VLLMProcess, find_vllm_python

    front = load_front_end(model_name)
    processor = InputProcessor.from_front_end(front, bank)
    process, url = None, config.vllm_url
    spool = None
    if url is None or config.vllm_prefix_dir:
        spool = PrefixSpool(config.vllm_prefix_dir)
    if url is None:
        process = VLLMProcess(
            find_vllm_python(config.vllm_python),
            front.source,
            front.config.name_or_path,
            dtype=config.vllm_dtype,
            max_model_len=config.vllm_max_model_len,
            deep_prompt_folder=spool.folder,
            extra_args=("--block-size", str(config.vllm_block_size))
            if config.vllm_block_size
            else (),
        )
        try:
            url = process.start(config.vllm_startup_timeout_s)
        except BaseException:
            spool.close()
            raise
    return VLLMBackend(
        processor, url, dtype=config.vllm_dtype, timeout_s=timeout_s, process=process, spool=spool
    )


# ---------------------------------------------------------------- talking to vLLM


def encode_embeds(embeds: torch.Tensor) -> str:
    """base64 of `torch.save` of an (n, d) tensor, what vLLM's `prompt_embeds` takes.

    The tensor is copied first: torch.save writes a view's whole storage (a whole matrix).
    """
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous().clone(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VLLMClient:
    """vLLM's OpenAI API over HTTP, with its failures mapped to softprompt's error types."""

    def __init__(self, url: str, *, timeout_s: float):
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=5)
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def alive(self) -> bool:
        try:
            return (await self._http.get("/health", timeout=5)).status_code == 200
        except httpx.HTTPError:
            return False

    async def get(self, path: str) -> dict:
        return await self._call(self._http.get(path))

    async def complete(self, payload: dict) -> dict:
        return await self._call(self._http.post("/v1/completions", json=payload))

    async def stream(self, payload: dict) -> AsyncIterator[dict]:
        """Open a streaming completion (errors raise here), then yield its chunks."""
        request = self._http.build_request(
            "POST", "/v1/completions", json={**payload, "stream": True}
        )
        response = await self._call(self._http.send(request, stream=True), raw=True)
        return self._chunks(response)

    async def _chunks(self, response: httpx.Response) -> AsyncIterator[dict]:
        try:
            async for line in self._guard(response.aiter_lines()):
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _error_from(500, chunk, self.url)
                yield chunk
        finally:
            with anyio.CancelScope(
                shield=True
            ):  # closing the connection is how vLLM hears "cancel"
                await response.aclose()

    async def _guard(self, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for line in lines:
                yield line
        except httpx.TimeoutException as exc:
            raise BackendTimeoutError(
                f"vLLM at {self.url} sent nothing for too long: {exc!r}"
            ) from exc
        except httpx.TransportError as exc:
            raise BackendUnavailableError(
                f"vLLM at {self.url} dropped the stream: {exc!r}"
            ) from exc

    async def _call(self, pending, *, raw: bool = False):
        try:
            response = await pending
        except httpx.TimeoutException as exc:
            raise BackendTimeoutError(
                f"vLLM at {self.url} did not answer in time ({exc!r})"
            ) from exc
        except httpx.TransportError as exc:
            raise BackendUnavailableError(f"vLLM at {self.url} is not reachable ({exc!r})") from exc
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            raise _error_from(response.status_code, _json_or_text(body), self.url)
        return response if raw else response.json()


def _json_or_text(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except ValueError:
        return {"message": body.decode(errors="replace")[:500]}
    return value if isinstance(value, dict) else {"message": str(value)[:500]}


def _error_from(status: int, body: dict, url: str) -> Exception:
    """vLLM's error answer -> the error the built-in engine raises for the same cause."""
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    message = str(error.get("message") or body)
    if status in (400, 422) and "maximum context length" in message:
        return ContextLengthError(message)
    if status in (400, 422):
        return ConfigError(f"vLLM refused the request: {message}")
    return BackendUnavailableError(f"vLLM at {url} failed the request (HTTP {status}): {message}")


# ---------------------------------------------------------------- the backend


@dataclass
class _Served:
    """What the gateway learned from vLLM: the model id to name in requests, its context."""

    model: str
    max_model_len: int | None


class VLLMBackend:
    """Serve a bank's tasks through vLLM; see the module docstring."""

    name = "vllm"

    def __init__(
        self,
        processor: InputProcessor,
        url: str,
        *,
        dtype: str = "bfloat16",
        timeout_s: float = 300,
        process=None,
        spool: PrefixSpool | None = None,
    ):
        self.processor = processor
        """Prepares requests as the built-in engine does (its tasks, limits and errors)."""
        self.spool = spool
        """Where deep prompts are published for vLLM's connector; None: deep prompts refused."""
        self.prefix_shape = processor.prefix_shape  # the config's: the gateway has no layers
        self._deep_refusal = _deep_refusal(spool, self.prefix_shape)
        processor.kinds = tuple(  # embeddings travel in any request; KV only through the connector
            name
            for name, kind in processor.prompt_kinds.items()
            if kind.enters_as_embeddings or self._deep_refusal is None
        )
        self.client = VLLMClient(url, timeout_s=timeout_s)
        self.dtype = _DTYPES[dtype]
        self.process = process
        """A VLLMProcess this gateway started (stopped on close), or None."""
        self._served: _Served | None = None
        self._discovering = asyncio.Lock()
        self._model_context = processor.context_length  # the model's own; vLLM's may be shorter

    # ------------------------------------------------------------ lifecycle and health

    async def start(self) -> None:
        errors = await asyncio.to_thread(self.processor.refresh)
        if errors:
            log.warning("skipped unusable tasks: %s", sorted(errors))
        try:
            await self._ensure_served()
        except (
            BackendUnavailableError
        ) as exc:  # keep serving /health; requests get 503 until it is up
            log.warning("vLLM is not usable yet: %s", exc)

    async def close(self) -> None:
        await self.client.close()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
        if self.spool is not None:
            self.spool.close()

    async def health(self) -> dict:
        up = await self.client.alive()
        if not up:
            self._served = None  # find out again (and check the model) once it is back
        return {
            "name": self.name,
            "status": "up" if up else "down",
            "url": self.client.url,
            "prompt_kinds": list(self.processor.kinds),
            "prefix_dir": str(self.spool.folder) if self.spool else None,
        }

    # ------------------------------------------------------------ requests

    async def prepare_all(self, requests: Sequence) -> list:
        """Validate like the built-in engine (same tasks, snapshot and errors), then make sure vLLM
        is there."""
        try:
            prepared = await asyncio.to_thread(self.processor.prepare_all, requests)
        except UnsupportedPromptKindError as exc:  # a kind vLLM cannot take here: say why
            raise _cannot_serve(exc, self._deep_refusal) from None
        for piece in prepared:
            scored = isinstance(piece, PreparedPromptLogprobs) and piece.pairs
            if scored and piece.task is not None:
                raise _no_echo(piece.task.name)
        await self._ensure_served()
        return prepared

    async def run(self, prepared: list) -> list:
        """Per piece: a GenerationResult, or the scores / classifications of a score request.

        Cancelling the call cancels its HTTP requests, and vLLM aborts a request whose connection
        closes.
        """
        return await asyncio.gather(*(self._run_one(piece) for piece in prepared))

    async def _run_one(self, prepared):
        if isinstance(prepared, PreparedPromptLogprobs):
            return await self._failing_over(self._echo(prepared))
        if prepared.kind == "generate":
            return await self._failing_over(self._generate(prepared))
        return await self._failing_over(self._score(prepared))

    async def stream(self, prepared) -> AsyncIterator[str | GenerationResult]:
        """Start streaming (errors raise here); yields text pieces, then the GenerationResult."""
        chunks = await self._failing_over(
            self.client.stream(self._generation_payload(prepared, stream=True))
        )
        return self._pieces(prepared, chunks)

    async def _pieces(
        self, prepared, chunks: AsyncIterator[dict]
    ) -> AsyncIterator[str | GenerationResult]:
        text, token_ids, finish, usage, logprobs = [], [], None, None, []
        top = prepared.request.logprobs
        try:
            async for chunk in chunks:
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    token_ids += choice.get("token_ids") or []
                    finish = choice.get("finish_reason") or finish
                    shaped = choice.get("logprobs") if top is not None else None
                    entries = _entries(shaped, top) if shaped else None  # none on the last chunk
                    logprobs += entries or []
                    if choice.get("text") or entries:
                        text.append(choice.get("text") or "")
                        yield TextPiece(choice.get("text") or "", entries)
        except BackendUnavailableError:
            self._served = None
            raise
        finally:
            await chunks.aclose()
        completion = (usage or {}).get("completion_tokens", len(token_ids))
        yield GenerationResult(
            "".join(text),
            token_ids,
            finish or "stop",
            len(prepared.input_ids),
            completion,
            logprobs if top is not None else None,
        )

    async def _failing_over(self, work):
        """Await `work`; on a backend failure forget what we knew, so recovery re-checks vLLM."""
        try:
            return await work
        except BackendUnavailableError:
            self._served = None
            raise

    async def _generate(self, prepared) -> GenerationResult:
        answer = await self.client.complete(self._generation_payload(prepared, stream=False))
        choice, top = answer["choices"][0], prepared.request.logprobs
        return GenerationResult(
            choice["text"],
            list(choice.get("token_ids") or []),
            choice.get("finish_reason") or "stop",
            len(prepared.input_ids),
            answer.get("usage", {}).get("completion_tokens", 0),
            _entries(choice.get("logprobs"), top) if top is not None else None,
        )

    async def _echo(self, prepared: PreparedPromptLogprobs) -> PromptLogprobs:
        """A plain row's prompt log-probabilities from vLLM's own echo (token ids; a task's row
        was refused in `prepare_all`)."""
        ids = list(prepared.token_ids)
        if not prepared.pairs:  # one token, or only the tokens asked for
            return prepared.finish([])
        answer = await self.client.complete(
            {
                **self._prompt_fields(None, ids),
                "max_tokens": 1,
                "temperature": 0,
                "echo": True,
                "logprobs": prepared.request.top_logprobs,
                "return_tokens_as_token_ids": True,
            }
        )
        entries = _entries(answer["choices"][0].get("logprobs"), prepared.request.top_logprobs)
        return PromptLogprobs(ids, [None, *entries[1 : len(ids)]])

    def _generation_payload(self, prepared, *, stream: bool) -> dict:
        sampling = prepared.sampling
        payload = {
            "max_tokens": prepared.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
            "stop": list(prepared.stops),
            "ignore_eos": prepared.request.ignore_eos,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if stream:
            payload["stream_options"] = {"include_usage": True}
        if prepared.request.logprobs is not None:
            payload["logprobs"] = prepared.request.logprobs
            payload["return_tokens_as_token_ids"] = True
        return {**payload, **self._prompt_fields(prepared.task, prepared.input_ids)}

    def _prompt_fields(self, task, ids: list[int]) -> dict:
        """The request's input: token ids alone (no task); embeddings [soft prompt ; tokens] for
        a prompt that is embeddings; else (a deep prompt) placeholders, then the ids, naming its
        published prefix."""
        fields = {"model": self._served.model}
        if task is None:
            return {**fields, "prompt": list(ids)}
        if self.processor.kind_of(task).enters_as_embeddings:
            weight = self.processor.input_embeddings.weight
            embeds = torch.cat([task.prompt.to(self.dtype), weight[ids].to(self.dtype)])  # (n+L, d)
            return {**fields, "prompt_embeds": encode_embeds(embeds)}
        return {**fields, **self.spool.request_fields(task, self.prefix_shape, ids)}

    # ------------------------------------------------------------ scoring (classification)

    async def _score(self, prepared):
        """Summed target log-probabilities per pair, from one request per distinct prefix."""
        wanted: dict[tuple, set[int]] = {}
        for pair in prepared.pairs:
            for j, token in enumerate(pair.target_ids):
                wanted.setdefault(_prefix_key(pair, j), set()).add(token)
        keys = list(wanted)
        found = await asyncio.gather(
            *(self._next_token_logprobs(key, sorted(wanted[key])) for key in keys)
        )
        logprobs = dict(zip(keys, found, strict=True))
        scores = [
            sum(logprobs[_prefix_key(pair, j)][token] for j, token in enumerate(pair.target_ids))
            for pair in prepared.pairs
        ]
        return prepared.finish(scores)

    async def _next_token_logprobs(self, key: tuple, tokens: list[int]) -> dict[int, float]:
        task, ids = key
        out: dict[int, float] = {}
        for start in range(0, len(tokens), _MAX_LOGPROB_TOKEN_IDS):
            chunk = tokens[start : start + _MAX_LOGPROB_TOKEN_IDS]
            answer = await self.client.complete(
                {
                    **self._prompt_fields(task, list(ids)),
                    "max_tokens": 1,
                    "temperature": 0,
                    "logprobs": 1,
                    "logprob_token_ids": chunk,
                    "return_tokens_as_token_ids": True,
                }
            )
            out.update(_token_logprobs(answer, chunk))
        return out

    # ------------------------------------------------------------ discovery

    async def _ensure_served(self) -> _Served:
        """Ask vLLM (once, and again after a failure) what it serves, and check it is our model."""
        async with self._discovering:
            if self._served is None:
                listing = await self.client.get("/v1/models")
                entry = (listing.get("data") or [{}])[0]
                if "id" not in entry:
                    raise BackendUnavailableError(f"vLLM at {self.client.url} lists no model")
                served = _Served(entry["id"], entry.get("max_model_len"))
                await self._check_same_model(served)
                if self.spool is not None:
                    await self._check_connector(served)
                self.processor.context_length = min(
                    self._model_context, int(served.max_model_len or self._model_context)
                )
                self._served = served
                log.info(
                    "vLLM at %s serves %s (context %s)",
                    self.client.url,
                    served.model,
                    served.max_model_len,
                )
            return self._served

    async def _check_same_model(self, served: _Served) -> None:
        """Token ids and our embeddings of them must give vLLM the same next-token log-probs.

        A vLLM serving another model than the gateway's embedding table would otherwise answer
        every soft-prompt request with garbage.
        """
        ids = self.processor.tokenizer("The capital of France is", add_special_tokens=True)[
            "input_ids"
        ]
        weight = self.processor.input_embeddings.weight
        base = {
            "model": served.model,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": 5,
            "return_tokens_as_token_ids": True,
        }
        by_ids = await self.client.complete({**base, "prompt": ids})
        by_embeds = await self.client.complete(
            {**base, "prompt_embeds": encode_embeds(weight[ids].to(self.dtype))}
        )
        a, b = _top_logprobs(by_ids), _top_logprobs(by_embeds)
        shared = a.keys() & b.keys()
        if not shared or max(abs(a[k] - b[k]) for k in shared) > _SAME_MODEL_TOLERANCE:
            raise BackendUnavailableError(
                f"vLLM at {self.client.url} ({served.model}) does not serve the gateway's model "
                f"{self.processor.base_model_id!r}: the same tokens as ids and as our embeddings "
                f"give different next tokens ({a} vs {b}); start vLLM on the same weights"
            )

    async def _check_connector(self, served: _Served) -> None:
        """vLLM must refuse a request naming a prefix that does not exist: one without the
        connector would run the placeholders as text, and serve every deep prompt wrongly."""
        missing = "0" * 32
        probe = {
            "model": served.model,
            "prompt": [PLACEHOLDER_ID, PLACEHOLDER_ID],
            "max_tokens": 1,
            "temperature": 0,
            "kv_transfer_params": {PARAMS_KEY: {"sha": missing, "task": "connector-check"}},
            "cache_salt": SALT_PREFIX + missing,
        }
        try:
            await self.client.complete(probe)
        except (BackendUnavailableError, ConfigError):
            return  # refused: the connector is there
        raise BackendUnavailableError(
            f"vLLM at {self.client.url} does not run softprompt's deep-prompt connector over "
            f"{self.spool.folder} (a request naming a missing prefix was answered): start it with "
            f"--kv-transfer-config '{json.dumps(kv_transfer_config(self.spool.folder))}' and "
            "the connector's folder on PYTHONPATH (docs/serving.md), or drop --vllm-prefix-dir"
        )


def _deep_refusal(spool: PrefixSpool | None, shape) -> str | None:
    """Why this gateway cannot serve deep prompts, or None when it can."""
    if shape is None:
        return (
            "this model has sliding-window layers, whose cache the deep-prompt connector does "
            "not fill (serve it with --backend builtin)"
        )
    if spool is None:
        return (
            "the vLLM at --vllm-url runs without softprompt's deep-prompt connector as far as the "
            "gateway knows: let the gateway start vLLM (no --vllm-url), or start vLLM with the "
            "connector (docs/serving.md) and pass --vllm-prefix-dir"
        )
    return None


def _cannot_serve(
    exc: UnsupportedPromptKindError, reason: str | None
) -> UnsupportedPromptKindError:
    """The engine's refusal (same type, so the same 422), saying why vLLM cannot serve the kind
    (the gateway refuses only kinds that are not embeddings, so `reason` is theirs)."""
    why = f": {reason}" if reason else ""
    return UnsupportedPromptKindError(
        f"task '{exc.task}' is a {exc.kind} prompt, which the vLLM backend cannot serve{why}",
        task=exc.task,
        kind=exc.kind,
    )


def _no_echo(task: str) -> ConfigError:
    error = ConfigError(
        f"echo (the prompt's log-probabilities) is not available on the vllm backend for task "
        f"'{task}': vLLM refuses echo and prompt logprobs with prompt embeddings, which carry a "
        "soft prompt, and would score a deep prompt's placeholders (serve with --backend builtin "
        "for them; logprobs of new tokens work)"
    )
    error.param = "echo"
    return error


def _token_id(name: str) -> int:
    """The id in vLLM's 'token_id:N' (what `return_tokens_as_token_ids` makes of a token)."""
    return int(name.rsplit(":", 1)[1])


def _entries(logprobs: dict | None, top: int) -> list[TokenLogprob | None]:
    """vLLM's completions `logprobs` object as entries (None where it has none: an echoed
    prompt's first token), each with its `top` best alternatives."""
    if not logprobs or logprobs.get("tokens") is None:
        raise BackendUnavailableError(f"vLLM answered without log-probabilities: {logprobs!r:.300}")
    entries: list[TokenLogprob | None] = []
    for token, value, alternatives in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        if value is None:
            entries.append(None)
            continue
        best = sorted(((_token_id(k), v) for k, v in (alternatives or {}).items()), key=_by_value)
        entries.append(TokenLogprob(_token_id(token), float(value), best[:top]))
    return entries


def _by_value(item: tuple[int, float]) -> tuple[float, int]:
    return -item[1], item[0]


def _prefix_key(pair, j: int) -> tuple:
    return pair.task, tuple(pair.input_ids + pair.target_ids[:j])


def _top_logprobs(answer: dict) -> dict[int, float]:
    """{token id: log-prob} of the first generated position (tokens as 'token_id:N')."""
    try:
        top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
        return {int(key.rsplit(":", 1)[1]): float(value) for key, value in top.items()}
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise BackendUnavailableError(
            f"vLLM answered without log-probabilities: {answer!r:.300}"
        ) from exc


def _token_logprobs(answer: dict, tokens: list[int]) -> dict[int, float]:
    found = _top_logprobs(answer)
    missing = [t for t in tokens if t not in found]
    if missing:
        raise BackendUnavailableError(
            f"vLLM returned no log-probability for token ids {missing} "
            "(it needs `logprob_token_ids`, vLLM >= 0.32)"
        )
    return {t: found[t] for t in tokens}
