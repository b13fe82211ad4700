"""Multi-task inference over one frozen model: mixed-task batches, a per-task KV prefix cache,
generation / classification / scoring, one decoding step at a time (the server's scheduler,
scheduler.py, joins and drops rows between steps).

    engine = Engine(load_model("default"), PromptBank("bank/"))
    engine.generate([GenerationRequest("Review: great film", task="sentiment")])
    engine.classify("sentiment", ["great film", "boring plot"])

An engine is an `InputProcessor` (processor.py: registry, templates, tokenisation, limits; no
model; the vLLM gateway uses it alone) plus the model runner written here. The tasks are the
processor's `registry` (registry.py): a request names one, and before it runs the registry checks
the task's bank version, so a prompt saved, changed or deleted by any replica is seen on the very
next request. Everything that touches the model goes through `prompting/inject.py`; all model
calls run under one lock, so the engine is safe to share. The requests, results and prepared work
are in requests.py (importable from here too); scoring is prompting/scorer.py's, with this
engine's forward (`_last_logits`: prompt inputs, prefix cache).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from softprompt.bank import PromptBank
from softprompt.errors import ConfigError, ContextLengthError, NoVerbalizerError
from softprompt.model.loading import LoadedModel, eos_token_ids, fingerprint
from softprompt.model.small_batch import use_small_batch_matmul
from softprompt.prompting import inject
from softprompt.prompting.deep import prefix_shape
from softprompt.prompting.inject import PrefixShape
from softprompt.prompting.kinds import KINDS
from softprompt.prompting.scorer import ScoreRow, left_pad, score_rows, token_scores
from softprompt.serving.processor import InputProcessor
from softprompt.serving.registry import (
    PROMPT_FILES,
    LoadedTask,
    TaskInfo,
    TaskPage,
    TaskSnapshot,
    TierConfig,
)
from softprompt.serving.requests import (
    SEED_RANGE,
    Classification,
    ClassifyRequest,
    GenerationRequest,
    GenerationResult,
    PreparedGeneration,
    PreparedScore,
    ScoreRequest,
    TextPiece,
    TokenLogprob,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the engine


class Engine(InputProcessor):
    """One frozen model serving many tasks, each a soft or deep prompt loaded from a bank (or
    added); rows of both kinds and of the base model share a batch. The requests are prepared
    by the `InputProcessor` it extends (processor.py, shared with the vLLM gateway); what this
    class adds is the model runner: batched forwards, decoding steps, the KV prefix cache."""

    def __init__(
        self,
        loaded: LoadedModel | tuple,
        bank: PromptBank | str | None = None,
        *,
        use_prefix_cache: bool = True,
        max_new_tokens_cap: int = 512,
        score_batch_size: int = 64,
        kinds: tuple[str, ...] = tuple(KINDS),
        small_batch_matmul: bool = True,
        tiers: TierConfig | None = None,
    ):
        if isinstance(loaded, LoadedModel):
            self.model, tokenizer = loaded.model, loaded.tokenizer
            base_model_id, model_fingerprint = loaded.name, loaded.fingerprint
        else:
            self.model, tokenizer = loaded
            base_model_id = self.model.config.name_or_path or "base"
            model_fingerprint = fingerprint(self.model)
        self.use_prefix_cache = use_prefix_cache
        """Start requests from each task's cached KV prefix (off: inject the prompt each time)."""
        self.score_batch_size = score_batch_size
        self.prefix_computations = 0
        """How many KV prefixes were computed (a cache that works keeps this low)."""
        self.device = self.model.get_input_embeddings().weight.device
        use_small_batch_matmul(
            self.model, small_batch_matmul
        )  # on CPU: decode steps shared at no extra cost
        self.eos_token_ids = eos_token_ids(tokenizer, self.model)
        self._model_lock = threading.RLock()  # before the registry: pinned deep tasks probe it
        super().__init__(
            tokenizer,
            self.model.get_input_embeddings(),
            self.model.config,
            bank,
            base_model_id=base_model_id,
            fingerprint=model_fingerprint,
            device=self.device,
            kinds=kinds,
            tiers=tiers,
            max_new_tokens_cap=max_new_tokens_cap,
        )

    @functools.cached_property
    def prefix_shape(self) -> PrefixShape:
        """The KV geometry of this model, which a deep prompt's rows must have (probed once from
        its layers, which also handles what the config cannot say)."""
        with self._model_lock:
            return prefix_shape(self.model)

    # ------------------------------------------------------------ public operations

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for a mixed-task batch (each row its own task, limits and sampling)."""
        return self.run(self.prepare_all(requests))

    def classify(
        self, task: str | None | Sequence[str | None], texts: Sequence[str]
    ) -> list[Classification]:
        """Rank classification with the task's verbalizer: one result per text."""
        return self.run([self.prepare(ClassifyRequest(task, texts))])[0]

    def score(
        self, task: str | None | Sequence[str | None], texts: Sequence[str], targets: Sequence[str]
    ) -> list[float]:
        """Summed log-probability of each target's tokens after its text."""
        return self.run([self.prepare(ScoreRequest(task, texts, targets))])[0]

    def score_tokens(
        self,
        task: str | None,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        top_k: int | None = None,
    ) -> list:
        """Log-likelihood of each (input ids, target ids) pair under `task`'s prompt, as
        `score_pairs` gives it: the summed float, or with `top_k` the target tokens one by one
        (`scorer.TokenScores`, with the k most likely tokens at each)."""
        snapshot = TaskSnapshot()  # holds the task until the scores are back
        rows = self.score_token_rows(task, pairs, snapshot, top_k)
        return self.score_pairs(rows)

    # ------------------------------------------------------------ running prepared work

    def run(self, prepared: Sequence) -> list:
        """Results for prepared requests (any mix of kinds and tasks), in order."""
        results: list = [None] * len(prepared)
        for kind, runner in (("generate", self._run_generation), ("score", self._run_scores)):
            index = [i for i, p in enumerate(prepared) if p.kind == kind]
            if index:
                for i, result in zip(index, runner([prepared[i] for i in index]), strict=True):
                    results[i] = result
        return results

    def _run_generation(self, rows: list[PreparedGeneration]) -> list[GenerationResult]:
        """Generate for `rows` together until the last one ends (how `run` and `generate` batch)."""
        batch, results = self.start_generation(rows), {}
        while batch.rows:
            for row, result in self.step(batch):
                if isinstance(result, Exception):
                    raise result  # one call: a failing row fails it
                results[id(row)] = result
        return [results[id(row)] for row in rows]

    # ------------------------------------------------------------ generation, one step at a time

    def start_generation(self, rows: list[PreparedGeneration]) -> GenerationBatch:
        """Prefill `rows` (any tasks and kinds): a batch ready to `step`, or to `join` another."""
        ids, mask = self._left_pad([r.input_ids for r in rows])  # (B, L)
        max_new = max(r.max_new_tokens for r in rows)
        with self._model_lock:
            inputs = self._prompt_inputs([r.task for r in rows], ids.shape[1] + max_new)
            state = inject.prefill(
                self.model,
                ids,
                mask,
                max_new_tokens=max_new,
                prompts=inputs.prompts,
                prompt_lengths=inputs.prompt_lengths,
                prefixes=inputs.prefixes,
            )
        states = [_RowState(r, self._decode, self.eos_token_ids) for r in rows]
        return GenerationBatch(states, state, inject.TokenPicker([r.sampling for r in rows]))

    @functools.cached_property
    def can_join(self) -> bool:
        """Whether rows can join a running batch (continuous batching); not for a sliding-window
        model, whose cache cannot be merged exactly."""
        return inject.can_merge(self.model)

    def join(self, running: GenerationBatch, new: GenerationBatch) -> None:
        """Add the prefilled rows of `new` to `running`, which keeps generating with them."""
        if not self.can_join:
            raise ConfigError(
                "this model's rows cannot join a running batch (sliding-window attention)"
            )
        with self._model_lock:
            self._catch_up(running)  # rows failing here go to `running.failed`
            running.state = (
                inject.merge_states(running.state, new.state) if running.rows else new.state
            )
        running.rows += new.rows
        running.picker = running.picker + new.picker

    def step(
        self, batch: GenerationBatch
    ) -> list[tuple[PreparedGeneration, GenerationResult | Exception]]:
        """One new token for every row of `batch`; the rows that ended leave it at once (their
        last text streamed) and are returned with their results. Cancelled rows end here.

        A row that fails alone (its forward, its sampling, its text) leaves with its error in place
        of a result, and the others go on exactly as alone (`_isolate`). This raises only when the
        batch fails as a whole: no row fails alone (e.g. out of memory), or a sliding-window
        model's forward failed (its cache cannot be restored, `inject.decode`).
        """
        with self._model_lock:
            self._catch_up(batch)
            next_ids = self._pick(batch) if batch.rows else None  # (B,)
            if next_ids is not None:
                _record_logprobs(batch, next_ids)
        ended, batch.failed = batch.failed, []
        if next_ids is None:
            return [(row.row, error) for row, error in ended]
        batch.pending, keep = next_ids, []
        for i, (row, token) in enumerate(zip(batch.rows, next_ids.tolist(), strict=True)):
            outcome = row.take(token)
            if outcome is None:
                keep.append(i)
            else:
                ended.append((row, outcome))
        if len(keep) < len(batch.rows):
            with self._model_lock:
                self._keep_rows(batch, keep)
        return [(row.row, outcome) for row, outcome in ended]

    def _catch_up(self, batch: GenerationBatch) -> None:
        """Feed the tokens picked at the last step (under the model lock): logits for every row.
        Rows whose forward fails alone leave the batch (`_isolate`)."""
        if batch.pending is None:
            return
        try:
            self._feed(batch)
            return
        except Exception as exc:
            if not self.can_join:  # a sliding-window cache: the failed forward changed it
                raise
            failure = exc
        self._isolate(batch, failure, self._feed)  # out of the handler: no chained tracebacks
        self._catch_up(batch)  # the rows left, together

    def _feed(self, batch: GenerationBatch) -> None:
        batch.state = inject.decode(self.model, batch.state, batch.pending)
        batch.pending = None

    def _pick(self, batch: GenerationBatch) -> torch.Tensor | None:
        """The rows' next tokens (B,) (under the model lock); rows whose sampling fails alone
        leave the batch first (`_isolate`). None when no row is left."""
        generators = list(batch.picker.generators)
        saved = [g.get_state() if g is not None else None for g in generators]
        try:
            return batch.picker(batch.state.logits)
        except Exception as exc:
            failure = exc
        _set_states(generators, saved)  # the rows sampled before the failure drew already
        self._isolate(batch, failure, lambda alone: alone.picker(alone.state.logits))
        _set_states(generators, saved)  # and so did each row tried alone
        return self._pick(batch) if batch.rows else None

    def _isolate(self, batch: GenerationBatch, exc: Exception, work) -> None:
        """`work(batch)` raised `exc`: run it on each row alone (a copy of the row) to find the
        rows that fail; they leave for `batch.failed`, each with its own error, and the others
        stay as they were. Raises `exc` when no row fails alone: the batch's own failure."""
        errors = [self._error_alone(batch, i, work) for i in range(len(batch.rows))]
        if all(error is None for error in errors):
            raise exc
        batch.failed += [(r, e) for r, e in zip(batch.rows, errors, strict=True) if e is not None]
        self._keep_rows(batch, [i for i, error in enumerate(errors) if error is None])

    @staticmethod
    def _error_alone(batch: GenerationBatch, i: int, work) -> Exception | None:
        """What `work` raises on row `i` of `batch` alone (None if nothing); `batch` is untouched."""
        pending = None if batch.pending is None else batch.pending[i : i + 1]
        alone = GenerationBatch(
            [batch.rows[i]], inject.copy_rows(batch.state, [i]), batch.picker.select([i]), pending
        )
        try:
            work(alone)
        except Exception as exc:
            return exc
        return None

    @staticmethod
    def _keep_rows(batch: GenerationBatch, keep: list[int]) -> None:
        """Only the rows `keep` (indices) stay in `batch` (callers hold the model lock)."""
        batch.state = inject.select_rows(batch.state, keep) if keep else None
        batch.rows, batch.picker = [batch.rows[i] for i in keep], batch.picker.select(keep)
        if batch.pending is not None:
            batch.pending = batch.pending[keep] if keep else None

    def _run_scores(self, items: list[PreparedScore]) -> list:
        scores = self.score_pairs([pair for item in items for pair in item.pairs])
        out, start = [], 0
        for item in items:
            out.append(item.finish(scores[start : start + len(item.pairs)]))
            start += len(item.pairs)
        return out

    def score_pairs(self, pairs: Sequence[ScoreRow]) -> list:
        """Summed log-probability of each prepared pair's target (scorer.py, as `softprompt eval`
        scores), `score_batch_size` model rows per forward; a pair asking for alternatives
        (`top_k`, an echoed prompt) gets its tokens one by one (`scorer.TokenScores`)."""
        if not pairs:
            return []
        pad = self.tokenizer.pad_token_id or 0
        run = {"pad_id": pad, "device": self.device, "batch_size": self.score_batch_size}
        if all(p.top_k is None for p in pairs):
            return score_rows(pairs, self._last_logits, **run).tolist()
        detail = token_scores(pairs, self._last_logits, **run)
        return [d.total if p.top_k is None else d for p, d in zip(pairs, detail, strict=True)]

    def _last_logits(self, tasks: list[LoadedTask | None], ids, mask, keep: int) -> torch.Tensor:
        """Logits (B, keep, V) of the last `keep` columns, each row under its task's prompt (the
        one forward of prompted rows, `inject.prompt_logits`)."""
        with self._model_lock:
            inputs = self._prompt_inputs(tasks, ids.shape[1])
            return inject.prompt_logits(self.model, ids, mask, inputs, keep=keep)

    def _prompt_inputs(self, tasks: list[LoadedTask | None], width: int) -> inject.PromptInputs:
        """How the rows' prompts enter over `width` columns after them: KV prefixes for a batch
        with a prompt that has no embeddings (a deep prompt: its KV is all there is) or when the
        prefix cache is on and exact; else embeddings. Past a sliding window `inject.exact_inputs`
        (in the forward) refuses a deep prompt, the one place that says so."""
        if not any(tasks):
            return inject.PromptInputs()
        longest = max(t.length for t in tasks if t)
        kv_only = any(t is not None and not self.kind_of(t).enters_as_embeddings for t in tasks)
        if kv_only or (
            self.use_prefix_cache and inject.prefix_is_exact(self.model, longest + width)
        ):
            self._compute_first_prefixes(tasks)
            return inject.PromptInputs(prefixes=[self._prefix(t) if t else None for t in tasks])
        prompts, lengths = inject.pad_prompts(
            [t.prompt if t else None for t in tasks], self.token_dim, self.device
        )
        return inject.PromptInputs(prompts, lengths)

    def _prefix(self, task: LoadedTask) -> inject.PromptPrefix:
        """The task's KV prefix, computed once per loaded version while it stays resident (the
        registry's resident tier; callers hold the model lock)."""
        return self.registry.resident_prefix(task, self._compute_prefix)

    def _compute_first_prefixes(self, tasks: list[LoadedTask | None]) -> None:
        """The KV prefixes of the batch's embedding prompts (soft) that have none yet, in one
        forward (with many tasks most requests name one not used for a while; one forward each
        made a batch of them cost a forward per task before its own). Callers hold the model
        lock."""
        first = {
            id(t): t
            for t in tasks
            if t is not None and self.kind_of(t).enters_as_embeddings and t.prefix is None
        }
        if len(first) < 2:
            return  # one is computed on its own by `_prefix`
        cold = list(first.values())
        for task, prefix in zip(
            cold, inject.prompt_prefixes(self.model, [t.prompt for t in cold]), strict=True
        ):
            self.prefix_computations += 1
            self.registry.resident_prefix(task, lambda _task, computed=prefix: computed)

    def _compute_prefix(self, task: LoadedTask) -> inject.PromptPrefix:
        kind = self.kind_of(task)
        if kind.enters_as_embeddings:  # a forward over the rows (a deep prompt's are the KV)
            self.prefix_computations += 1
        dtype = self.model.get_input_embeddings().weight.dtype
        return kind.served_prefix(self.model, task.prompt, self.prefix_shape, dtype)

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(rows, self.tokenizer.pad_token_id or 0, self.device)


