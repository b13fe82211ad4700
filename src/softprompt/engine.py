"""Multi-task inference over one frozen model: mixed-task batches, a per-task KV prefix cache,
generation / classification / scoring, and a micro-batcher for the server.

    engine = Engine(load_model("default"), PromptBank("bank/"))
    engine.generate([GenerationRequest("Review: great film", task="sentiment")])
    engine.classify("sentiment", ["great film", "boring plot"])

Tasks live in memory as `_Task` entries (prompt [n, d] fp32 on the model's device, its bank
version, its metadata and, once used, its KV prefix). A request names a task; before it runs the
engine asks the bank for that task's version (one `readlink`), so a prompt saved, changed or
deleted by any replica is seen on the very next request. Everything that touches the model goes
through `inject.py`; all model calls run under one lock, so the engine is safe to share.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import inject
from .bank import (
    CONFIG_FILE,
    META_FILE,
    WEIGHTS_FILE,
    PromptBank,
    SavedPrompt,
    check_compatible,
    prompt_from_files,
    validate_task_name,
)
from .data import Task, encode_example, is_valid_unicode, task_from_meta, template_from_meta
from .deep_prompt import PrefixShape, prefix_shape, rows_to_prefix
from .errors import (
    ConfigError,
    ContextLengthError,
    DataError,
    IncompatiblePromptError,
    InvalidTaskNameError,
    NoVerbalizerError,
    PromptFileError,
    SoftPromptError,
    UnknownTaskError,
)
from .models import LoadedModel, eos_token_ids, fingerprint

log = logging.getLogger(__name__)

PROMPT_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE)


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
    """0 = greedy; above 0 = sampling."""
    top_p: float = 1.0
    """Nucleus sampling threshold (with temperature > 0)."""
    seed: int | None = None
    """Seed of this row's own generator: the same seed gives the same text in any batch."""
    stop: str | Sequence[str] = ()
    """Stop strings: generation ends when the text contains one; the text is cut before it."""
    on_text: Callable[[str], None] | None = None
    """Streaming: called (from the engine's thread) with each new piece of final text."""


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
class TaskInfo:
    """What the engine holds for one task in memory."""

    name: str
    num_virtual_tokens: int
    version: str | None
    """Bank version it was loaded from; None for a task added in memory only."""
    loaded_at: float
    has_verbalizer: bool
    kind: str = "soft"
    """'soft' (vectors before the input) or 'deep' (keys and values in every layer)."""
    meta: dict = field(default_factory=dict)
    """Its softprompt.json (template, verbalizer, metrics, ...), as loaded."""


# ---------------------------------------------------------------- internals: tasks, prepared work


@dataclass(eq=False)
class _Task:
    name: str
    prompt: torch.Tensor  # (n, d) fp32 on the model's device
    version: str | None
    meta: dict
    loaded_at: float = field(default_factory=time.time)
    prefix: inject.PromptPrefix | None = None  # computed on first use, under the model lock
    classifier: tuple | None = None  # (data.Task, target ids), parsed on first use
    kind: str = "soft"  # 'deep': `prompt` holds KV rows [n, layers * 2 * kv_heads * head_dim]

    @property
    def length(self) -> int:
        return self.prompt.shape[0]

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, self.length, self.version, self.loaded_at,
                        isinstance(self.meta.get("verbalizer"), dict), self.kind, dict(self.meta))


@dataclass(eq=False)
class _PreparedGeneration:
    request: GenerationRequest
    task: _Task | None
    input_ids: list[int]
    max_new_tokens: int
    sampling: inject.Sampling
    stops: tuple[str, ...]
    emitted: str = ""  # text already streamed (kept across a one-by-one retry)
    cancelled: bool = False  # set when the client went away: the row stops at its next token
    kind = "generate"

    @property
    def tokens(self) -> int:
        """The work asked for: input tokens plus new tokens at most."""
        return len(self.input_ids) + self.max_new_tokens


@dataclass(eq=False)
class _Pair:
    task: _Task | None
    input_ids: list[int]
    target_ids: list[int]


@dataclass(eq=False)
class _PreparedScore:
    request: ClassifyRequest | ScoreRequest
    pairs: list[_Pair]
    labels: list[list[str]] | None  # per row, for classification
    cancelled: bool = False  # set when the client went away: dropped before the next batch
    kind = "score"

    @property
    def tokens(self) -> int:
        """The work asked for: input plus target tokens of every pair (each label's, to classify)."""
        return sum(len(p.input_ids) + len(p.target_ids) for p in self.pairs)

    def finish(self, scores: list[float]) -> list:
        if self.labels is None:
            return scores
        out, start = [], 0
        for labels in self.labels:
            row = scores[start:start + len(labels)]
            start += len(labels)
            out.append(_classification(labels, row))
        return out


def _classification(labels: list[str], scores: list[float]) -> Classification:
    probs = torch.tensor(scores, dtype=torch.float64).softmax(0).tolist()
    best = max(range(len(labels)), key=lambda i: scores[i])
    return Classification(labels[best], dict(zip(labels, probs, strict=True)),
                          dict(zip(labels, scores, strict=True)))


