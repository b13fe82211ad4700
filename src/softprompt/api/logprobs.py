"""Log-probabilities in OpenAI's shapes: the completions API's `logprobs` object (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`) and the chat API's `logprobs.content` list.

The entries come from a backend (`serving.requests.TokenLogprob`: token ids and the model's
log-softmax); the token strings and offsets come from the processor's tokenizer here, so both
backends answer alike. The virtual tokens of a task's prompt are never part of a prompt's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from softprompt.serving.processor import InputProcessor
from softprompt.serving.requests import TokenLogprob


def completion_logprobs(
    processor: InputProcessor,
    entries: Sequence[TokenLogprob | None],
    ids: Sequence[int],
    *,
    offset: int = 0,
    start: int = 0,
) -> dict:
    """The completions API's object for the tokens `ids[start:]` (one entry each; None for an
    echoed prompt's first token), their text offsets counted from `offset`.

    `ids[:start]` are the tokens before them in the same text (earlier stream chunks), read only
    for the text the new tokens add."""
    return _completion_logprobs(processor, entries, ids, offset, start)[0]


def _completion_logprobs(processor, entries, ids, offset: int, start: int) -> tuple[dict, int]:
    """(the object, the offset after its last token's text)."""
    texts = processor.token_texts(ids[start:])
    names = _names(processor, [e for e in entries if e is not None])
    offsets = []
    for piece in processor.text_pieces(ids, start):
        offsets.append(offset)
        offset += len(piece)
    top = []
    for entry, text in zip(entries, texts, strict=True):
        if entry is None:
            top.append(None)
            continue
        best = {names[t]: value for t, value in entry.top}
        best.setdefault(text, entry.logprob)  # the chosen token is always there, as OpenAI's
        top.append(best)
    rendered = {
        "tokens": texts,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }
    return rendered, offset


class CompletionLogprobStream:
    """The completions API's object chunk by chunk: offsets and token texts continue across the
    chunks of one streamed completion."""

    def __init__(self, processor: InputProcessor, offset: int = 0):
        self.processor, self.offset, self.ids = processor, offset, []

    def render(self, entries: Sequence[TokenLogprob]) -> dict:
        start = len(self.ids)
        self.ids += [e.token for e in entries]
        out, self.offset = _completion_logprobs(
            self.processor, entries, self.ids, self.offset, start
        )
        return out


def merge_completion_logprobs(first: dict | None, second: dict) -> dict:
    """An echoed prompt's object followed by the generated tokens'."""
    if first is None:
        return second
    return {key: first[key] + second[key] for key in second}


def chat_logprobs(processor: InputProcessor, entries: Sequence[TokenLogprob]) -> dict:
    """The chat API's `{"content": [...]}`: each token with its log-probability, UTF-8 bytes and
    its alternatives (as many as `top_logprobs` asked)."""
    texts = processor.token_texts([e.token for e in entries])
    names = _names(processor, entries)
    content = []
    for entry, text in zip(entries, texts, strict=True):
        content.append(
            {
                **_chat_token(text, entry.logprob),
                "top_logprobs": [_chat_token(names[t], value) for t, value in entry.top],
            }
        )
    return {"content": content}


def _names(processor: InputProcessor, entries: Sequence[TokenLogprob]) -> dict[int, str]:
    """The text of every alternative token of `entries`, each decoded once."""
    ids = sorted({t for e in entries for t, _ in e.top})
    return dict(zip(ids, processor.token_texts(ids), strict=True))


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}


__all__ = [
    "CompletionLogprobStream",
    "chat_logprobs",
    "completion_logprobs",
    "merge_completion_logprobs",
]
