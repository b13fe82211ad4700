"""Soft prompts: their config, their initial values, the table that holds one per task, and the
soft prompt kind (input embeddings).

A soft prompt lives in the model's *input-embedding space* (what `get_input_embeddings()(ids)`
returns, so Gemma's internal embedding scale is already applied). Prompts are kept in float32
whatever the model dtype: they are tiny, and fp32 keeps small Adam updates from vanishing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from softprompt.bank.format import check_prompt_rows, check_width, peft_prompt_config
from softprompt.errors import ConfigError, UnknownTaskError
from softprompt.options import opt
from softprompt.prompting import inject
from softprompt.prompting.inject import (
    PrefixShape,
    PromptInputs,
    PromptPrefix,
    pad_prompts,
)

log = logging.getLogger(__name__)

INIT_METHODS = ("text", "random", "sampled_vocab", "class_labels", "from_file")
NO_TASK = -1
"""Task id of a row that gets no soft prompt (it must behave exactly like the plain model)."""


@dataclass
class PromptTuningConfig:
    """How one task's soft prompt is shaped and initialised (field names follow PEFT's)."""

    num_virtual_tokens: int = opt(16, "Number of trainable virtual tokens prepended to the input.")
    prompt_tuning_init: str = opt(
        "text", "Initial values: text, random, sampled_vocab, class_labels or from_file."
    )
    prompt_tuning_init_text: str | None = opt(
        None,
        "Text whose token embeddings start the prompt "
        "(tiled or truncated to num_virtual_tokens), for init 'text'.",
    )
    init_labels: list[str] = opt(
        [], "Label words whose embeddings start the prompt, for init 'class_labels'."
    )
    init_file: str | None = opt(None, "A saved prompt folder to start from, for init 'from_file'.")
    seed: int = opt(0, "Seed for the random and sampled_vocab inits.")

    def __post_init__(self):
        self.prompt_tuning_init = str(self.prompt_tuning_init).lower()
        if self.prompt_tuning_init == "sample_vocab":  # PEFT's spelling
            self.prompt_tuning_init = "sampled_vocab"
        if self.prompt_tuning_init not in INIT_METHODS:
            raise ConfigError(
                f"prompt_tuning_init must be one of {', '.join(INIT_METHODS)}, "
                f"not {self.prompt_tuning_init!r}"
            )
        if not 1 <= int(self.num_virtual_tokens) <= 4096:
            raise ConfigError(
                f"num_virtual_tokens must be in 1..4096, not {self.num_virtual_tokens}"
            )
        required = {
            "text": "prompt_tuning_init_text",
            "class_labels": "init_labels",
            "from_file": "init_file",
        }.get(self.prompt_tuning_init)
        if required and not getattr(self, required):
            raise ConfigError(f"prompt_tuning_init={self.prompt_tuning_init!r} needs {required}")


def default_init_text(labels: list[str]) -> str:
    """The init text when none is given: an instruction naming the task's labels ("Classify as
    negative or positive:"), or "Answer:" for a free-form task. `softprompt train` and `compare`
    both start from it."""
    return ("Classify as " + " or ".join(labels) + ":") if labels else "Answer:"


# ---------------------------------------------------------------- initial values


def init_prompt(config: PromptTuningConfig, model, tokenizer) -> torch.Tensor:
    """Initial prompt values [n_virtual, d] in float32 for `config` on `model`."""
    n = config.num_virtual_tokens
    method = config.prompt_tuning_init
    if method == "text":
        ids = _token_ids(tokenizer, config.prompt_tuning_init_text)
        return embed_ids(model, _tile(ids, n))
    if method == "class_labels":
        ids = [i for label in config.init_labels for i in _token_ids(tokenizer, " " + label)]
        return embed_ids(model, _tile(ids, n))
    if method == "sampled_vocab":
        return embed_ids(model, _sample_frequent_ids(tokenizer, model, n, config.seed))
    if method == "random":
        return _random_like_embeddings(model, n, config.seed)
    return _from_file(config.init_file, n)


def embed_ids(model, ids: list[int]) -> torch.Tensor:
    """Input embeddings of token ids, as the model itself would embed them: [len(ids), d] fp32."""
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        index = torch.tensor(ids, dtype=torch.long, device=weight.device)
        return model.get_input_embeddings()(index).detach().float().clone()


def _token_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"init text {text!r} tokenises to nothing")
    return list(ids)


def _tile(ids: list[int], n: int) -> list[int]:
    """Repeat or cut `ids` to length n (what PEFT does with its init text)."""
    repeats = -(-n // len(ids))
    return (ids * repeats)[:n]


def _sample_frequent_ids(tokenizer, model, n: int, seed: int) -> list[int]:
    """n distinct ids among the 5000 most frequent tokens (Lester et al. 2021, sec. 3).

    BPE vocabularies are built by merge order, so low ids are the frequent ones; special tokens
    are skipped because their embeddings are often untrained.
    """
    special = set(getattr(tokenizer, "all_special_ids", []))
    pool = [
        i
        for i in range(min(5000, model.get_input_embeddings().weight.shape[0]))
        if i not in special
    ]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(pool), generator=generator)[:n]
    return [pool[int(i)] for i in picks]


def _random_like_embeddings(model, n: int, seed: int) -> torch.Tensor:
    """Gaussian with each dimension's mean and std over real token embeddings.

    PEFT's random init is N(0, 1), far off the embedding manifold for most models (peft#2815);
    matching the embeddings' own statistics starts the prompt where real tokens live.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    sample = embed_ids(model, list(range(0, vocab, max(1, vocab // 4096))))  # (S, d)
    mean, std = sample.mean(0), sample.std(0)  # (d,)
    generator = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, sample.shape[1], generator=generator)