# ---------------------------------------------------------------- the engine


class Engine:
    """One frozen model serving many tasks, each a soft or deep prompt loaded from a bank (or
    added); rows of both kinds and of the base model share a batch."""

    def __init__(self, loaded: LoadedModel | tuple, bank: PromptBank | str | None = None, *,
                 use_prefix_cache: bool = True, max_new_tokens_cap: int = 512,
                 score_batch_size: int = 64, kinds: tuple[str, ...] = ("soft", "deep")):
        if isinstance(loaded, LoadedModel):
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
            self.base_model_id, self.fingerprint = loaded.name, loaded.fingerprint
        else:
            self.model, self.tokenizer = loaded
            self.base_model_id = self.model.config.name_or_path or "base"
            self.fingerprint = fingerprint(self.model)
        self.bank = PromptBank(bank) if isinstance(bank, str | Path) else bank
        self.kinds = kinds
        """The prompt kinds served (a deep prompt enters as each layer's KV prefix; the vLLM
        gateway's engine has no layers and serves soft prompts only)."""
        self.use_prefix_cache = use_prefix_cache
        """Start requests from each task's cached KV prefix (off: inject the prompt each time)."""
        self.max_new_tokens_cap = max_new_tokens_cap
        self.score_batch_size = score_batch_size
        self.prefix_computations = 0
        """How many KV prefixes were computed (a cache that works keeps this low)."""
        self.device = self.model.get_input_embeddings().weight.device
        self.token_dim = self.model.get_input_embeddings().weight.shape[1]
        self.context_length = _context_length(self.model, self.tokenizer)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model)
        self.base_names = {self.base_model_id, self.model.config.name_or_path or self.base_model_id}
        self.reserved_names = {"default", *self.base_names}
        """Names a task may not have: the base model's, and `default` (the CLI's default model)."""
        self._tasks: dict[str, _Task] = {}
        self._bad: dict[str, tuple[str, SoftPromptError]] = {}  # name -> (version, error)
        self._tasks_lock = threading.RLock()
        self._model_lock = threading.RLock()
        self._tokenizer_lock = threading.Lock()

    # ------------------------------------------------------------ tasks

    def tasks(self) -> list[str]:
        """Names of the tasks in memory."""
        with self._tasks_lock:
            return sorted(self._tasks)

    def task_infos(self) -> list[TaskInfo]:
        """What is in memory, one consistent snapshot (sorted by name)."""
        with self._tasks_lock:
            return [self._tasks[name].info() for name in sorted(self._tasks)]

    def task_info(self, name: str) -> TaskInfo:
        with self._tasks_lock:
            if name not in self._tasks:
                raise UnknownTaskError(f"task '{name}' is not active")
            return self._tasks[name].info()

    def prompt_values(self, name: str) -> torch.Tensor:
        """A CPU float32 copy of the task's prompt rows at the bank's current version (soft: [n, d];
        deep: [n, layers * 2 * kv_heads * head_dim]), e.g. for `inspect`."""
        return self._activate(name).prompt.detach().float().cpu().clone()

    def add_task(self, name: str, prompt: SavedPrompt | torch.Tensor, meta: dict | None = None) -> TaskInfo:
        """Put a task in memory directly (not from the bank); it stays until deactivated."""
        self._check_name(name)
        kind = "soft"  # a bare tensor is a soft prompt [n, d]
        if isinstance(prompt, SavedPrompt):
            self._check(prompt)
            kind, prompt, meta = prompt.kind, prompt.embeddings, {**prompt.meta, **(meta or {})}
        entry = self._entry(name, _check_tensor(name, prompt, self._row_width(kind)), None, meta or {}, kind)
        return self._store(entry).info()

    def activate(self, name: str) -> TaskInfo:
        """Have `name` in memory at the bank's current version (microseconds if it already is)."""
        return self._activate(name).info()

    def deactivate(self, name: str) -> None:
        """Drop a task (and its KV prefix) from memory; the bank is untouched."""
        with self._tasks_lock:
            self._tasks.pop(name, None)
            self._bad.pop(name, None)

    def refresh(self) -> dict[str, str]:
        """Follow the bank: load new tasks, reload changed ones, drop deleted ones.

        Cheap when nothing changed (a folder scan and one `readlink` per task). Bad entries are
        logged and skipped; returns {name: error message} for them.
        """
        if self.bank is None:
            return {}
        names = set(self.bank.names())
        with self._tasks_lock:
            gone = [n for n, t in self._tasks.items() if t.version is not None and n not in names]
        for name in gone:
            log.info("task '%s' left the bank; dropping it", name)
            self.deactivate(name)
        errors = {}
        for name in sorted(names):
            try:
                self._activate(name)  # refuses a bank task named like the base model
            except UnknownTaskError:
                self.deactivate(name)  # deleted while we looked
            except SoftPromptError as exc:
                errors[name] = str(exc)
        return errors

    def _check_name(self, name: str) -> None:
        validate_task_name(name)
        if name in self.reserved_names:
            raise InvalidTaskNameError(f"task name '{name}' is reserved: it names a base model")

    def _activate(self, name: str) -> _Task:
        self._check_name(name)
        with self._tasks_lock:
            entry = self._tasks.get(name)
        if entry is not None and (entry.version is None or self.bank is None):
            return entry  # added in memory: pinned
        if self.bank is None:
            raise _unknown(name)
        try:
            version = self.bank.version(name)
        except UnknownTaskError:
            self.deactivate(name)
            raise _unknown(name) from None
        if entry is not None and entry.version == version:
            return entry
        return self._load(name, version)

    def _load(self, name: str, version: str) -> _Task:
        """Read `name` from the bank (version read first: a racing save only causes a reload)."""
        bad = self._bad.get(name)
        if bad is not None and bad[0] == version:
            raise bad[1]  # same broken version as before: do not read it again
        try:
            saved = self.bank.load(name)
            self._check(saved)
            entry = self._entry(name, saved.embeddings, version, saved.meta, saved.kind)
        except UnknownTaskError:
            raise
        except SoftPromptError as exc:
            log.warning("task '%s' in bank %s is unusable: %s", name, self.bank.root, exc)
            with self._tasks_lock:
                self._bad[name] = (version, exc)
                self._tasks.pop(name, None)
            raise
        log.info("loaded task '%s' (version %s, %d virtual tokens)", name, version, entry.length)
        return self._store(entry)

    def _check(self, saved: SavedPrompt) -> None:
        check_compatible(saved, token_dim=self._row_width(saved.kind), fingerprint=self.fingerprint,
                         kinds=self.kinds)
        _check_tensor(saved.name, saved.embeddings, self._row_width(saved.kind))
        if saved.embeddings.shape[0] >= self.context_length:
            raise IncompatiblePromptError(f"prompt '{saved.name}' has {saved.embeddings.shape[0]} "
                                          f"virtual tokens; the model's context is {self.context_length}")

    def _entry(self, name: str, values: torch.Tensor, version: str | None, meta: dict, kind: str) -> _Task:
        return _Task(name, values.detach().float().to(self.device).clone(), version, dict(meta), kind=kind)

    @functools.cached_property
    def prefix_shape(self) -> PrefixShape:
        """The KV geometry of this model, which a deep prompt's rows must have (probed once)."""
        with self._model_lock:
            return prefix_shape(self.model)

    def _row_width(self, kind: str) -> int:
        """Width of one prompt row of `kind` (a kind not served is refused before width matters)."""
        return self.prefix_shape.row_width if kind == "deep" and kind in self.kinds else self.token_dim

    def _store(self, entry: _Task) -> _Task:
        with self._tasks_lock:
            self._tasks[entry.name] = entry
            self._bad.pop(entry.name, None)
        return entry

    def _resolve(self, name: str | None, snapshot: dict[str, _Task]) -> _Task | None:
        """The task entry for a request (None = the base model, no prompt).

        Each name is resolved once per `snapshot` and then taken from it, so all the rows of one
        request use the same prompt version even when a new one is saved meanwhile.
        """
        if name is None or name == "" or name in self.base_names:
            return None
        if name not in snapshot:
            snapshot[name] = self._activate(name)
        return snapshot[name]

    # ------------------------------------------------------------ admin (upload / delete)

    def install(self, name: str, files: Mapping[str, bytes]) -> TaskInfo:
        """Validate an uploaded prompt folder like a bank load, save it atomically, activate it.

        `files` maps file names (adapter_config.json, adapter_model.safetensors, optional
        softprompt.json; others are ignored) to their bytes.
        """
        self._check_name(name)
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in files]
        if missing:
            raise PromptFileError(f"upload of task '{name}' lacks {', '.join(missing)}")
        saved = prompt_from_files({f: files[f] for f in PROMPT_FILES if f in files}, name)
        self._check(saved)
        _check_meta(saved)
        if self.bank is None:
            return self.add_task(name, saved)
        try:
            self.bank.save(saved)
        except PromptFileError as exc:
            if not isinstance(exc.__cause__, OSError):
                raise
            log.error("saving uploaded task '%s' failed: %s", name, exc)  # its paths stay here
            raise PromptFileError(f"could not save task '{name}' on the server") from None
        return self.activate(name)

    def remove(self, name: str) -> None:
        """Delete a task from the bank (UnknownTaskError if absent) and from memory."""
        validate_task_name(name)
        if self.bank is None:
            with self._tasks_lock:
                if name not in self._tasks:
                    raise _unknown(name)
        else:
            try:
                self.bank.delete(name)
            except UnknownTaskError:
                raise _unknown(name) from None
        self.deactivate(name)

    # ------------------------------------------------------------ public operations

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for a mixed-task batch (each row its own task, limits and sampling)."""
        return self.run(self.prepare_all(requests))

    def classify(self, task: str | None | Sequence[str | None], texts: Sequence[str]) -> list[Classification]:
        """Rank classification with the task's verbalizer: one result per text."""
        return self.run([self.prepare(ClassifyRequest(task, texts))])[0]

    def score(self, task: str | None | Sequence[str | None], texts: Sequence[str],
              targets: Sequence[str]) -> list[float]:
        """Summed log-probability of each target's tokens after its text."""
        return self.run([self.prepare(ScoreRequest(task, texts, targets))])[0]

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of chat messages through the tokenizer's chat template (or a plain join)."""
        if getattr(self.tokenizer, "chat_template", None):
            with self._tokenizer_lock:
                text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                          add_generation_prompt=True)
            return self._encode(text, special=False)  # the template writes its own BOS
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return self._encode(text)

    # ------------------------------------------------------------ validation

    def prepare(self, request, snapshot: dict[str, _Task] | None = None):
        """Validate and tokenise one request (raises here, before it can join a batch).

        Each task is resolved once per request (once per `snapshot`, when one is shared), so all
        the rows use one prompt version even if a new one is saved meanwhile.
        """
        snapshot = {} if snapshot is None else snapshot
        if isinstance(request, GenerationRequest):
            return self._prepare_generation(request, snapshot)
        if isinstance(request, ClassifyRequest):
            return self._prepare_classify(request, snapshot)
        if isinstance(request, ScoreRequest):
            return self._prepare_score(request, snapshot)
        raise TypeError(f"cannot run a {type(request).__name__}")

    def prepare_all(self, requests: Sequence) -> list:
        """Prepare the pieces of one request (e.g. a completion's prompts) with one snapshot."""
        snapshot: dict[str, _Task] = {}
        return [self.prepare(request, snapshot) for request in requests]

    def _prepare_generation(self, request: GenerationRequest, snapshot: dict) -> _PreparedGeneration:
        _check_sampling(request)
        task = self._resolve(request.task, snapshot)
        ids = self._input_ids(request.prompt)
        used = len(ids) + (task.length if task else 0)
        wanted = request.max_new_tokens
        if wanted is None:
            wanted = max(1, min(self.max_new_tokens_cap, self.context_length - used))
        if not isinstance(wanted, int) or wanted < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, not {wanted!r}")
        self._check_context(len(ids), task, wanted)
        sampling = inject.Sampling(float(request.temperature), float(request.top_p), request.seed)
        stops = tuple(s for s in ([request.stop] if isinstance(request.stop, str) else request.stop) if s)
        return _PreparedGeneration(request, task, ids, wanted, sampling, stops)

    def _prepare_classify(self, request: ClassifyRequest, snapshot: dict) -> _PreparedScore:
        inputs = _classify_inputs(request.texts)
        pairs, labels = [], []
        for i, (name, value) in enumerate(zip(_per_row(request.task, len(inputs)), inputs, strict=True)):
            task = self._resolve(name, snapshot)
            spec, targets = self._classifier(task, name)
            ids = self._classify_input_ids(spec, _fields(spec, value, i), i)
            prompt = None if request.zero_shot else task
            self._check_context(len(ids), prompt, max(len(t) for t in targets))
            pairs += [_Pair(prompt, ids, t) for t in targets]
            labels.append(spec.verbalizer.labels)
        return _PreparedScore(request, pairs, labels)

    def _classify_input_ids(self, spec: Task, record: dict[str, str], index: int) -> list[int]:
        """The input tokens `softprompt eval` scores for this record (data.encode_example)."""
        try:
            with self._tokenizer_lock:
                return encode_example(self.tokenizer, spec, record, 0, require_target=False).input_ids
        except DataError as exc:  # a missing or empty field
            what = "empty" if exc.field in record else "missing"
            raise ConfigError(f"input {index}: {what} field '{exc.field}' (the template of "
                              f"'{spec.name}' uses {', '.join(spec.template.fields)})") from None

    def _prepare_score(self, request: ScoreRequest, snapshot: dict) -> _PreparedScore:
        texts, targets = _texts(request.texts, "texts"), _texts(request.targets, "targets")
        if len(texts) != len(targets):
            raise ConfigError(f"{len(texts)} texts but {len(targets)} targets")
        pairs = []
        for name, text, target in zip(_per_row(request.task, len(texts)), texts, targets, strict=True):
            task, ids = self._resolve(name, snapshot), self._input_ids(text)
            target_ids = self._encode(target, special=False)
            if not target_ids:
                raise ConfigError(f"target {target!r} encodes to no tokens")
            self._check_context(len(ids), task, len(target_ids))
            pairs.append(_Pair(task, ids, target_ids))
        return _PreparedScore(request, pairs, None)

    def _classifier(self, task: _Task | None, name) -> tuple[Task, list[list[int]]]:
        """(data.Task, target ids) from the task's meta, parsed once per loaded version."""
        if task is None:
            raise NoVerbalizerError(f"task {name!r} has no verbalizer: it cannot classify (name a task whose "
                                    "saved prompt has one)")
        if task.classifier is None:
            spec = task_from_meta(task.name, task.meta)
            with self._tokenizer_lock:
                task.classifier = (spec, spec.verbalizer.target_token_ids(self.tokenizer))
        return task.classifier

    def _check_context(self, n_input: int, task: _Task | None, n_new: int) -> None:
        n_virtual = task.length if task else 0
        total = n_input + n_virtual + n_new
        if total > self.context_length:
            raise ContextLengthError(
                f"this model's maximum context length is {self.context_length} tokens, but the "
                f"request needs {total} ({n_input} input + {n_virtual} soft-prompt + {n_new} new); "
                "shorten the input or lower max_tokens")

    def _input_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self._encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            vocab = self.model.get_input_embeddings().weight.shape[0]
            if any(not 0 <= i < vocab for i in ids):
                raise ConfigError(f"token ids must be in 0..{vocab - 1}")
        if not ids:  # the left-padded layout needs one real token to read the next one from
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            if start is None:
                raise ConfigError("empty prompt and the tokenizer has no BOS/EOS token to start from")
            ids = [start]
        return ids

    def _encode(self, text: str, *, special: bool = True) -> list[int]:
        if not is_valid_unicode(text):  # tokenizers raise a TypeError on it
            raise ConfigError("text holds a lone surrogate (a \\ud800-\\udfff escape), which is not valid Unicode")
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

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

    def _run_generation(self, rows: list[_PreparedGeneration]) -> list[GenerationResult]:
        ids, mask = self._left_pad([r.input_ids for r in rows])  # (B, L)
        max_new = max(r.max_new_tokens for r in rows)
        states = [_RowState(r, self._decode, self.eos_token_ids) for r in rows]
        with self._model_lock:
            prompt_inputs = self._prompt_inputs([r.task for r in rows], ids.shape[1] + max_new)
            tokens = inject.generate(self.model, ids, mask, max_new_tokens=max_new,
                                     eos_token_ids=self.eos_token_ids, sampling=[r.sampling for r in rows],
                                     should_stop=lambda b, t: states[b].step(t), **prompt_inputs)
        return [state.finish(t) for state, t in zip(states, tokens, strict=True)]

    def _run_scores(self, items: list[_PreparedScore]) -> list:
        scores = self.score_pairs([pair for item in items for pair in item.pairs])
        out, start = [], 0
        for item in items:
            out.append(item.finish(scores[start:start + len(item.pairs)]))
            start += len(item.pairs)
        return out

    def score_pairs(self, pairs: Sequence[_Pair]) -> list[float]:
        """Summed log-probability of each prepared pair's target, `score_batch_size` per forward."""
        scores: list[float] = []
        for start in range(0, len(pairs), self.score_batch_size):
            scores += self._score_chunk(pairs[start:start + self.score_batch_size])
        return scores

    def _score_chunk(self, pairs: Sequence[_Pair]) -> list[float]:
        ids, mask = self._left_pad([p.input_ids + p.target_ids for p in pairs])  # (B, L)
        keep = max(len(p.target_ids) for p in pairs) + 1  # columns whose logits predict targets
        with self._model_lock, torch.no_grad():
            logits = self._last_logits([p.task for p in pairs], ids, mask, keep)  # (B, keep, V)
        logprobs = logits.float().log_softmax(-1)
        scores = []
        for b, pair in enumerate(pairs):
            n = len(pair.target_ids)
            predictions = logprobs[b, keep - 1 - n:keep - 1]  # (n, V): rows end at the last column
            targets = torch.tensor(pair.target_ids, device=predictions.device)[:, None]
            scores.append(float(predictions.gather(1, targets).sum()))
        return scores

    def _last_logits(self, tasks: list[_Task | None], ids, mask, keep: int) -> torch.Tensor:
        inputs = self._prompt_inputs(tasks, ids.shape[1])
        if "prefixes" in inputs:
            out, _, _ = inject.prefix_forward(self.model, ids, mask, inputs["prefixes"], logits_to_keep=keep)
            return out.logits
        prompts = inputs.get("prompts", torch.zeros(len(ids), 0, 1, device=self.device))
        lengths = inputs.get("prompt_lengths", ids.new_zeros(len(ids)))
        batch = inject.inject(self.model, ids, mask, prompts, lengths)
        return inject.forward(self.model, batch, logits_to_keep=keep, use_cache=False).logits

    def _prompt_inputs(self, tasks: list[_Task | None], width: int) -> dict:
        """How the rows' prompts enter: KV prefixes for a batch with a deep prompt (its KV is all
        there is) or when the cache is on and exact; else embeddings."""
        if not any(tasks):
            return {}
        longest = max(t.length for t in tasks if t)
        exact = inject.prefix_is_exact(self.model, longest + width)
        deep = any(t is not None and t.kind == "deep" for t in tasks)
        if deep and not exact:
            raise IncompatiblePromptError(f"a deep prompt over {longest + width} columns exceeds this model's "
                                          "sliding window; shorten the input or max_tokens")
        if deep or (self.use_prefix_cache and exact):
            return {"prefixes": [self._prefix(t) if t else None for t in tasks]}
        prompts = torch.zeros(len(tasks), longest, self.token_dim, device=self.device)  # (B, N, d)
        for b, task in enumerate(tasks):
            if task:
                prompts[b, :task.length] = task.prompt
        lengths = torch.tensor([t.length if t else 0 for t in tasks], device=self.device)
        return {"prompts": prompts, "prompt_lengths": lengths}

    def _prefix(self, task: _Task) -> inject.PromptPrefix:
        """The task's KV prefix, computed once per loaded version (callers hold the model lock)."""
        if task.prefix is None and task.kind == "deep":  # the rows are the keys and values
            dtype = self.model.get_input_embeddings().weight.dtype
            task.prefix = rows_to_prefix(task.prompt, self.prefix_shape, dtype)
        elif task.prefix is None:
            task.prefix = inject.prompt_prefix(self.model, task.prompt)
            self.prefix_computations += 1
        return task.prefix

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[b, width - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)


