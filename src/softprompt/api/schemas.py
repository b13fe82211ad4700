"""What an HTTP request may carry: the JSON bodies of the OpenAI-compatible routes (pydantic
schemas, strict: no string-to-number or bool-to-int coercion; an explicit null is the field's
default; unknown OpenAI options are accepted and ignored, lone surrogates refused), the work
one request may ask for
(`RequestLimits`: over a limit is a 413 naming it) and a listing's page (`ListPage`: `limit`,
`after`). app.py and console.py use them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from softprompt.data import is_valid_unicode
from softprompt.errors import ConfigError, InvalidTaskNameError, RequestLimitError
from softprompt.options import flag, opt
from softprompt.serving.processor import InputProcessor
from softprompt.serving.registry import TaskPage
from softprompt.serving.requests import MAX_TOP_LOGPROBS, SEED_RANGE

# ---------------------------------------------------------------- a listing's page

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000


@dataclass
class ListPage:
    """Which page of a task listing (/v1/models, /v1/tasks) a client asks for, in OpenAI's list
    style: up to `limit` entries after the id `after` (the previous page's `last_id`)."""

    limit: int = DEFAULT_LIST_LIMIT
    after: str | None = None

    def read(self, processor: InputProcessor, visible: Callable[[str], bool]) -> TaskPage:
        """This page of the backend's tasks that `visible` lets the caller see (no prompt read)."""
        try:
            return processor.listing(self.limit, self.after, visible)
        except InvalidTaskNameError as exc:
            error = ConfigError(f"after must be an id from a listing: {exc}")
            error.param = "after"
            raise error from None

    @staticmethod
    def body(entries: list[dict], has_more: bool) -> dict:
        """The list fields of a page: its entries and where it ends."""
        return {
            "object": "list",
            "data": entries,
            "first_id": entries[0]["id"] if entries else None,
            "last_id": entries[-1]["id"] if entries else None,
            "has_more": has_more,
        }


def list_page(
    limit: int = Query(
        DEFAULT_LIST_LIMIT,
        ge=1,
        le=MAX_LIST_LIMIT,
        description=f"Entries on the page, 1 to {MAX_LIST_LIMIT}.",
    ),
    after: str | None = Query(
        None,
        description="Start after this id (the previous page's last_id); entries are in id order, "
        "so an id deleted since still marks the place.",
    ),
) -> ListPage:
    """The `limit` and `after` query parameters of a listing route (a FastAPI dependency)."""
    return ListPage(limit, after)


# ---------------------------------------------------------------- limits


@dataclass
class RequestLimits:
    """The work one request may ask for; a request over a limit is refused with 413 naming it."""

    max_inputs_per_request: int = opt(256, "Texts in one /v1/classify request at most.")
    max_prompts_per_request: int = opt(64, "Prompts in one /v1/completions request at most.")
    max_tokens_per_request: int = opt(
        65_536,
        "Tokens one request may make the model process at most: input plus new tokens "
        "to generate; input plus target tokens of every label to classify.",
    )
    max_body_bytes: int = opt(
        0,
        "Largest request body in bytes, prompt uploads included (0 = room for a "
        "64-token deep prompt of the served model, and at least 1 MB).",
    )
    request_timeout_s: float = opt(
        300.0,
        "Seconds before a request fails with 504 (code backend_timeout) and "
        "its work is cancelled: builtin, from its arrival (queue wait "
        "included) to its result; vllm, waiting for vLLM's next answer.",
    )

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

    def body_bytes(self, processor: InputProcessor) -> int:
        """The body limit: the flag, else a 64-token prompt of the largest kind the backend serves
        (a deep prompt's rows hold every layer's keys and values), fp32, plus 1 MB for the JSON
        files and multipart framing."""
        row = processor.widest_row
        return self.max_body_bytes or 64 * row * 4 + 1_000_000

    def check_count(self, limit_name: str, count: int, what: str, param: str) -> None:
        limit = getattr(self, limit_name)
        if count > limit:
            raise RequestLimitError(
                f"{count} {what} in one request; this server takes at most {limit} "
                f"({flag(limit_name)})",
                param=param,
            )

    def check_tokens(self, prepared: list) -> None:
        tokens = sum(p.tokens for p in prepared)
        if tokens > self.max_tokens_per_request:
            raise RequestLimitError(
                f"this request asks for {tokens} tokens of work (input plus new or target tokens); "
                f"this server takes at most {self.max_tokens_per_request} "
                f"({flag('max_tokens_per_request')})"
            )


# ---------------------------------------------------------------- schemas


class _Request(BaseModel):
    # Unknown OpenAI options are accepted and ignored. Strict: "3" or true is not a max_tokens
    # (a JSON int is still a float).
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, body):
        """An explicit null means the field's default, as OpenAI's API reads it."""
        if isinstance(body, dict):
            return {key: value for key, value in body.items() if value is not None}
        return body

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value):
        """JSON's \\u escapes allow lone surrogates, which no tokenizer or UTF-8 encoder accepts."""
        where = _lone_surrogate(value)
        if where is not None:
            raise ValueError(
                f"{where or 'text'} holds a lone surrogate (a \\ud800-\\udfff escape), "
                "which is not valid Unicode"
            )
        return value


