"""The input processor: a request -> prepared work, with no model (as vLLM's processor is).

It holds what turns a request into token ids and a task: the tokenizer, the input-embedding table,
the task registry (registry.py: the bank's tasks within the memory tiers), the context limit. It
renders templates and chat, resolves each row's task once per request (a `TaskSnapshot`, so all
rows see one prompt version and the task stays in use), checks sampling, limits and context, and
returns the prepared pieces (requests.py) a runner executes: the built-in engine (engine.py, an
`InputProcessor` with the model runner added) or the vLLM gateway (vllm/backend.py, which holds
an `InputProcessor` over `load_front_end`'s embeddings and sends the pieces to vLLM). Both
backends validate with this one code, so a request fails the same way on both.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from softprompt.bank import PromptBank
from softprompt.data import Task, encode_example, is_valid_unicode, task_from_meta
from softprompt.errors import ConfigError, ContextLengthError, DataError, NoVerbalizerError
from softprompt.model.loading import FrontEnd
from softprompt.prompting import inject
from softprompt.prompting.deep import config_prefix_shape
from softprompt.prompting.inject import PrefixShape
from softprompt.prompting.kind import PromptKind
from softprompt.prompting.kinds import KINDS, kind_named
from softprompt.prompting.scorer import ScoreRow
from softprompt.serving.registry import LoadedTask, TaskRegistry, TaskSnapshot, TierConfig
from softprompt.serving.requests import (
    ClassifyRequest,
    GenerationRequest,
    PreparedGeneration,
    PreparedPromptLogprobs,
    PreparedScore,
    PromptLogprobsRequest,
    ScoreRequest,
    check_sampling,
    check_top_logprobs,
    classify_inputs,
    task_per_row,
    template_fields,
    text_list,
)


class InputProcessor:
    """Requests -> prepared work for one base model's tasks; holds no model layers."""

    def __init__(
        self,
        tokenizer,
        input_embeddings: torch.nn.Module,
        config,
        bank: PromptBank | str | None = None,
        *,
        base_model_id: str,
        fingerprint: dict,
        device: torch.device | str = "cpu",
        kinds: tuple[str, ...] = tuple(KINDS),
        tiers: TierConfig | None = None,
        max_new_tokens_cap: int = 512,
    ):
        self.tokenizer, self.input_embeddings, self.config = tokenizer, input_embeddings, config
        self.base_model_id, self.fingerprint = base_model_id, fingerprint
        self.bank = PromptBank(bank) if isinstance(bank, str | Path) else bank
        self.max_new_tokens_cap = max_new_tokens_cap
        self.vocab_size, self.token_dim = input_embeddings.weight.shape
        self.context_length = context_length(config, tokenizer)
        """The longest input + prompt + new tokens a request may need (the vLLM gateway lowers it
        to vLLM's when that is shorter)."""
        self.base_names = {base_model_id, config.name_or_path or base_model_id}
        self.reserved_names = {"default", *self.base_names}
        """Names a task may not have: the base model's, and `default` (the CLI's default model)."""
        self._tokenizer_lock = threading.Lock()
        self.prompt_kinds: dict[str, PromptKind] = {name: kind_named(name) for name in KINDS}
        """Each kind by name: what serving asks about a task's prompt (how it enters, and so
        its row width; its KV prefix), never testing the name itself."""
        self.registry = TaskRegistry(
            self.bank,
            kinds=kinds,
            fingerprint=fingerprint,
            reserved_names=self.reserved_names,
            row_width=self._row_width,
            context_length=self.context_length,
            device=device,
            tiers=tiers,
        )
        """The tasks in memory (registry.py): load, check, install, remove, follow the bank,
        within the memory tiers' bounds (`tiers`; pinned tasks are loaded now)."""
        self.registry.load_pinned()
        self.tasks, self.task_infos, self.task_info = (
            self.registry.tasks,
            self.registry.task_infos,
            self.registry.task_info,
        )
        self.add_task, self.activate, self.deactivate = (
            self.registry.add_task,
            self.registry.activate,
            self.registry.deactivate,
        )
        self.prompt_values = self.registry.prompt_values
        self.task_names, self.listing = self.registry.names, self.registry.listing
        self.refresh, self.install, self.remove = (
            self.registry.refresh,
            self.registry.install,
            self.registry.remove,
        )

    @classmethod
    def from_front_end(cls, front: FrontEnd, bank=None, **options) -> InputProcessor:
        """The processor of a model read without its layers (`load_front_end`)."""
        return cls(
            front.tokenizer,
            front.input_embeddings,
            front.config,
            bank,
            base_model_id=front.name,
            fingerprint=front.fingerprint,
            **options,
        )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The prompt kinds served (a deep prompt enters as each layer's KV prefix: the vLLM
        gateway serves it only through its connector); the registry checks them."""
        return self.registry.kinds

    @kinds.setter
    def kinds(self, kinds: tuple[str, ...]) -> None:
        self.registry.kinds = kinds

    @functools.cached_property
    def prefix_shape(self) -> PrefixShape | None:
        """The KV geometry a deep prompt's rows must have, from the config (the engine probes
        its layers instead); None where the config cannot say (`config_prefix_shape`)."""
        return config_prefix_shape(self.config)

    def kind_of(self, task: LoadedTask) -> PromptKind:
        """The kind of a loaded task's prompt."""
        return self.prompt_kinds[task.kind]

    def _row_width(self, kind: str) -> int:
        """Width of one prompt row of `kind` (a kind not served is refused before width matters)."""
        served = kind in self.kinds and kind in self.prompt_kinds
        if not served or self.prompt_kinds[kind].enters_as_embeddings:
            return self.token_dim
        return self.prefix_shape.row_width  # a row is one position's KV in every layer

    @property
    def widest_row(self) -> int:
        """The widest prompt row of the kinds served (what bounds an upload's size)."""
        return max(self._row_width(kind) for kind in self.kinds)

    def _resolve(self, name: str | None, snapshot: TaskSnapshot) -> LoadedTask | None:
        """The task entry for a request (None = the base model, no prompt).

        Each name is resolved once per `snapshot` and then taken from it, so all the rows of one
        request use the same prompt version even when a new one is saved meanwhile; the task
        stays in use (never evicted) while the snapshot lives.
        """
        if name is None or name == "" or name in self.base_names:
            return None
        if name not in snapshot:
            self.registry.acquire(name, snapshot)
        return snapshot[name]

    # ------------------------------------------------------------ tokens

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of chat messages through the tokenizer's chat template (or a plain join)."""
        if getattr(self.tokenizer, "chat_template", None):
            with self._tokenizer_lock:
                text = self.tokenizer.apply_chat_template(
                    list(messages), tokenize=False, add_generation_prompt=True
                )
            return self._encode(text, special=False)  # the template writes its own BOS
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return self._encode(text)

    def score_token_rows(
        self,
        task: str | None,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        snapshot: TaskSnapshot,
        top_k: int | None = None,
    ) -> list[ScoreRow]:
        """(input ids, target ids) pairs checked into rows to score under `task`'s prompt."""
        if top_k is not None:
            check_top_logprobs(top_k, "top_k")
        entry, rows = self._resolve(task, snapshot), []
        for ids, target in pairs:
            if not target:
                raise ConfigError("every target needs at least one token")
            ids, target = self._input_ids(list(ids)), self._input_ids(list(target))
            self._check_context(len(ids), entry, len(target))
            rows.append(ScoreRow(ids, target, entry, top_k))
        return rows

    # ------------------------------------------------------------ validation

    def prepare(self, request, snapshot: TaskSnapshot | None = None):
        """Validate and tokenise one request (raises here, before it can join a batch).

        Each task is resolved once per request (once per `snapshot`, when one is shared), so all
        the rows use one prompt version even if a new one is saved meanwhile. The prepared piece
        keeps the snapshot: its tasks stay in use (never evicted) until the piece is gone.
        """
        if snapshot is None:
            return self.prepare_all([request])[0]
        if isinstance(request, GenerationRequest):
            prepared = self._prepare_generation(request, snapshot)
        elif isinstance(request, ClassifyRequest):
            prepared = self._prepare_classify(request, snapshot)
        elif isinstance(request, ScoreRequest):
            prepared = self._prepare_score(request, snapshot)
        elif isinstance(request, PromptLogprobsRequest):
            prepared = self._prepare_prompt_logprobs(request, snapshot)
        else:
            raise TypeError(f"cannot run a {type(request).__name__}")
        prepared.held = snapshot
        return prepared

    def prepare_all(self, requests: Sequence) -> list:
        """Prepare the pieces of one request (e.g. a completion's prompts) with one snapshot."""
        snapshot = TaskSnapshot()
        try:
            return [self.prepare(request, snapshot) for request in requests]
        except BaseException:
            snapshot.release()  # the request failed: its tasks are free now, not at garbage time
            raise

    def _prepare_generation(
        self, request: GenerationRequest, snapshot: TaskSnapshot
    ) -> PreparedGeneration:
        check_sampling(request)
        task = self._resolve(request.task, snapshot)
        ids = self._input_ids(request.prompt)
        used = len(ids) + (task.length if task else 0)
        wanted = request.max_new_tokens
        if wanted is None:
            wanted = max(1, min(self.max_new_tokens_cap, self.context_length - used))
        if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, not {wanted!r}")
        self._check_context(len(ids), task, wanted)
        sampling = inject.Sampling(float(request.temperature), float(request.top_p), request.seed)
        stops = tuple(
            s for s in ([request.stop] if isinstance(request.stop, str) else request.stop) if s
        )
        return PreparedGeneration(request, task, ids, wanted, sampling, stops)

    def _prepare_classify(self, request: ClassifyRequest, snapshot: TaskSnapshot) -> PreparedScore:
        inputs = classify_inputs(request.texts)
        pairs, labels = [], []
        for i, (name, value) in enumerate(
            zip(task_per_row(request.task, len(inputs)), inputs, strict=True)
        ):
            task = self._resolve(name, snapshot)
            spec, targets = self._classifier(task, name)
            ids = self._classify_input_ids(spec, template_fields(spec, value, i), i)
            prompt = None if request.zero_shot else task
            self._check_context(len(ids), prompt, max(len(t) for t in targets))
            pairs += [ScoreRow(ids, t, prompt) for t in targets]
            labels.append(spec.verbalizer.labels)
        return PreparedScore(request, pairs, labels)

    def _classify_input_ids(self, spec: Task, record: dict[str, str], index: int) -> list[int]:
        """The input tokens `softprompt eval` scores for this record (data.encode_example)."""
        try:
            with self._tokenizer_lock:
                return encode_example(
                    self.tokenizer, spec, record, 0, require_target=False
                ).input_ids
        except DataError as exc:  # a missing or empty field
            what = "empty" if exc.field in record else "missing"
            raise ConfigError(
                f"input {index}: {what} field '{exc.field}' (the template of "
                f"'{spec.name}' uses {', '.join(spec.template.fields)})"
            ) from None

    def _prepare_score(self, request: ScoreRequest, snapshot: TaskSnapshot) -> PreparedScore:
        texts, targets = text_list(request.texts, "texts"), text_list(request.targets, "targets")
        if len(texts) != len(targets):
            raise ConfigError(f"{len(texts)} texts but {len(targets)} targets")
        pairs = []
        for name, text, target in zip(
            task_per_row(request.task, len(texts)), texts, targets, strict=True
        ):
            task, ids = self._resolve(name, snapshot), self._input_ids(text)
            target_ids = self._encode(target, special=False)
            if not target_ids:
                raise ConfigError(f"target {target!r} encodes to no tokens")
            self._check_context(len(ids), task, len(target_ids))
            pairs.append(ScoreRow(ids, target_ids, task))
        return PreparedScore(request, pairs, None)

    def _prepare_prompt_logprobs(
        self, request: PromptLogprobsRequest, snapshot: TaskSnapshot
    ) -> PreparedPromptLogprobs:
        top = request.top_logprobs
        if top is not None:
            check_top_logprobs(top, "logprobs")
        task, ids = self._resolve(request.task, snapshot), self._input_ids(request.prompt)
        self._check_context(len(ids), task, 0)
        scored = len(ids) > 1 and top is not None
        pairs = [ScoreRow(ids[:1], ids[1:], task, top)] if scored else []
        return PreparedPromptLogprobs(request, pairs, None, token_ids=ids, task=task)

    def _classifier(self, task: LoadedTask | None, name) -> tuple[Task, list[list[int]]]:
        """(data.Task, target ids) from the task's meta, parsed once per loaded version."""
        if task is None:
            raise NoVerbalizerError(
                f"task {name!r} has no verbalizer: it cannot classify (name a task whose "
                "saved prompt has one)"
            )
        if task.classifier is None:
            spec = task_from_meta(task.name, task.meta)
            with self._tokenizer_lock:
                task.classifier = (spec, spec.verbalizer.target_token_ids(self.tokenizer))
        return task.classifier

    def _check_context(self, n_input: int, task: LoadedTask | None, n_new: int) -> None:
        n_virtual = task.length if task else 0
        total = n_input + n_virtual + n_new
        if total > self.context_length:
            raise ContextLengthError(
                f"this model's maximum context length is {self.context_length} tokens, but the "
                f"request needs {total} ({n_input} input + {n_virtual} soft-prompt + {n_new} new); "
                "shorten the input or lower max_tokens"
            )

    def _input_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self._encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            vocab = self.vocab_size
            if any(not 0 <= i < vocab for i in ids):
                raise ConfigError(f"token ids must be in 0..{vocab - 1}")
        if not ids:  # the left-padded layout needs one real token to read the next one from
            start = (
                self.tokenizer.bos_token_id
                if self.tokenizer.bos_token_id is not None
                else self.tokenizer.eos_token_id
            )
            if start is None:
                raise ConfigError(
                    "empty prompt and the tokenizer has no BOS/EOS token to start from"
                )
            ids = [start]
        return ids

    def _encode(self, text: str, *, special: bool = True) -> list[int]:
        if not is_valid_unicode(text):  # tokenizers raise a TypeError on it
            raise ConfigError(
                "text holds a lone surrogate (a \\ud800-\\udfff escape), which is not valid Unicode"
            )
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token alone as text, special tokens by name: how log-probabilities name tokens."""
        with self._tokenizer_lock:
            return [self.tokenizer.decode([int(i)]) for i in ids]

    def text_pieces(self, ids: Sequence[int], start: int = 0) -> list[str]:
        """The text each of `ids[start:]` adds to the decoded text of `ids` (special tokens add
        none; a token ending inside a character adds nothing and the next one the character):
        their lengths are the tokens' text offsets."""
        pieces = []
        with self._tokenizer_lock:
            for i in range(start, len(ids)):
                window = list(ids[max(0, i - 4) : i + 1])  # enough context for spaces and bytes
                before = self.tokenizer.decode(window[:-1], skip_special_tokens=True)
                text = self.tokenizer.decode(window, skip_special_tokens=True)
                before = before.rstrip("\ufffd")
                pieces.append("" if text.endswith("\ufffd") else text[len(before) :])
        return pieces


def context_length(config, tokenizer) -> int:
    """The model's context: its config's position limit, else the tokenizer's, else 2,048."""
    config = config.get_text_config()
    length = getattr(config, "max_position_embeddings", None)
    if not length:
        length = getattr(tokenizer, "model_max_length", None) or 2048
    return int(min(length, 1 << 20))
