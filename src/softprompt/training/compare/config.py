"""What `softprompt compare` runs (one config, every method the same budget) and what each method hands the measuring code."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softprompt.data import Example, Task
from softprompt.errors import ConfigError
from softprompt.options import opt
from softprompt.prompting.kinds import default_learning_rate
from softprompt.prompting.soft import PromptTuningConfig

log = logging.getLogger(__name__)


METHODS = ("zero_shot", "prompt", "deep_prompt", "lora", "full")
PROMPT_KINDS = {"prompt": "soft", "deep_prompt": "deep"}
"""The methods that train a prompt, and its kind (prompting/kinds.py)."""
TASK = "compare"
Progress = Callable[[dict], None]


@dataclass
class CompareConfig:
    """What `softprompt compare` runs; every method gets the same budget."""

    methods: list[str] = opt(
        ["prompt", "deep_prompt", "lora", "full"],
        "Methods to compare: prompt, deep_prompt, lora, full (zero_shot is always added).",
    )
    max_steps: int = opt(100, "Optimizer steps per method.")
    per_device_train_batch_size: int = opt(8, "Examples per step (the same for every method).")
    learning_rate_prompt: float = opt(
        default_learning_rate(PROMPT_KINDS["prompt"]),
        "Peak learning rate of prompt tuning (softprompt's soft-prompt default).",
    )
    learning_rate_deep_prompt: float = opt(
        default_learning_rate(PROMPT_KINDS["deep_prompt"]),
        "Peak learning rate of deep prompts (softprompt's default; P-tuning v2 uses 5e-3..1e-2).",
    )
    learning_rate_lora: float = opt(
        1e-3, "Peak learning rate of LoRA (the best of 1e-4..3e-3 in bench/quality_sst2.py)."
    )
    learning_rate_full: float = opt(
        1e-4,
        "Peak learning rate of full fine-tuning (the best of 1e-5..1e-4 in bench/quality_sst2.py).",
    )
    warmup_steps: int = opt(10, "Linear warmup steps (every method).")
    num_virtual_tokens: int = opt(
        PromptTuningConfig.num_virtual_tokens,
        "Virtual tokens of the prompt and of the deep prompt.",
    )
    prompt_tuning_init: str = opt(
        PromptTuningConfig.prompt_tuning_init,
        "Initial prompt (deep prompt: its KV): text, random, sampled_vocab, class_labels.",
    )
    prompt_tuning_init_text: str | None = opt(
        None, "Init text (default: 'Classify as A or B:' from the labels, as `softprompt train`)."
    )
    lora_r: int = opt(8, "LoRA rank.")
    lora_alpha: int = opt(16, "LoRA scaling alpha.")
    lora_target_modules: list[str] = opt(["q_proj", "v_proj"], "Modules LoRA adapts.")
    max_train_examples: int = opt(
        0, "Train on a seeded sample of at most this many examples (0 = all)."
    )
    max_eval_examples: int = opt(
        0,
        "Evaluate on a random sample of at most this many examples, the same rows for every "
        "method and seed (0 = all).",
    )
    eval_batch_size: int = opt(32, "Rows per evaluation forward.")
    max_length: int = opt(256, "Truncate input + target to this many tokens.")
    switch_repeats: int = opt(5, "Task-switch timings per method (the median is reported).")
    bf16: str = opt("auto", "bf16 autocast for every method: auto, yes, no.")
    seed: int = opt(0, "Seed of the data samples (and of the runs when seeds is empty).")
    seeds: list[int] = opt(
        [],
        "Run every method once per seed (batch order, init); the table "
        "reports the mean +- std across seeds. Empty: the one --seed.",
    )
    keep_saved: bool = opt(
        False, "Keep each method's saved task under output-dir/saved (full = a model copy)."
    )

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(
                f"unknown method(s) {unknown or self.methods}; choose from {', '.join(METHODS)}"
            )
        for name in (
            "max_steps",
            "per_device_train_batch_size",
            "switch_repeats",
            "num_virtual_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")

    def learning_rate(self, method: str) -> float:
        return getattr(self, f"learning_rate_{method}")


@dataclass
class CompareData:
    task: Task
    train: list[Example]
    eval: list[Example]


@dataclass
class MethodRun:
    """One method ready to train: the object the Trainer takes and how its task goes to disk."""

    method: str
    model: torch.nn.Module
    """What Trainer trains and evaluate_task evaluates (`.model`, `.tokenizer`, `.table`, `.loss`, `.last_logits`)."""
    task_name: str | None
    """Its task in `model.table` (None: the weights themselves are the task)."""
    expected_trainable: int
    """Trainable parameters computed from shapes (checked against the count)."""
    save: Callable[[Path], Path] | None = None
    """Write the task to a folder; returns the folder."""
    load: Callable[[Path], object] | None = None
    """Load the saved task back until it is usable (the task switch); returns what to release."""
    release: Callable[[object], None] = field(default=lambda _: None)