# ---------------------------------------------------------------- per-row generation state


@dataclass(eq=False)
class GenerationBatch:
    """Rows generating together, between two steps: each row's state, the model's decode state
    (cache, mask, positions, logits) and the rows' token pickers, all in the same row order."""

    rows: list[_RowState]
    state: inject.DecodeState | None
    picker: inject.TokenPicker
    pending: torch.Tensor | None = None  # (B,) tokens picked but not yet fed to the model
    failed: list[tuple[_RowState, Exception]] = field(default_factory=list)
    """Rows that failed alone and left, with their errors: the next `Engine.step` returns them."""


class _RowState:
    """Stop strings, per-row token limit, tokens and streamed text of one generating row."""

    def __init__(self, row: PreparedGeneration, decode, eos_ids: tuple[int, ...]):
        self.row, self.decode, self.eos_ids = row, decode, eos_ids
        self.tokens: list[int] = []
        self.holdback = max((len(s) for s in row.stops), default=1) - 1
        self.watch = bool(row.stops or row.request.on_text)
        self.top_logprobs = row.request.logprobs  # None: no log-probabilities wanted
        self.logprobs: list[TokenLogprob] = []
        self.streamed = 0  # log-probability entries already sent with a streamed piece

    def take(self, token: int) -> GenerationResult | Exception | None:
        """Add the row's new token: its result when that ends it, None while it goes on, or the
        error its own work raised (decoding, stop strings), which ends this row alone."""
        try:
            self.tokens.append(token)
            if self.ends_at(token) or self.step(self.tokens):
                return self.finish(self.tokens)
        except Exception as exc:
            return exc
        return None

    def ends_at(self, token: int) -> bool:
        """An end-of-sequence token ends the row, unless the request ignores them."""
        return token in self.eos_ids and not self.row.request.ignore_eos

    def step(self, tokens: list[int]) -> bool:
        """Called after each new token of this row; True ends the row."""
        if self.row.cancelled:
            return True
        if self.watch:
            text = self.decode(tokens)
            cut = _find_stop(text, self.row.stops)
            if cut is not None:
                return True  # finish() cuts and flushes
            self._emit(text[: max(0, len(text) - self.holdback)].rstrip("\ufffd"))
        return len(tokens) >= self.row.max_new_tokens

    def finish(self, tokens: list[int]) -> GenerationResult:
        text = self.decode(tokens)
        cut = _find_stop(text, self.row.stops)
        if cut is not None:
            text, reason = text[:cut], "stop"
        else:
            reason = "stop" if tokens and self.ends_at(tokens[-1]) else "length"
        self._emit(text)
        logprobs = None if self.top_logprobs is None else list(self.logprobs)
        return GenerationResult(
            text, list(tokens), reason, len(self.row.input_ids), len(tokens), logprobs
        )

    def _emit(self, text: str) -> None:
        callback, sent = self.row.request.on_text, self.row.emitted
        if callback is None or len(text) <= len(sent) or not text.startswith(sent):
            return
        self.row.emitted = text
        entries = None
        if self.top_logprobs is not None:
            entries, self.streamed = self.logprobs[self.streamed :], len(self.logprobs)
        try:
            callback(TextPiece(text[len(sent) :], entries))
        except Exception:  # a broken listener must not break the batch
            log.exception("streaming callback failed")
            self.row.cancelled = True


