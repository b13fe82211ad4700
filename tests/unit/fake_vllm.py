"""A stand-in for vLLM's OpenAI server, for the gateway's unit tests.

It answers `/health`, `/v1/models` and `/v1/completions` the way vLLM does (prompt ids or
`prompt_embeds` = base64 of `torch.save`, greedy or seeded sampling, stop strings, streaming,
`logprobs` in vLLM's completions shape, `echo` for token ids (refused with prompt embeds, as
vLLM refuses it), `logprob_token_ids`, `return_tokens_as_token_ids`, OpenAI-shaped errors), with a
tiny HF model doing the work by plain full forwards over the embeddings. Given `prefix_dir`, it
also plays softprompt's deep-prompt connector: a body whose `kv_transfer_params` name a prefix
file there runs its real tokens after that per-layer K/V (placeholders skipped), and a missing
prefix, a wrong salt or missing placeholders fail with a 500, as the connector makes vLLM fail. It records every body it receives and every
request whose client went away, and can be told to fail, to be slow, or to go down and come back.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from safetensors.torch import load_file
from transformers import DynamicCache


class FakeVLLM:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        served: str = "tiny",
        max_model_len: int = 200,
        prefix_dir=None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.prefix_dir = prefix_dir
        """The deep-prompt connector's folder; None: no connector (placeholders run as text)."""
        self.served, self.max_model_len = served, max_model_len
        self.bodies: list[dict] = []
        """Every /v1/completions body received, in order."""
        self.cancelled: list[int] = []
        """Indexes (into `bodies`) of requests whose client disconnected before the answer."""
        self.failures: list[tuple[int, dict]] = []
        """(status, body) answers to give to the next completion requests, first one first."""
        self.token_delay_s = 0.0
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._lock = threading.Lock()  # the tiny model runs one request at a time

    # ------------------------------------------------------------ running

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int) -> None:
        self.port = port
        self._server = uvicorn.Server(
            uvicorn.Config(self._app(), host="127.0.0.1", port=port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self._server.started, "fake vLLM did not start"

    def stop(self) -> None:
        """Go down (connections refused) until `start` again, like a crashed vLLM."""
        self._server.should_exit = True
        self._thread.join(20)

    # ------------------------------------------------------------ the app

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            return {}

        @app.get("/v1/models")
        async def models():
            return {
                "object": "list",
                "data": [
                    {
                        "id": self.served,
                        "object": "model",
                        "root": "tiny",
                        "max_model_len": self.max_model_len,
                    }
                ],
            }

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            with self._lock:
                self.bodies.append(body)
                index = len(self.bodies) - 1
                failure = self.failures.pop(0) if self.failures else None
            if failure is not None:
                return JSONResponse(failure[1], status_code=failure[0])
            if body.get("model") != self.served:
                return _error(404, f"The model `{body.get('model')}` does not exist.")
            embeds = self._embeds(body)
            try:
                prefix = self._deep_prefix(body)
            except ValueError as exc:  # what the connector's refusal looks like from outside
                return _error(500, f"Internal server error ({exc})")
            if embeds.shape[0] + body.get("max_tokens", 16) > self.max_model_len:
                return _error(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your request has {embeds.shape[0]} input tokens.",
                )
            if body.get("echo") and "prompt_embeds" in body:
                return _error(400, "Echo is unsupported with prompt embeds.")
            if body.get("stream"):
                return StreamingResponse(
                    self._stream(body, embeds, index, prefix), media_type="text/event-stream"
                )
            return await self._complete(request, body, embeds, index, prefix)

        return app

    def _embeds(self, body: dict) -> torch.Tensor:
        table = self.model.get_input_embeddings().weight
        if "prompt_embeds" in body:
            return torch.load(
                io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True
            ).float()
        return table[torch.tensor(body["prompt"])].detach()

    def _deep_prefix(self, body: dict) -> torch.Tensor | None:
        """The K/V [layers, 2, H, N, hd] a body's kv_transfer_params name (None: no deep prompt)."""
        spec = (body.get("kv_transfer_params") or {}).get("softprompt_deep")
        if not spec or self.prefix_dir is None:
            return None
        path = self.prefix_dir / f"{spec['sha']}.safetensors"
        if not path.exists():
            raise ValueError(f"no prefix {spec['sha']}")
        kv = load_file(str(path))["kv"]
        n = kv.shape[3]
        if body.get("cache_salt") != f"softprompt-deep-{spec['sha']}":
            raise ValueError("wrong cache_salt")
        if len(body["prompt"]) <= n or any(t != 0 for t in body["prompt"][:n]):
            raise ValueError("placeholders missing")
        return kv

    def _last_logits(self, embeds: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """(L, V) logits of embeds (L, d); after a deep prompt's K/V when given (embeds then
        still start with its N placeholders, which the prefix replaces)."""
        with torch.no_grad():
            if prefix is None:
                return self.model(inputs_embeds=embeds[None]).logits[0].float()
            n, cache = prefix.shape[3], DynamicCache()
            for layer in range(prefix.shape[0]):
                cache.update(prefix[layer, 0][None], prefix[layer, 1][None], layer)
            real = embeds[n:]
            out = self.model(
                inputs_embeds=real[None],
                cache=cache,
                attention_mask=torch.ones(1, n + len(real), dtype=torch.long),
                position_ids=torch.arange(n, n + len(real))[None],
            )
            return torch.cat([torch.zeros(n, out.logits.shape[-1]), out.logits[0].float()])

    async def _complete(
        self, request: Request, body: dict, embeds: torch.Tensor, index: int, prefix=None
    ):
        tokens, pieces, logprobs = [], [], []
        async for token, piece, top in self._tokens(body, embeds, prefix):
            tokens.append(token)
            pieces.append(piece)
            logprobs.append(top)
            if self.token_delay_s and await request.is_disconnected():
                self.cancelled.append(index)  # vLLM aborts a request whose client went away
                return JSONResponse({}, status_code=499)
        text, finish = self._finish(body, tokens)
        shaped = None
        if body.get("logprobs") is not None:
            names = [f"token_id:{t}" for t in tokens]
            shaped = {
                "tokens": names,
                "token_logprobs": [top[n] for n, top in zip(names, logprobs, strict=True)],
            }
            shaped |= {"top_logprobs": logprobs, "text_offset": [0] * len(tokens)}
            if body.get("echo"):
                shaped = _joined(self._prompt_logprobs(body, embeds), shaped)
        choice = {
            "index": 0,
            "text": text,
            "token_ids": tokens,
            "finish_reason": finish,
            "logprobs": shaped,
        }
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": self.served,
            "choices": [choice],
            "usage": {"prompt_tokens": embeds.shape[0], "completion_tokens": len(tokens)},
        }

    async def _stream(self, body: dict, embeds: torch.Tensor, index: int, prefix=None):
        tokens, sent = [], ""
        try:
            async for token, _, top in self._tokens(body, embeds, prefix):
                tokens.append(token)
                text, finish = self._finish(body, tokens)
                if finish == "stop" and self.tokenizer.eos_token_id not in tokens:
                    break  # a stop string: the text is already cut before it
                name = f"token_id:{token}"
                shaped = {"tokens": [name], "token_logprobs": [top[name]], "top_logprobs": [top]}
                yield _sse(
                    {
                        "choices": [
                            {
                                "index": 0,
                                "text": text[len(sent) :],
                                "token_ids": [token],
                                "finish_reason": None,
                                "logprobs": shaped if body.get("logprobs") is not None else None,
                            }
                        ]
                    }
                )
                sent = text
            text, finish = self._finish(body, tokens)
            yield _sse(
                {
                    "choices": [
                        {
                            "index": 0,
                            "text": text[len(sent) :],
                            "token_ids": [],
                            "finish_reason": finish,
                        }
                    ]
                }
            )
            yield _sse(
                {
                    "choices": [],
                    "usage": {"prompt_tokens": embeds.shape[0], "completion_tokens": len(tokens)},
                }
            )
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(index)
            raise

    async def _tokens(self, body: dict, embeds: torch.Tensor, prefix=None):
        """(token id, its text, {'token_id:N': logprob} of the asked ids) per generated token."""
        table = self.model.get_input_embeddings().weight
        generator = (
            torch.Generator().manual_seed(body["seed"]) if body.get("seed") is not None else None
        )
        for _ in range(body.get("max_tokens", 16)):
            logits = self._last_logits(embeds, prefix)[-1]  # (V,)
            logprobs = logits.log_softmax(-1)
            if body.get("temperature", 1.0) == 0:
                token = int(logits.argmax())
            else:
                token = int(
                    torch.multinomial(
                        (logits / body["temperature"]).softmax(-1), 1, generator=generator
                    )
                )
            asked = (
                body.get("logprob_token_ids")
                or logprobs.topk(body.get("logprobs") or 1).indices.tolist()
            )
            top = {f"token_id:{t}": float(logprobs[t]) for t in [token, *asked]}
            yield token, self.tokenizer.decode([token]), top
            if token == self.tokenizer.eos_token_id and not body.get("ignore_eos"):
                return
            embeds = torch.cat([embeds, table[token][None].detach()])
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)

    def _prompt_logprobs(self, body: dict, embeds: torch.Tensor) -> dict:
        """vLLM's echo: each prompt token's log-probability after the ones before it (none for
        the first), with the `logprobs` best alternatives."""
        ids = list(body["prompt"])
        with torch.no_grad():
            logprobs = self.model(inputs_embeds=embeds[None]).logits[0].float().log_softmax(-1)
        names, values, tops = [f"token_id:{ids[0]}"], [None], [None]
        for j in range(1, len(ids)):
            row = logprobs[j - 1]  # (V,)
            best = row.topk(body.get("logprobs") or 1).indices.tolist()
            names.append(f"token_id:{ids[j]}")
            values.append(float(row[ids[j]]))
            tops.append({f"token_id:{t}": float(row[t]) for t in [ids[j], *best]})
        return {"tokens": names, "token_logprobs": values, "top_logprobs": tops}

    def _finish(self, body: dict, tokens: list[int]) -> tuple[str, str]:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in body.get("stop") or []) if i >= 0]
        if cuts:
            return text[: min(cuts)], "stop"
        if tokens and tokens[-1] == self.tokenizer.eos_token_id:
            return text, "stop"
        return text, "length"


def _joined(prompt: dict, generated: dict) -> dict:
    return {
        key: prompt[key] + generated[key] for key in ("tokens", "token_logprobs", "top_logprobs")
    }


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _error(status: int, message: str) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status_code=status,
    )


def decode_embeds(body: dict) -> torch.Tensor:
    """The tensor a body's `prompt_embeds` carries, decoded as vLLM decodes it."""
    return torch.load(
        io.BytesIO(base64.b64decode(body["prompt_embeds"], validate=True)),
        weights_only=True,
        map_location="cpu",
    )


__all__ = ["FakeVLLM", "decode_embeds"]