# ---------------------------------------------------------------- per-row generation state


class _RowState:
    """Stop strings, per-row token limit and streamed text of one generating row."""

    def __init__(self, row: _PreparedGeneration, decode, eos_ids: tuple[int, ...]):
        self.row, self.decode, self.eos_ids = row, decode, eos_ids
        self.holdback = max((len(s) for s in row.stops), default=1) - 1
        self.watch = bool(row.stops or row.request.on_text)

    def step(self, tokens: list[int]) -> bool:
        """Called after each new token of this row; True ends the row."""
        if self.row.cancelled:
            return True
        if self.watch:
            text = self.decode(tokens)
            cut = _find_stop(text, self.row.stops)
            if cut is not None:
                return True  # finish() cuts and flushes
            self._emit(text[:max(0, len(text) - self.holdback)].rstrip("\ufffd"))
        return len(tokens) >= self.row.max_new_tokens

    def finish(self, tokens: list[int]) -> GenerationResult:
        text = self.decode(tokens)
        cut = _find_stop(text, self.row.stops)
        if cut is not None:
            text, reason = text[:cut], "stop"
        else:
            reason = "stop" if tokens and tokens[-1] in self.eos_ids else "length"
        self._emit(text)
        return GenerationResult(text, list(tokens), reason, len(self.row.input_ids), len(tokens))

    def _emit(self, text: str) -> None:
        callback, sent = self.row.request.on_text, self.row.emitted
        if callback is None or len(text) <= len(sent) or not text.startswith(sent):
            return
        self.row.emitted = text
        try:
            callback(text[len(sent):])
        except Exception:  # a broken listener must not break the batch
            log.exception("streaming callback failed")
            self.row.cancelled = True


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


