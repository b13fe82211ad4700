"""Helpers the training tests share: a tiny training setup, the CLI command, and a trainer that
can be killed at a chosen step. Test files import shared helpers from fixtures modules like
this one (or conftest), never from another test file."""

from __future__ import annotations

import sys

from softprompt.data import load_examples, make_classification_task
from softprompt.prompting.prompted import PromptedModel
from softprompt.prompting.soft import PromptTuningConfig
from softprompt.training.trainer import EvalSet, TrainConfig, Trainer

from ..conftest import write_sentiment_jsonl

TEMPLATE = "review : {text} sentiment :"


def train_setup(tiny_model, tiny_tokenizer, tmp_path):
    task = make_classification_task("sentiment", TEMPLATE, ["negative", "positive"])
    examples, _ = load_examples(
        write_sentiment_jsonl(tmp_path / "train.jsonl"), task, tiny_tokenizer
    )
    config = PromptTuningConfig(
        num_virtual_tokens=4, prompt_tuning_init="text", prompt_tuning_init_text="classify"
    )
    return (
        PromptedModel(tiny_model, {"sentiment": config}, tokenizer=tiny_tokenizer),
        task,
        examples,
    )


def train_cmd(model_dir, data, bank, out, steps, *extra, launcher=None):
    cmd = (launcher or [sys.executable, "-m"]) + [
        "softprompt",
        "train",
        "--model",
        model_dir,
        "--task",
        "sentiment",
        "--data",
        data,
        "--eval-data",
        data,
        "--template",
        TEMPLATE,
        "--labels",
        "negative,positive",
        "--num-virtual-tokens",
        "4",
        "--prompt-tuning-init-text",
        "classify",
        "--max-steps",
        str(steps),
        "--eval-steps",
        "5",
        "--learning-rate",
        "0.05",
        "--bf16",
        "no",
        "--bank",
        str(bank),
        "--output-dir",
        str(out),
        *extra,
    ]
    return cmd


class Killed(Exception):
    """Stands for kill -9 in the middle of a step."""


def make_trainer(tiny_llama, tiny_tokenizer, tmp_path, out, **config):
    prompted, task, examples = train_setup(tiny_llama, tiny_tokenizer, tmp_path)
    config = TrainConfig(
        **{
            "max_steps": 8,
            "per_device_train_batch_size": 4,
            "eval_steps": 100,
            "save_steps": 3,
            "bf16": "no",
            **config,
        }
    )
    return Trainer(
        prompted, examples, config, eval_sets={"sentiment": EvalSet(task, examples)}, output_dir=out
    )


def die_at(step):
    def on_step(record):
        if record["step"] == step:
            raise Killed

    return on_step
