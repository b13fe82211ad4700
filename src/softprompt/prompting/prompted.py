"""PromptedModel: a frozen causal LM plus one prompt per task, of one kind; the notebook-sized API.

    model = load_model("default")
    prompted = PromptedModel(model, {"sentiment": PromptTuningConfig(
        num_virtual_tokens=8, prompt_tuning_init="text",
        prompt_tuning_init_text="Classify if this text is positive or negative:")})
    prompted.generate(["Review: great film\\nSentiment:"], tasks=["sentiment"])

The prompt kind (soft by default; `kind=DeepPrompt()` for deep prompts) says how a prompt enters
the model (kind.py); everything that touches the model goes through `inject.py`. This class keeps
the pieces together (model, tokenizer, prompt table, kind, fingerprint) and speaks in task names
and strings.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.bank import PromptBank, SavedPrompt, check_compatible, read_prompt_dir
from softprompt.errors import ConfigError
from softprompt.model.loading import LoadedModel, eos_token_ids, fingerprint, freeze
from softprompt.prompting import inject
from softprompt.prompting.kind import PromptKind
from softprompt.prompting.soft import (
    NO_TASK,
    PromptTable,
    PromptTuningConfig,
    SoftPrompt,
    init_prompt,
)

log = logging.getLogger(__name__)

TaskSpec = str | None | list[str | None] | torch.Tensor


class PromptedModel(nn.Module):
    """A frozen causal LM with a table of prompts of one kind; only the prompts (and the kind's
    own parameters, if any) are trainable. `kind` defaults to `SoftPrompt()`; a kind instance
    belongs to one PromptedModel (it holds per-task state, such as a deep prompt's MLPs)."""

    def __init__(
        self,
        model: LoadedModel | nn.Module,
        prompts: dict | None = None,
        *,
        tokenizer=None,
        kind: PromptKind | None = None,
    ):
        super().__init__()
        if isinstance(model, LoadedModel):
            tokenizer = tokenizer or model.tokenizer
            self.base_name, self.fingerprint, model = model.name, model.fingerprint, model.model
        else:
            self.base_name = model.config.name_or_path
            self.fingerprint = fingerprint(model)
        freeze(model)
        self.model = model
        self.tokenizer = tokenizer
        self.table = PromptTable()
        self.kind = SoftPrompt() if kind is None else kind  # registered after the table: the
        # trainer's parameter order (table, then the kind's own) is what checkpoints hold
        self.row_width = self.kind.bind(model)
        """Values per virtual token as the bank stores them (soft: the hidden size)."""
        self.configs: dict[str, PromptTuningConfig | None] = {}
        self.meta: dict[str, dict] = {}  # per task: template, verbalizer... saved with the prompt
        for name, spec in (prompts or {}).items():
            self.add_task(name, spec)

    # ------------------------------------------------------------ tasks

    def add_task(self, name: str, spec: PromptTuningConfig | torch.Tensor | SavedPrompt) -> int:
        """Add a task from a config (initialised here), a tensor (a soft prompt [n, d], or values
        in the kind's own layout), or a saved prompt of this kind."""
        if isinstance(spec, SavedPrompt):
            return self._add_saved(name, spec)
        config = spec if isinstance(spec, PromptTuningConfig) else None
        values = spec if config is None else self._initial_values(config)
        task_id = self.kind.add(self.model, self.table, name, values)
        self.configs[name] = config
        return task_id

    def _initial_values(self, config: PromptTuningConfig) -> torch.Tensor:
        if (
            config.prompt_tuning_init in ("text", "class_labels", "sampled_vocab")
            and self.tokenizer is None
        ):
            raise ConfigError(f"init {config.prompt_tuning_init!r} needs a tokenizer")
        return init_prompt(config, self.model, self.tokenizer)

    def _add_saved(self, name: str, saved: SavedPrompt) -> int:
        check_compatible(
            saved, token_dim=self.row_width, fingerprint=self.fingerprint, kinds=(self.kind.name,)
        )
        self.meta[name] = {k: v for k, v in saved.meta.items() if k in ("template", "verbalizer")}
        task_id = self.kind.add_stored(self.table, name, saved.embeddings)
        self.configs[name] = None
        return task_id

    @property
    def task_names(self) -> list[str]:
        return list(self.table.names)

    @property
    def token_dim(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    def task_ids(self, tasks: TaskSpec, rows: int) -> torch.Tensor:
        """Task ids [rows] from one name for all rows, a name per row, or ids already."""
        if isinstance(tasks, torch.Tensor):
            self.table.check_ids(tasks)
            return tasks.long()
        if tasks is None or isinstance(tasks, str):
            tasks = [tasks] * rows
        if len(tasks) != rows:
            raise ConfigError(f"got {len(tasks)} task names for {rows} rows")
        return self.table.ids(tasks)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------ model calls

    def prompt_inputs(self, input_ids, tasks: TaskSpec) -> inject.PromptInputs:
        """How each row's prompt enters the forward pass (the kind decides)."""
        task_ids = self.task_ids(tasks, len(input_ids)).to(input_ids.device)
        return self.kind.enter(self.model, self.table, task_ids)

    def forward(self, input_ids, attention_mask=None, tasks: TaskSpec = None, labels=None):
        """Logits in the caller's layout [B, L, V] (and the loss when labels are given)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = self.prompt_inputs(input_ids, tasks)
        logits = inject.prompt_logits(self.model, input_ids, attention_mask, inputs)
        loss = None
        if labels is not None:
            loss = inject.prompt_loss(self.model, input_ids, attention_mask, labels, inputs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def last_logits(
        self, input_ids, attention_mask, tasks: TaskSpec = None, keep: int = 1
    ) -> torch.Tensor:
        """Logits [B, keep, V] of the last `keep` columns of left-padded rows (the LM head runs on
        those only): what scorer.py reads target log-probabilities from."""
        inputs = self.prompt_inputs(input_ids, tasks)
        return inject.prompt_logits(self.model, input_ids, attention_mask, inputs, keep=keep)

    def loss(self, input_ids, attention_mask, tasks: TaskSpec, labels, reduction="mean"):
        """Training loss, with logits computed only where labels are."""
        inputs = self.prompt_inputs(input_ids, tasks)
        return inject.prompt_loss(
            self.model, input_ids, attention_mask, labels, inputs, reduction=reduction
        )

    def generate_ids(
        self, input_ids, attention_mask, tasks: TaskSpec = None, **kwargs
    ) -> list[list[int]]:
        inputs = self.prompt_inputs(input_ids, tasks)
        kwargs.setdefault("eos_token_ids", eos_token_ids(self.tokenizer, self.model))
        return inject.generate(
            self.model,
            input_ids,
            attention_mask,
            prompts=inputs.prompts,
            prompt_lengths=inputs.prompt_lengths,
            prefixes=inputs.prefixes,
            **kwargs,
        )

    def generate(self, texts: str | list[str], tasks: TaskSpec = None, **kwargs) -> list[str]:
        """Generated continuations of `texts`, each row with its task's prompt."""
        return inject.generate_texts(self, texts, tasks, **kwargs)

    # ------------------------------------------------------------ files

    def saved_prompt(self, name: str, meta: dict | None = None) -> SavedPrompt:
        """The task's prompt with its PEFT config and our metadata, ready for a bank."""
        rows = self.kind.rows(self.table, self.table.index(name))
        rows = rows.detach().cpu().float().clone()  # (n, row_width)
        config = self.configs.get(name)
        info = {"fingerprint": self.fingerprint, "base_model": self.base_name}
        info = {
            **self.kind.saved_meta(info, config),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return SavedPrompt(
            name=name,
            embeddings=rows,
            config=self.kind.peft_config(self.model, rows, config, self.base_name),
            meta={**info, **self.meta.get(name, {}), **(meta or {})},
        )

    def save_task(self, name: str, bank: PromptBank | str | os.PathLike, meta: dict | None = None):
        """Write one task into a bank folder (atomically); returns its path."""
        bank = bank if isinstance(bank, PromptBank) else PromptBank(bank)
        return bank.save(self.saved_prompt(name, meta))

    def load_task(self, source: str | os.PathLike, name: str | None = None) -> SavedPrompt:
        """Add a task from a saved prompt folder (a bank entry, or a PEFT adapter of this kind),
        refusing incompatible ones; its metadata is kept, so a later save carries it on."""
        saved = read_prompt_dir(source, name=name)
        self.add_task(name or saved.name, saved)
        self.meta[name or saved.name] = saved.meta
        return saved


__all__ = ["PromptedModel", "NO_TASK"]