# ---------------------------------------------------------------- small checks and helpers


SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds a torch generator accepts."""


def _check_sampling(request: GenerationRequest) -> None:
    seed = request.seed
    if seed is not None and not (isinstance(seed, int) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ConfigError(f"seed must be an integer in {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    if not (isinstance(request.temperature, int | float) and 0 <= request.temperature < math.inf):
        raise ConfigError(f"temperature must be >= 0, not {request.temperature!r}")
    if not (isinstance(request.top_p, int | float) and 0 < request.top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1], not {request.top_p!r}")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop
    if not all(isinstance(s, str) for s in stops):
        raise ConfigError("stop must be a string or a list of strings")


def _unknown(name: str) -> UnknownTaskError:
    """The error for a task that is not there. It names only what the client sent: listing the
    tasks is /v1/models' job (which per-tenant keys will filter), the bank's path nobody's."""
    return UnknownTaskError(f"unknown task '{name}'")


def _check_tensor(name: str, values: torch.Tensor, token_dim: int) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[0] < 1:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise IncompatiblePromptError(f"prompt '{name}' must be a tensor [n, d] with n >= 1, got {shape}")
    if values.shape[1] != token_dim:
        raise IncompatiblePromptError(f"prompt '{name}' has hidden size {values.shape[1]} "
                                      f"but the model has {token_dim}")
    if not bool(torch.isfinite(values).all()):
        raise IncompatiblePromptError(f"prompt '{name}' contains NaN or inf values")
    return values