class SamplingFields(_Request):
    """The fields completions and chat completions share: the task and how to sample."""

    model: str = Field(
        description="A task name (its soft prompt is prepended) or the base model's id."
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy; higher = more random.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    n: int = Field(1, description="Completions per prompt; only 1 is supported.")
    stop: str | list[str] | None = Field(
        None, description="Up to 16 stop strings; the text is cut before one."
    )
    seed: int | None = Field(
        None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="Seed for reproducible sampling."
    )
    ignore_eos: bool = Field(
        False, description="Generate past end-of-sequence tokens, up to max_tokens (as vLLM)."
    )
    stream: bool = Field(
        False, description="Send the text as server-sent events while it is generated."
    )
    stream_options: dict[str, Any] | None = Field(
        None, description='{"include_usage": true} adds a usage chunk.'
    )

    @field_validator("stream_options")
    @classmethod
    def _usage_flag(cls, options):
        if options is not None and not isinstance(options.get("include_usage", False), bool):
            raise ValueError("include_usage must be true or false")
        return options

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


class CompletionBody(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a list of texts, one list of token ids, or a list of them."
    )
    max_tokens: int = Field(
        16, ge=0, description="New tokens at most (default 16); 0 with echo scores the prompt."
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Return each token's log-probability and this many most likely alternatives.",
    )
    echo: bool = Field(
        False, description="Return the prompt before the completion (with logprobs: its tokens')."
    )


class ChatMessage(_Request):
    role: str = Field(description="system, user, assistant, ...")
    content: str | list[dict[str, Any]] | None = Field(
        None, description="Text, or a list of text parts."
    )

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(
                str(part.get("text", "")) for part in self.content if part.get("type") == "text"
            )
        return self.content or ""


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(
        None, ge=1, description="New tokens at most (default: up to the context)."
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Same as max_tokens (newer name)."
    )
    logprobs: bool = Field(
        False, description="Return each new token's log-probability (choices[].logprobs.content)."
    )
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: this many most likely alternatives at each token.",
    )


class ClassifyBody(_Request):
    model: str = Field(description="A task whose saved prompt has a verbalizer.")
    input: str | dict[str, str] | list[str | dict[str, str]] = Field(
        description="What to classify: a text (a template with one field), an object of the template's "
        'fields (e.g. {"question": ...}), or a list of either.'
    )
    zero_shot: bool = Field(
        False,
        description="Score with the task's template and labels but without its "
        "prompt: the plain model's answer, as `eval --zero-shot` gives it.",
    )


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


__all__ = ["ChatBody", "ChatMessage", "ClassifyBody", "CompletionBody", "RequestLimits"]