def _record_logprobs(batch: GenerationBatch, next_ids: torch.Tensor) -> None:
    """Each picked token's log-probability (the model's log-softmax of the step's logits) and the
    most likely alternatives, for the rows that asked for them."""
    wanted = [i for i, row in enumerate(batch.rows) if row.top_logprobs is not None]
    if not wanted:
        return
    index = torch.tensor(wanted, device=next_ids.device)
    logprobs = batch.state.logits[index].float().log_softmax(-1)  # (W, V)
    picked = logprobs.gather(1, next_ids[index][:, None])[:, 0].tolist()  # (W,)
    k = max(batch.rows[i].top_logprobs for i in wanted)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # (W, k)
    values, ids = values.tolist(), ids.tolist()
    for w, i in enumerate(wanted):
        row = batch.rows[i]
        top = list(zip(ids[w][: row.top_logprobs], values[w][: row.top_logprobs], strict=True))
        row.logprobs.append(TokenLogprob(int(next_ids[i]), picked[w], top))


def _set_states(generators: list, states: list) -> None:
    """Rewind the rows' own random generators (None: a row without one) to `states`."""
    for generator, state in zip(generators, states, strict=True):
        if generator is not None:
            generator.set_state(state)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


__all__ = [
    "PROMPT_FILES",
    "SEED_RANGE",
    "Classification",
    "ClassifyRequest",
    "ContextLengthError",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "NoVerbalizerError",
    "ScoreRequest",
    "TaskInfo",
    "TaskPage",
]