def _check_meta(saved: SavedPrompt) -> None:
    """An uploaded prompt's verbalizer and template must be usable (refused at upload)."""
    try:
        if saved.meta.get("verbalizer") is not None:
            task_from_meta(saved.name, saved.meta)  # template and verbalizer, as classify reads them
        else:  # a generation task: its template alone
            template_from_meta(saved.name, saved.meta)
    except (NoVerbalizerError, ConfigError) as exc:
        raise PromptFileError(f"{META_FILE} of '{saved.name}': {exc}") from exc


def _classify_inputs(values) -> list[str | Mapping]:
    """A classify request's inputs: one string or mapping, or a non-empty list of them."""
    if isinstance(values, str | Mapping):
        values = [values]
    values = list(values)
    if not values or not all(isinstance(v, str | Mapping) for v in values):
        raise ConfigError("input must be a string, an object of template fields, or a non-empty list of them")
    return values


def _fields(spec: Task, value: str | Mapping, index: int) -> dict[str, str]:
    """The template fields of one input: a string fills a one-field template; an object names
    every field (an unknown key is refused rather than ignored: it is usually a typo)."""
    fields = spec.template.fields
    if isinstance(value, str):
        if len(fields) != 1:
            raise ConfigError(f"input {index}: the template of '{spec.name}' has fields {list(fields)}; "
                              f"send an object with {'them' if fields else 'no fields'}, not a string")
        return {fields[0]: value}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ConfigError(f"input {index}: unknown field {unknown[0]!r} (the template of '{spec.name}' "
                          f"uses {', '.join(fields) or 'no fields'})")
    if not all(isinstance(v, str) and is_valid_unicode(v) for v in value.values()):
        raise ConfigError(f"input {index}: every field value must be a string")
    return dict(value)