def _from_file(path: str, n: int) -> torch.Tensor:
    from softprompt.bank import read_prompt_dir  # local import: bank imports nothing from here

    source = read_prompt_dir(path).embeddings.float()
    rows = _tile(list(range(source.shape[0])), n)
    return source[rows].clone()


# ---------------------------------------------------------------- the table


class PromptTable(nn.Module):
    """One trainable soft prompt per task, float32, addressed by task name or task id.

    Tasks may differ in length; `gather` pads them into one batch tensor. Task id `NO_TASK`
    (-1) means "no prompt" and gets length 0.
    """

    def __init__(self):
        super().__init__()
        self.prompts = nn.ParameterList()
        self.names: list[str] = []

    def add(self, name: str, values: torch.Tensor, *, trainable: bool = True) -> int:
        """Add (or replace) task `name` with `values` [n, d]; returns its task id."""
        values = check_prompt_rows(values, f"prompt '{name}'").detach().float().clone()
        if self.names:
            check_width(name, values.shape[1], self.token_dim)
        param = nn.Parameter(values, requires_grad=trainable)
        if name in self.names:
            self.prompts[self.names.index(name)] = param
        else:
            self.prompts.append(param)
            self.names.append(name)
        return self.names.index(name)

    @property
    def token_dim(self) -> int:
        return self.prompts[0].shape[1]

    def index(self, name: str | None) -> int:
        """Task id of `name`; None means no prompt."""
        if name is None:
            return NO_TASK
        if name not in self.names:
            raise UnknownTaskError(
                f"unknown task {name!r}; loaded tasks: {', '.join(self.names) or 'none'}"
            )
        return self.names.index(name)

    def ids(self, names: list[str | None]) -> torch.Tensor:
        """Task ids [B] for a list of task names (None for no prompt)."""
        return torch.tensor([self.index(n) for n in names], dtype=torch.long)

    def get(self, name: str) -> nn.Parameter:
        return self.prompts[self.index(name)]

    def check_ids(self, task_ids: torch.Tensor) -> None:
        bad = [int(t) for t in task_ids.tolist() if not NO_TASK <= t < len(self.names)]
        if bad:
            raise UnknownTaskError(f"unknown task id(s) {bad}; {len(self.names)} task(s) loaded")

    def gather(self, task_ids: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts for each row, right-padded: values [B, N, d] fp32 and lengths [B]."""
        self.check_ids(task_ids)
        rows = [None if t == NO_TASK else self.prompts[t] for t in task_ids.tolist()]
        return pad_prompts(rows, self.token_dim if self.names else 0, device)  # (B, N, d), (B,)


# ---------------------------------------------------------------- the kind


class SoftPrompt(nn.Module):
    """The soft prompt kind (Lester et al. 2021; PEFT's PROMPT_TUNING): n trainable vectors in the
    input-embedding space, entering the forward pass as input embeddings just before the real
    tokens. Its rows are what the bank stores, [n, d]. (Its keys and values do not depend on the
    input, so the engine may also serve it from a cached KV prefix where that is exact.)

    A `PromptKind` (prompting/kind.py); it has no parameters of its own: the prompts are the
    `PromptTable`'s."""

    name = "soft"
    peft_type = "PROMPT_TUNING"
    default_learning_rate = 3e-2
    """The best of bench/quality_sst2.py's screen (SST-2, chosen on validation rows never reported)."""
    enters_as_embeddings = True

    def bind(self, model) -> int:
        return model.get_input_embeddings().weight.shape[1]

    def add(self, model, table: PromptTable, name: str, values: torch.Tensor) -> int:
        return table.add(name, values)

    def add_stored(self, table: PromptTable, name: str, rows: torch.Tensor) -> int:
        return table.add(name, rows)

    def rows(self, table: PromptTable, task_id: int) -> torch.Tensor:
        return table.prompts[task_id]

    def enter(self, model, table: PromptTable, task_ids: torch.Tensor) -> PromptInputs:
        return PromptInputs(*table.gather(task_ids, device=task_ids.device))

    def peft_config(
        self, model, rows: torch.Tensor, config: PromptTuningConfig | None, base_name: str
    ) -> dict:
        return peft_prompt_config(
            num_virtual_tokens=rows.shape[0],
            token_dim=rows.shape[1],
            num_layers=model.config.num_hidden_layers,
            num_attention_heads=model.config.num_attention_heads,
            prompt_tuning_init=config.prompt_tuning_init if config else "random",
            prompt_tuning_init_text=config.prompt_tuning_init_text if config else None,
            tokenizer_name_or_path=base_name,
            base_model_name_or_path=base_name,
        )

    def saved_meta(self, info: dict, config: PromptTuningConfig | None) -> dict:
        return {**info, "prompt_tuning_init": config.prompt_tuning_init if config else None}

    def served_prefix(
        self, model, rows: torch.Tensor, shape: PrefixShape, dtype: torch.dtype
    ) -> PromptPrefix:
        """Its keys and values at positions 0..n-1: one forward over the rows."""
        return inject.prompt_prefix(model, rows)
