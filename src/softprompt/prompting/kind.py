"""What a prompt kind is: the one interface through which a trainable prompt steers a frozen model.

`PromptedModel` composes a kind (torchtune's "composition over inheritance"): the model keeps the
frozen LM, the tokenizer, the `PromptTable` of per-task rows [n, row_width] and the task names;
the kind says everything that differs between kinds:

- how the prompt enters a forward pass (`enter`: input embeddings, or per-layer KV prefixes;
  `inject.prompt_logits` / `prompt_loss` / `generate` take what it returns, and apply the one
  sliding-window check, `inject.exact_inputs`);
- its parameters and initialisation (`bind`, `add`, `add_stored`, `rows`): every init makes a
  soft prompt [n, d] first (soft.py's `init_prompt`), which each kind turns into its own rows;
- its PEFT config and metadata for the bank (`peft_config`, `saved_meta`), under its `name`
  (what `SavedPrompt.kind` reads back from the PEFT type, bank/format.py's `PEFT_TYPES`);
- its default learning rate (`default_learning_rate`), the one place that number is written;
- how a saved prompt is served (`enters_as_embeddings`: rows of the input width, or each layer's
  KV, `PrefixShape.row_width` wide; `served_prefix`): the engine and the vLLM gateway ask the
  kind, never test its name.

The kinds there are, by name, are in kinds.py. Adding one: docs/architecture.md.
"""

from __future__ import annotations

from typing import Protocol

import torch

from softprompt.prompting.inject import PrefixShape, PromptInputs, PromptPrefix
from softprompt.prompting.soft import PromptTable, PromptTuningConfig


class PromptKind(Protocol):
    """One kind of prompt. A kind is usually an `nn.Module`: the parameters it adds beyond the
    table's rows (a deep prompt's reparameterisation MLPs) then train with them."""

    name: str
    """The kind's name: `--prompt-type`, `SavedPrompt.kind` of what it saves ('soft', 'deep')."""
    peft_type: str
    """The PEFT adapter type it is saved as (`PROMPT_TUNING`, `PREFIX_TUNING`)."""
    default_learning_rate: float
    """The peak learning rate `softprompt train` and `compare` use unless told."""
    enters_as_embeddings: bool
    """Whether its stored rows are input embeddings (a soft prompt: the vLLM gateway sends them
    as `prompt_embeds`, and its KV prefix costs a forward over them), or not (a deep prompt: the
    rows are each layer's KV, so a batch holding one runs from KV prefixes)."""

    def bind(self, model) -> int:
        """Read what the kind needs of the frozen `model` (a deep prompt: its KV geometry) and check
        the kind's options against it; returns the width of one stored row."""
        ...

    def add(self, model, table: PromptTable, name: str, values: torch.Tensor) -> int:
        """Add (or replace) task `name` from a soft prompt [n, d] (what every init makes) or values
        in the kind's own layout; returns its task id."""
        ...

    def add_stored(self, table: PromptTable, name: str, rows: torch.Tensor) -> int:
        """Add (or replace) task `name` from rows as the bank stores them [n, row_width]."""
        ...

    def rows(self, table: PromptTable, task_id: int) -> torch.Tensor:
        """The task's current rows [n, row_width] (through any reparameterisation): what is saved."""
        ...

    def enter(self, model, table: PromptTable, task_ids: torch.Tensor) -> PromptInputs:
        """How the prompts of a batch's rows (task ids [B]; NO_TASK: none) enter the forward pass."""
        ...

    def peft_config(
        self, model, rows: torch.Tensor, config: PromptTuningConfig | None, base_name: str
    ) -> dict:
        """The PEFT adapter_config of a task with `rows` (`config`: how it was initialised)."""
        ...

    def saved_meta(self, info: dict, config: PromptTuningConfig | None) -> dict:
        """softprompt.json's fields: the shared `info` (fingerprint, base model) plus the kind's."""
        ...

    def served_prefix(
        self, model, rows: torch.Tensor, shape: PrefixShape, dtype: torch.dtype
    ) -> PromptPrefix:
        """The per-layer KV prefix that serves stored `rows` (the engine's prefix cache)."""
        ...
