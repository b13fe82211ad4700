"""PromptedModel: a frozen causal LM plus one soft prompt per task, the notebook-sized API.

    model = load_model("default")
    prompted = PromptedModel(model, {"sentiment": PromptTuningConfig(
        num_virtual_tokens=8, prompt_tuning_init="text",
        prompt_tuning_init_text="Classify if this text is positive or negative:")})
    prompted.generate(["Review: great film\\nSentiment:"], tasks=["sentiment"])

Everything that touches the model goes through `inject.py`; this class only keeps the pieces
together (model, tokenizer, prompt table, fingerprint) and speaks in task names and strings.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.bank import (
    PromptBank,
    SavedPrompt,
    check_compatible,
    peft_prompt_config,
    read_prompt_dir,
)
from softprompt.errors import ConfigError
from softprompt.model.loading import LoadedModel, eos_token_ids, fingerprint, freeze
from softprompt.prompting import inject
from softprompt.prompting.deep import DeepPromptModel
from softprompt.prompting.soft import NO_TASK, PromptTable, PromptTuningConfig, init_prompt

log = logging.getLogger(__name__)

TaskSpec = str | None | list[str | None] | torch.Tensor


class PromptedModel(nn.Module):
    """A frozen causal LM with a table of soft prompts; only the table is trainable."""

    def __init__(
        self, model: LoadedModel | nn.Module, prompts: dict | None = None, *, tokenizer=None
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
        self.configs: dict[str, PromptTuningConfig | None] = {}
        self.meta: dict[str, dict] = {}  # per task: template, verbalizer... saved with the prompt
        for name, spec in (prompts or {}).items():
            self.add_task(name, spec)

    # ------------------------------------------------------------ tasks

    def add_task(self, name: str, spec: PromptTuningConfig | torch.Tensor | SavedPrompt) -> int:
        """Add a task from a config (initialised here), a tensor [n, d], or a saved prompt."""
        if isinstance(spec, SavedPrompt):
            check_compatible(spec, token_dim=self.token_dim, fingerprint=self.fingerprint)
            values, config = spec.embeddings, None
            self.meta[name] = {
                k: v for k, v in spec.meta.items() if k in ("template", "verbalizer")
            }
        elif isinstance(spec, PromptTuningConfig):
            if (
                spec.prompt_tuning_init in ("text", "class_labels", "sampled_vocab")
                and self.tokenizer is None
            ):
                raise ConfigError(f"init {spec.prompt_tuning_init!r} needs a tokenizer")
            values, config = init_prompt(spec, self.model, self.tokenizer), spec
        else:
            values, config = spec, None
        task_id = self.table.add(name, values)
        self.configs[name] = config
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

    def inject(
        self, input_ids, attention_mask, tasks: TaskSpec, labels=None
    ) -> inject.InjectedBatch:
        task_ids = self.task_ids(tasks, len(input_ids)).to(input_ids.device)
        prompts, lengths = self.table.gather(task_ids, device=input_ids.device)
        return inject.inject(self.model, input_ids, attention_mask, prompts, lengths, labels)

    def forward(self, input_ids, attention_mask=None, tasks: TaskSpec = None, labels=None):
        """Logits in the caller's layout [B, L, V] (and the loss when labels are given)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = self.inject(input_ids, attention_mask, tasks, labels)
        out = inject.forward(self.model, batch, use_cache=False)
        loss = None if labels is None else inject.loss(self.model, batch)
        return CausalLMOutputWithPast(loss=loss, logits=batch.real_logits(out.logits))

    def last_logits(
        self, input_ids, attention_mask, tasks: TaskSpec = None, keep: int = 1
    ) -> torch.Tensor:
        """Logits [B, keep, V] of the last `keep` columns of left-padded rows (the LM head runs on
        those only): what scorer.py reads target log-probabilities from."""
        out = inject.forward(
            self.model,
            self.inject(input_ids, attention_mask, tasks),
            logits_to_keep=keep,
            use_cache=False,
        )
        return out.logits

    def loss(self, input_ids, attention_mask, tasks: TaskSpec, labels, reduction="mean"):
        """Training loss, with logits computed only where labels are."""
        return inject.loss(
            self.model, self.inject(input_ids, attention_mask, tasks, labels), reduction=reduction
        )

    def generate_ids(
        self, input_ids, attention_mask, tasks: TaskSpec = None, **kwargs
    ) -> list[list[int]]:
        task_ids = self.task_ids(tasks, len(input_ids)).to(input_ids.device)
        prompts, lengths = self.table.gather(task_ids, device=input_ids.device)
        kwargs.setdefault("eos_token_ids", eos_token_ids(self.tokenizer, self.model))
        return inject.generate(
            self.model, input_ids, attention_mask, prompts=prompts, prompt_lengths=lengths, **kwargs
        )

    def generate(self, texts: str | list[str], tasks: TaskSpec = None, **kwargs) -> list[str]:
        """Generated continuations of `texts`, each row with its task's prompt."""
        return inject.generate_texts(self, texts, tasks, **kwargs)

    # ------------------------------------------------------------ files

    def saved_prompt(self, name: str, meta: dict | None = None) -> SavedPrompt:
        """The task's prompt with its PEFT config and our metadata, ready for a bank."""
        values = self.table.get(name).detach().cpu().float().clone()
        config = self.configs.get(name)
        cfg = self.model.config
        peft_config = peft_prompt_config(
            num_virtual_tokens=values.shape[0],
            token_dim=values.shape[1],
            num_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            prompt_tuning_init=config.prompt_tuning_init if config else "random",
            prompt_tuning_init_text=config.prompt_tuning_init_text if config else None,
            tokenizer_name_or_path=self.base_name,
            base_model_name_or_path=self.base_name,
        )
        info = {
            "fingerprint": self.fingerprint,
            "base_model": self.base_name,
            "prompt_tuning_init": config.prompt_tuning_init if config else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        meta = {**info, **self.meta.get(name, {}), **(meta or {})}
        return SavedPrompt(name=name, embeddings=values, config=peft_config, meta=meta)

    def save_task(self, name: str, bank: PromptBank | str, meta: dict | None = None):
        """Write one task into a bank folder (atomically); returns its path."""
        bank = bank if isinstance(bank, PromptBank) else PromptBank(bank)
        return bank.save(self.saved_prompt(name, meta))

    def load_task(self, source: str, name: str | None = None) -> SavedPrompt:
        """Add a task from a saved prompt folder (ours or PEFT's), refusing incompatible ones."""
        saved = read_prompt_dir(source, name=name)
        self.add_task(name or saved.name, saved)
        self.meta[name or saved.name] = saved.meta
        return saved


def model_for_saved(loaded: LoadedModel, saved: SavedPrompt, name: str | None = None):
    """A PromptedModel (soft prompt) or DeepPromptModel (deep prompt) on `loaded`, holding `saved`
    under `name` (default: its own name): what eval, generate and inspect load a bank task into."""
    if saved.kind == "deep":
        model = DeepPromptModel(loaded)
        model.add_saved(saved, name)
        return model
    model = PromptedModel(loaded)
    model.add_task(name or saved.name, saved)
    return model


__all__ = ["PromptedModel", "NO_TASK", "model_for_saved"]