def _texts(values, what: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    values = list(values)
    if not values or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{what} must be a non-empty list of strings")
    return values


def _per_row(task, rows: int) -> list[str | None]:
    if task is None or isinstance(task, str):
        return [task] * rows
    task = list(task)
    if len(task) != rows:
        raise ConfigError(f"got {len(task)} task names for {rows} rows")
    return task


def _context_length(model, tokenizer) -> int:
    config = model.config.get_text_config()
    length = getattr(config, "max_position_embeddings", None)
    if not length:
        length = getattr(tokenizer, "model_max_length", None) or 2048
    return int(min(length, 1 << 20))


# ---------------------------------------------------------------- the micro-batcher


_STOP = object()
_KINDS = ("generate", "score")


@dataclass(eq=False)
class _Job:
    """One prepared request in the scheduler; a scoring job runs in slices of its pairs."""

    prepared: _PreparedGeneration | _PreparedScore
    future: concurrent.futures.Future
    owner: object
    """The client request it belongs to: batches are shared fairly per owner, not per job."""
    scores: list[float] = field(default_factory=list)
    """Scoring jobs: the scores of the pairs done so far, in order."""

    @property
    def remaining(self) -> int:
        """Rows still to run: pairs for a scoring job, 1 for a generation."""
        return len(self.prepared.pairs) - len(self.scores) if self.prepared.kind == "score" else 1

    def next_pairs(self, n: int) -> list[_Pair]:
        done = len(self.scores)
        return self.prepared.pairs[done:done + n]


class BatchScheduler:
    """One worker thread that runs concurrent requests (any tasks) in mixed-task batches, fairly.

    A request is validated in the caller (`engine.prepare`), so a bad one fails alone before it
    can join a batch. Each batch takes its rows in turn from the client requests waiting: one
    prompt each per turn for generation (up to `max_batch_size` rows), an equal share of
    `engine.score_batch_size` pairs for scoring. So a classify of 300 inputs runs in slices and a
    small request arriving meanwhile joins the next slice instead of waiting for all of it, and
    a request whose client went away (`prepared.cancelled`) is dropped before the next batch.
    If a batch raises, its requests are retried one by one, so a failure stays with the request
    that caused it. While idle the worker refreshes the engine from its bank every
    `refresh_interval_s`.
    """

    def __init__(self, engine: Engine, max_batch_size: int = 16, max_wait_ms: float = 5.0, *,
                 refresh_interval_s: float = 2.0):
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ConfigError("max_batch_size must be >= 1 and max_wait_ms >= 0")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.refresh_interval_s = refresh_interval_s
        self.batches = 0
        """Batches run so far (for tests and stats)."""
        self.largest_batch = 0
        """Most requests that shared one batch."""
        self._queue: queue.Queue = queue.Queue()  # arrivals: _Job or _STOP
        self._waiting: dict[str, dict[object, collections.deque[_Job]]] = {kind: {} for kind in _KINDS}
        """Worker-only state: per kind, per owner (in turn order), the jobs not finished."""
        self._closed = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="softprompt-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ submitting

    def enqueue(self, prepared, owner: object = None) -> concurrent.futures.Future:
        """Queue a prepared request; the future resolves with its result.

        Requests with the same `owner` (the prompts of one client request) share one turn.
        """
        if self._closed:
            raise RuntimeError("the batch scheduler is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(prepared, future, future if owner is None else owner))
        return future

    async def prepare(self, request):
        """Validate a request without blocking the event loop (it may read a prompt from disk)."""
        return await asyncio.to_thread(self.engine.prepare, request)

    async def prepare_all(self, requests: Sequence) -> list:
        """Validate the pieces of one client request against one snapshot of their tasks."""
        return await asyncio.to_thread(self.engine.prepare_all, requests)

    async def submit(self, request):
        """Validate, queue and await one request (GenerationRequest / ClassifyRequest / ScoreRequest)."""
        prepared = await self.prepare(request)
        future = self.enqueue(prepared)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            prepared.cancelled = True
            raise

    def submit_sync(self, request, timeout: float | None = None):
        """The blocking form of `submit`, for threads."""
        return self.enqueue(self.engine.prepare(request)).result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued work, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout)

    # ------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while True:
            if not self._has_work():
                if self._stopping:
                    return
                if not self._wait_for_work():
                    self._refresh()
                    continue
            self._admit_arrived()
            self._drop_cancelled()
            for kind in _KINDS:
                if self._waiting[kind]:
                    self._run_batch(kind)

    def _has_work(self) -> bool:
        return any(self._waiting[kind] for kind in _KINDS)

    def _wait_for_work(self) -> bool:
        """Block for an arrival, then let others join it for max_wait (up to max_batch_size).

        False when nothing arrived within `refresh_interval_s`.
        """
        try:
            self._admit(self._queue.get(timeout=self.refresh_interval_s))
        except queue.Empty:
            return False
        deadline, admitted = time.monotonic() + self.max_wait_s, 1
        while admitted < self.max_batch_size and not self._stopping:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            self._admit(item)
            admitted += 1
        return True

    def _admit_arrived(self) -> None:
        while True:
            try:
                self._admit(self._queue.get_nowait())
            except queue.Empty:
                return

    def _admit(self, item) -> None:
        if item is _STOP:
            self._stopping = True
        else:
            self._waiting[item.prepared.kind].setdefault(item.owner, collections.deque()).append(item)

    def _drop_cancelled(self) -> None:
        """Resolve and forget the jobs whose client went away (or whose future was cancelled)."""
        for owners in self._waiting.values():
            for owner, jobs in list(owners.items()):
                for job in [j for j in jobs if j.prepared.cancelled or j.future.cancelled()]:
                    jobs.remove(job)
                    if not job.future.cancel():  # already running: resolve it for any listener
                        job.future.set_exception(concurrent.futures.CancelledError())
                if not jobs:
                    del owners[owner]

    def _run_batch(self, kind: str) -> None:
        slices = self._take_turns(kind)
        if slices:
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(slices))
            (self._generate if kind == "generate" else self._score)(slices)

    def _take_turns(self, kind: str) -> list[tuple[_Job, int]]:
        """(job, rows of it) for one batch: owners take turns, one row per turn for generation,
        an equal share of the pairs for scoring. Owners served move to the back of the line."""
        owners = self._waiting[kind]
        capacity = self.max_batch_size if kind == "generate" else self.engine.score_batch_size
        taken: dict[_Job, int] = {}
        while capacity and owners:
            line = [o for o in owners if self._next_job(owners[o], taken) is not None]
            if not line:
                break
            quantum = 1 if kind == "generate" else max(1, capacity // len(line))
            for owner in line:
                job = self._next_job(owners[owner], taken)
                n = min(quantum, job.remaining - taken.get(job, 0), capacity)
                taken[job] = taken.get(job, 0) + n
                capacity -= n
                owners[owner] = owners.pop(owner)  # to the back of the line
                if not capacity:
                    break
        return list(taken.items())

    def _next_job(self, jobs: collections.deque[_Job], taken: dict[_Job, int]) -> _Job | None:
        """The owner's first job with rows not yet taken for this batch (started on first take)."""
        for job in list(jobs):
            if taken.get(job, 0) >= job.remaining:
                continue
            if job in taken or job.future.running() or job.future.set_running_or_notify_cancel():
                return job
            jobs.remove(job)  # its future was cancelled before it ever ran
        return None

    def _generate(self, slices: list[tuple[_Job, int]]) -> None:
        jobs = [job for job, _ in slices]
        try:
            results = self.engine.run([job.prepared for job in jobs])
        except Exception as exc:
            self._retry_alone(slices, exc, self._generate)
            return
        for job, result in zip(jobs, results, strict=True):
            self._finish(job, result)

    def _score(self, slices: list[tuple[_Job, int]]) -> None:
        try:
            scores = self.engine.score_pairs([pair for job, n in slices for pair in job.next_pairs(n)])
        except Exception as exc:
            self._retry_alone(slices, exc, self._score)
            return
        start = 0
        for job, n in slices:
            job.scores += scores[start:start + n]
            start += n
            if not job.remaining:
                self._finish(job, job.prepared.finish(job.scores))

    def _retry_alone(self, slices: list[tuple[_Job, int]], exc: Exception, run) -> None:
        if len(slices) == 1:
            self._finish(slices[0][0], error=exc)
            return
        log.warning("a batch of %d failed (%s); retrying its requests one by one", len(slices), exc)
        for piece in slices:
            run([piece])

    def _finish(self, job: _Job, result=None, error: Exception | None = None) -> None:
        owners = self._waiting[job.prepared.kind]
        jobs = owners.get(job.owner)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del owners[job.owner]
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    def _refresh(self) -> None:
        try:
            self.engine.refresh()
        except Exception:  # the bank folder may be briefly unreadable; try again later
            log.exception("refreshing tasks from the bank failed")


__all__ = [
    "SEED_RANGE", "BatchScheduler", "Classification", "ClassifyRequest", "ContextLengthError", "Engine",
    "GenerationRequest", "GenerationResult", "NoVerbalizerError", "ScoreRequest", "TaskInfo",
]
