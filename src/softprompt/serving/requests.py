"""What the engine is asked and answers: requests and results (generation, classification,
scoring), the prepared work a request becomes once checked and tokenised (what the scheduler
batches), and the checks and parsing of a request's inputs (sampling settings, classify inputs,
template fields). No model here: `engine.py` runs the prepared work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from softprompt.data import Task, is_valid_unicode
from softprompt.errors import ConfigError
from softprompt.prompting import inject
from softprompt.prompting.scorer import ScoreRow
from softprompt.serving.registry import LoadedTask, TaskSnapshot

# ---------------------------------------------------------------- requests and results


@dataclass
class GenerationRequest:
    """One completion: a prompt (text, or token ids already templated) and how to sample it."""

    prompt: str | list[int]
    """Text (tokenised with the tokenizer's special tokens) or token ids used as they are."""
    task: str | None = None
    """Task whose soft prompt is prepended; None or the base model's name = no prompt."""
    max_new_tokens: int | None = 16
    """New tokens at most; None = up to the context, at most `Engine.max_new_tokens_cap`."""
    temperature: float = 0.0
    """0 = greedy; above 0 = sampling (below `inject.SAMPLING_EPS`: greedy, its limit)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (with temperature > 0; below `inject.SAMPLING_EPS`: greedy)."""
    seed: int | None = None
    """Seed of this row's own generator: the same seed gives the same text in any batch."""
    stop: str | Sequence[str] = ()
    """Stop strings: generation ends when the text contains one; the text is cut before it."""
    ignore_eos: bool = False
    """Keep generating past an end-of-sequence token, up to max_new_tokens (vLLM's option of the
    same name; for load tests that need a known length)."""
    on_text: Callable[[str], None] | None = None
    """Streaming: called (from the engine's thread) with each new piece of final text (a
    `TextPiece`: with `logprobs`, it carries the entries of the tokens since the last piece)."""
    logprobs: int | None = None
    """Return each new token's log-probability and its `logprobs` most likely alternatives
    (0..MAX_TOP_LOGPROBS); None = none."""


MAX_TOP_LOGPROBS = 20
"""Most alternatives per token a request may ask for (OpenAI's bound)."""


@dataclass
class TokenLogprob:
    """One token and its log-probability under the model (its own log-softmax, before any
    temperature or nucleus cut), with the most likely alternatives at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    """(token id, log-probability) of the k most likely tokens there, best first."""


class TextPiece(str):
    """A piece of streamed text; `logprobs` holds the entries of the tokens generated since the
    previous piece (None when the request asked for none)."""

    logprobs: list[TokenLogprob] | None = None

    def __new__(cls, text: str, logprobs: list[TokenLogprob] | None = None):
        piece = super().__new__(cls, text)
        piece.logprobs = logprobs
        return piece


@dataclass
class GenerationResult:
    text: str
    """Decoded new text (special tokens skipped), cut before a stop string."""
    token_ids: list[int]
    """New token ids as generated (an end-of-sequence token is kept)."""
    finish_reason: str
    """'stop' (end-of-sequence token or stop string) or 'length' (max_new_tokens reached)."""
    prompt_tokens: int
    """Real input tokens (the soft prompt's virtual tokens not counted)."""
    completion_tokens: int
    """Generated tokens."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per generated token (as `token_ids`), when the request asked for them."""


@dataclass
class ClassifyRequest:
    """Rank classification with the task's verbalizer and template (from its meta), exactly as
    `softprompt eval` scores: each input is a string (a template with one field) or a mapping
    of the template's fields."""

    task: str | None | Sequence[str | None]
    texts: Sequence[str | Mapping[str, str]]
    zero_shot: bool = False
    """Score with the task's template and verbalizer but without its prompt: the plain model's
    answer (`softprompt eval --zero-shot`), e.g. to show next to the tuned one."""


@dataclass
class Classification:
    label: str
    """The label whose target is most likely."""
    probabilities: dict[str, float]
    """Softmax over the labels' summed target log-probabilities (sums to 1)."""
    log_likelihoods: dict[str, float]
    """Summed log-probability of each label's target tokens after the templated input."""


@dataclass
class ScoreRequest:
    """Log-likelihood of each target after its text (no template applied)."""

    task: str | None | Sequence[str | None]
    texts: Sequence[str]
    targets: Sequence[str]


@dataclass
class PromptLogprobsRequest:
    """The log-probability of each prompt token after the ones before it, under the task's prompt
    (OpenAI's `echo`): the first token has none. The virtual tokens are not part of the prompt."""

    prompt: str | list[int]
    """Text (tokenised with the tokenizer's special tokens) or token ids used as they are."""
    task: str | None = None
    top_logprobs: int | None = 0
    """The most likely alternatives to return at each position (0..MAX_TOP_LOGPROBS); None =
    the prompt's tokens only, nothing scored (an echo without logprobs)."""


@dataclass
class PromptLogprobs:
    token_ids: list[int]
    """The prompt's tokens."""
    logprobs: list[TokenLogprob | None]
    """One per token; None for the first (nothing before it is scored)."""


# ---------------------------------------------------------------- prepared work


@dataclass(eq=False)
class PreparedGeneration:
    """A generation request checked and tokenised: what the scheduler queues and the engine runs."""

    request: GenerationRequest
    task: LoadedTask | None
    input_ids: list[int]
    max_new_tokens: int
    sampling: inject.Sampling
    stops: tuple[str, ...]
    emitted: str = ""  # text already streamed (kept across a one-by-one retry)
    cancelled: bool = False  # set when the client went away: the row stops at its next token
    held: TaskSnapshot | None = field(default=None, repr=False)
    """The request's tasks, in use (never evicted) while this piece lives."""
    kind = "generate"

    @property
    def tokens(self) -> int:
        """The work asked for: input tokens plus new tokens at most (and their alternatives)."""
        top = self.request.logprobs or 0
        return len(self.input_ids) + self.max_new_tokens * (1 + top)


@dataclass(eq=False)
class PreparedScore:
    """A classify or score request checked and tokenised into (input, target) pairs to score."""

    request: ClassifyRequest | ScoreRequest
    pairs: list[ScoreRow]  # task = the row's LoadedTask (None: no prompt)
    labels: list[list[str]] | None  # per row, for classification
    cancelled: bool = False  # set when the client went away: dropped before the next batch
    held: TaskSnapshot | None = field(default=None, repr=False)
    """The request's tasks, in use (never evicted) while this piece lives."""
    kind = "score"

    @property
    def tokens(self) -> int:
        """The work asked for: input plus target tokens of every pair (each label's, to classify),
        and the alternatives returned for each target token."""
        return sum(len(p.input_ids) + len(p.target_ids) * (1 + (p.top_k or 0)) for p in self.pairs)

    def finish(self, scores: list[float]) -> list:
        if self.labels is None:
            return scores
        out, start = [], 0
        for labels in self.labels:
            row = scores[start : start + len(labels)]
            start += len(labels)
            out.append(_classification(labels, row))
        return out


@dataclass(eq=False)
class PreparedPromptLogprobs(PreparedScore):
    """A prompt scored token by token (`PromptLogprobsRequest`): one pair, none for a one-token
    prompt; its scores are `scorer.TokenScores`."""

    token_ids: list[int] = ()
    task: LoadedTask | None = None  # the prompt it is read under (None: the plain model)

    def finish(self, scores: list) -> PromptLogprobs:
        entries: list[TokenLogprob | None] = [None]
        for detail in scores:
            entries += [
                TokenLogprob(token, value, top)
                for token, value, top in zip(
                    self.pairs[0].target_ids, detail.logprobs, detail.top, strict=True
                )
            ]
        return PromptLogprobs(list(self.token_ids), entries)


def _classification(labels: list[str], scores: list[float]) -> Classification:
    probs = torch.tensor(scores, dtype=torch.float64).softmax(0).tolist()
    best = max(range(len(labels)), key=lambda i: scores[i])
    return Classification(
        labels[best], dict(zip(labels, probs, strict=True)), dict(zip(labels, scores, strict=True))
    )


# ---------------------------------------------------------------- checks and parsing of request inputs


SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds a torch generator accepts."""


def check_sampling(request: GenerationRequest) -> None:
    """Raise ConfigError unless the request's seed, temperature, top_p and stop are usable."""
    seed = request.seed
    if seed is not None and not (_is_number(seed, int) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ConfigError(f"seed must be an integer in {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    if not (_is_number(request.temperature) and 0 <= request.temperature < math.inf):
        raise ConfigError(f"temperature must be >= 0, not {request.temperature!r}")
    if not (_is_number(request.top_p) and 0 < request.top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1], not {request.top_p!r}")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop
    if not all(isinstance(s, str) for s in stops):
        raise ConfigError("stop must be a string or a list of strings")
    if request.logprobs is not None:
        check_top_logprobs(request.logprobs, "logprobs")


def check_top_logprobs(value, what: str) -> int:
    """`value` as a count of alternatives per token (0..MAX_TOP_LOGPROBS); ConfigError naming
    `what` otherwise."""
    if not (_is_number(value, int) and 0 <= value <= MAX_TOP_LOGPROBS):
        raise ConfigError(f"{what} must be an integer in 0..{MAX_TOP_LOGPROBS}, not {value!r}")
    return value


def _is_number(value, kind: type | tuple = (int, float)) -> bool:
    """A number of `kind`, never a bool (True is an int to Python, not a number to a client)."""
    return isinstance(value, kind) and not isinstance(value, bool)


def classify_inputs(values) -> list[str | Mapping]:
    """A classify request's inputs: one string or mapping, or a non-empty list of them."""
    if isinstance(values, str | Mapping):
        values = [values]
    values = list(values)
    if not values or not all(isinstance(v, str | Mapping) for v in values):
        raise ConfigError(
            "input must be a string, an object of template fields, or a non-empty list of them"
        )
    return values


def template_fields(spec: Task, value: str | Mapping, index: int) -> dict[str, str]:
    """The template fields of one input: a string fills a one-field template; an object names
    every field (an unknown key is refused rather than ignored: it is usually a typo)."""
    fields = spec.template.fields
    if isinstance(value, str):
        if len(fields) != 1:
            raise ConfigError(
                f"input {index}: the template of '{spec.name}' has fields {list(fields)}; "
                f"send an object with {'them' if fields else 'no fields'}, not a string"
            )
        return {fields[0]: value}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ConfigError(
            f"input {index}: unknown field {unknown[0]!r} (the template of '{spec.name}' "
            f"uses {', '.join(fields) or 'no fields'})"
        )
    if not all(isinstance(v, str) and is_valid_unicode(v) for v in value.values()):
        raise ConfigError(f"input {index}: every field value must be a string")
    return dict(value)


def text_list(values, what: str) -> list[str]:
    """`values` as a non-empty list of strings (one string is a list of one); `what` names it."""
    if isinstance(values, str):
        values = [values]
    values = list(values)
    if not values or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{what} must be a non-empty list of strings")
    return values


def task_per_row(task, rows: int) -> list[str | None]:
    """The task of each of `rows` rows: one name (or None) for all, or a list with one per row."""
    if task is None or isinstance(task, str):
        return [task] * rows
    task = list(task)
    if len(task) != rows:
        raise ConfigError(f"got {len(task)} task names for {rows} rows")
    return task


__all__ = [
    "MAX_TOP_LOGPROBS",
    "SEED_RANGE",
    "PromptLogprobs",
    "PromptLogprobsRequest",
    "TextPiece",
    "TokenLogprob",
    "Classification",
    "ClassifyRequest",
    "GenerationRequest",
    "GenerationResult",
    "ScoreRequest",
]
