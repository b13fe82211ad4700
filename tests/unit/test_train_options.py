"""Training options each doing what it says: early stopping, Adafactor, schedules, bf16 autocast,
free-form tasks, --test-data, --hard-prompt, and resume refusing a changed run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from softprompt.data import Task, Template, load_examples
from softprompt.errors import ConfigError
from softprompt.prompting.prompted import PromptedModel
from softprompt.prompting.soft import PromptTuningConfig
from softprompt.training.evaluation import (
    evaluate_classification,
    evaluate_task,
    generation_metrics,
    token_f1,
)
from softprompt.training.trainer import EvalSet, TrainConfig, Trainer

from ..conftest import write_sentiment_jsonl
from .training_fixtures import TEMPLATE, train_setup


def _train(model, tokenizer, tmp_path, **config):
    prompted, task, examples = train_setup(model, tokenizer, tmp_path)
    config = TrainConfig(
        **{
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "bf16": "no",
            "eval_steps": 2,
            **config,
        }
    )
    trainer = Trainer(prompted, examples, config, eval_sets={"sentiment": EvalSet(task, examples)})
    return trainer, trainer.train()


def test_early_stopping_stops_after_patience_validations_without_improvement(
    tiny_llama, tiny_tokenizer, tmp_path
):
    # a learning rate this small cannot move the accuracy: every validation after step 0 is "no better"
    trainer, result = _train(
        tiny_llama,
        tiny_tokenizer,
        tmp_path,
        max_steps=20,
        eval_steps=2,
        learning_rate=1e-12,
        early_stopping_patience=2,
    )
    # step 0 is the untrained reference, not a candidate: best at 2, then 4 and 6 are no better
    assert result.steps == 6 and result.best_step == 2
    _, without = _train(
        tiny_llama, tiny_tokenizer, tmp_path, max_steps=20, eval_steps=2, learning_rate=1e-12
    )
    assert without.steps == 20


def test_adafactor_trains_the_prompt(tiny_llama, tiny_tokenizer, tmp_path):
    trainer, result = _train(
        tiny_llama,
        tiny_tokenizer,
        tmp_path,
        optimizer="adafactor",
        learning_rate=0.3,
        max_steps=20,
        eval_steps=20,
    )
    assert type(trainer.optimizer).__name__ == "Adafactor"
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_learning_rate_schedules_follow_their_formula(
    tiny_llama, tiny_tokenizer, tmp_path, schedule
):
    peak, warmup, steps = 0.1, 2, 10
    _, result = _train(
        tiny_llama,
        tiny_tokenizer,
        tmp_path,
        lr_scheduler_type=schedule,
        learning_rate=peak,
        warmup_steps=warmup,
        max_steps=steps,
        eval_steps=steps,
    )
    logged = [r["lr"] for r in result.history if "lr" in r]  # the rate after each step's update
    for step, lr in enumerate(logged, start=1):
        if step < warmup:
            expected = peak * step / warmup
        else:
            progress = (step - warmup) / (steps - warmup)
            expected = {
                "linear": peak * (1 - progress),
                "constant": peak,
                "cosine": peak * 0.5 * (1 + math.cos(math.pi * progress)),
            }[schedule]
        assert lr == pytest.approx(expected, abs=1e-9), (schedule, step)


def test_bf16_autocast_trains_and_evaluates_close_to_fp32(tiny_llama, tiny_tokenizer, tmp_path):
    trainer, result = _train(
        tiny_llama,
        tiny_tokenizer,
        tmp_path,
        bf16="yes",
        learning_rate=0.1,
        max_steps=10,
        eval_steps=10,
    )
    assert trainer.bf16 and all(math.isfinite(r["loss"]) for r in result.history if "loss" in r)
    assert (
        trainer.prompted.table.get("sentiment").dtype == torch.float32
    )  # the prompt itself stays fp32
    prompted, task, examples = (
        trainer.prompted,
        *train_setup(tiny_llama, tiny_tokenizer, tmp_path)[1:],
    )
    from softprompt.training.trainer import autocast

    with autocast(trainer.device, True):
        low = evaluate_classification(prompted, task, examples, "sentiment")
    full = evaluate_classification(prompted, task, examples, "sentiment")
    assert abs(low["accuracy"] - full["accuracy"]) <= 0.1


def test_free_form_task_trains_and_reports_exact_match_and_token_f1(
    tiny_llama, tiny_tokenizer, tmp_path
):
    rows = [
        {"text": "the movie", "answer": "good film"},
        {"text": "the plot", "answer": "bad plot"},
    ] * 8
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = Task(
        "qa",
        Template("review : {text} sentiment :"),
        None,
        target_column="answer",
        add_eos_to_target=True,
    )
    examples, _ = load_examples(str(path), task, tiny_tokenizer)
    prompted = PromptedModel(
        tiny_llama,
        {"qa": PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="random")},
        tokenizer=tiny_tokenizer,
    )
    before = evaluate_task(prompted, task, examples, "qa", max_new_tokens=3)
    Trainer(
        prompted,
        examples,
        TrainConfig(
            max_steps=60, per_device_train_batch_size=8, learning_rate=0.3, eval_steps=60, bf16="no"
        ),
        eval_sets={"qa": EvalSet(task, examples)},
    ).train()
    after = evaluate_task(prompted, task, examples, "qa", max_new_tokens=3)
    assert {"exact_match", "token_f1", "loss", "n"} <= after.keys() and after["n"] == 16
    assert after["loss"] < before["loss"] and after["token_f1"] >= before["token_f1"]
    assert generation_metrics(["Good film!", "bad"], ["good film", "bad plot"]) == {
        "exact_match": 0.5,
        "token_f1": pytest.approx((1.0 + token_f1("bad", "bad plot")) / 2),
        "n": 2,
    }
    assert token_f1("bad", "bad plot") == pytest.approx(2 / 3)


def test_resume_with_changed_training_settings_is_refused_naming_them(
    tiny_llama, tiny_tokenizer, tmp_path
):
    prompted, task, examples = train_setup(tiny_llama, tiny_tokenizer, tmp_path)
    config = TrainConfig(
        max_steps=4, per_device_train_batch_size=4, eval_steps=2, bf16="no", learning_rate=0.1
    )
    Trainer(prompted, examples, config, output_dir=tmp_path / "run").train()
    changed = TrainConfig(
        max_steps=4, per_device_train_batch_size=4, eval_steps=2, bf16="no", learning_rate=0.2
    )
    with pytest.raises(ConfigError, match=r"learning_rate 0\.1 -> 0\.2.*new --output-dir"):
        Trainer(prompted, examples, changed, output_dir=tmp_path / "run").load_checkpoint()
    watched_differently = TrainConfig(
        max_steps=4,
        per_device_train_batch_size=4,
        eval_steps=1,
        bf16="no",
        learning_rate=0.1,
        save_steps=3,
    )
    assert Trainer(
        prompted, examples, watched_differently, output_dir=tmp_path / "run"
    ).load_checkpoint()


def test_cli_test_data_and_hard_prompt(tiny_model_dir, tmp_path, capsys):
    from softprompt.cli import main

    data = write_sentiment_jsonl(tmp_path / "d.jsonl", repeats=1)
    code = main(
        [
            "train",
            "--model",
            tiny_model_dir,
            "--task",
            "sentiment",
            "--data",
            data,
            "--eval-data",
            data,
            "--test-data",
            data,
            "--template",
            TEMPLATE,
            "--labels",
            "negative,positive",
            "--max-steps",
            "2",
            "--eval-steps",
            "2",
            "--bank",
            str(tmp_path / "bank"),
            "--output-dir",
            str(tmp_path / "run"),
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    entry = summary["tasks"]["sentiment"]
    assert entry["test_zero_shot"]["n"] == 10 and entry["test_tuned"]["n"] == 10
    args = [
        "eval",
        "--model",
        tiny_model_dir,
        "--zero-shot",
        "--template",
        TEMPLATE,
        "--labels",
        "negative,positive",
        "--data",
        data,
        "--json",
    ]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--hard-prompt", "classify this review :"]) == 0
    hard = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        plain["template"] == TEMPLATE and hard["template"] == "classify this review : " + TEMPLATE
    )
