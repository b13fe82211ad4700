"""The training loop: frozen base, learning, resume after kill -9, 2-process == 1-process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from softprompt.bank import PromptBank
from softprompt.errors import ConfigError
from softprompt.training.evaluation import evaluate_loss
from softprompt.training.trainer import EvalSet, TrainConfig, Trainer

from ..conftest import write_sentiment_jsonl
from .training_fixtures import TEMPLATE, Killed, die_at, make_trainer, train_cmd, train_setup


def test_frozen_base_bit_identical_after_training(tiny_model, tiny_tokenizer, tmp_path):
    prompted, task, examples = train_setup(tiny_model, tiny_tokenizer, tmp_path)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer = Trainer(
        prompted,
        examples,
        TrainConfig(max_steps=5, per_device_train_batch_size=4, eval_steps=5, bf16="no"),
        eval_sets={"sentiment": EvalSet(task, examples)},
    )
    assert trainer.trainable_parameter_count == 1 * 4 * 32
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_training_lowers_loss_and_logs_monitoring(tiny_model, tiny_tokenizer, tmp_path):
    prompted, task, examples = train_setup(tiny_model, tiny_tokenizer, tmp_path)
    start = evaluate_loss(prompted, examples, "sentiment")
    config = TrainConfig(
        max_steps=30, per_device_train_batch_size=8, learning_rate=0.1, eval_steps=10, bf16="no"
    )
    result = Trainer(
        prompted,
        examples,
        config,
        eval_sets={"sentiment": EvalSet(task, examples)},
        output_dir=tmp_path / "run",
    ).train()
    assert evaluate_loss(prompted, examples, "sentiment") < start - 0.05
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 31 and len(lines[1]["prompt_grad_norms"]["sentiment"]) == 4
    assert [r["step"] for r in lines if "validation" in r] == [0, 10, 20, 30]
    assert result.best_step in (10, 20, 30) and result.examples_per_second > 0


def test_exploding_gradient_is_warned(tiny_model, tiny_tokenizer, tmp_path, caplog):
    prompted, _, examples = train_setup(tiny_model, tiny_tokenizer, tmp_path)
    config = TrainConfig(
        max_steps=2, per_device_train_batch_size=4, exploding_grad_norm=1e-9, bf16="no"
    )
    with caplog.at_level("WARNING"):
        Trainer(prompted, examples, config).train()
    assert "exploding gradient" in caplog.text


def _final_prompt(bank):
    return PromptBank(bank).load("sentiment").embeddings


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_distributed_two_processes_equal_one_process(tiny_model_dir, tmp_path):
    data = write_sentiment_jsonl(tmp_path / "train.jsonl")
    one = subprocess.run(
        train_cmd(
            tiny_model_dir,
            data,
            tmp_path / "bank-1",
            tmp_path / "run-1",
            6,
            "--per-device-train-batch-size",
            "8",
        ),
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    # on a CPU-only machine accelerate's torchrun launcher (--multi_gpu) falls back to gloo (MULTI_CPU)
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
        "-m",
    ]
    two = subprocess.run(
        train_cmd(
            tiny_model_dir,
            data,
            tmp_path / "bank-2",
            tmp_path / "run-2",
            6,
            "--per-device-train-batch-size",
            "4",
            launcher=launcher,
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stderr
    torch.testing.assert_close(
        _final_prompt(tmp_path / "bank-2"), _final_prompt(tmp_path / "bank-1"), atol=1e-5, rtol=1e-4
    )


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_fsdp_two_processes_shard_the_frozen_base_and_equal_one_process(tiny_model_dir, tmp_path):
    """`accelerate launch --use_fsdp`: decoder layers sharded over 2 gloo CPU processes, the prompt
    replicated; the trained prompt equals one whole-model process on the same global batches."""
    data = write_sentiment_jsonl(tmp_path / "train.jsonl")
    one = subprocess.run(
        train_cmd(
            tiny_model_dir,
            data,
            tmp_path / "bank-1",
            tmp_path / "run-1",
            6,
            "--per-device-train-batch-size",
            "8",
            "--test-data",
            data,
        ),
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--use_fsdp",
        "--fsdp_version",
        "2",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29600 + os.getpid() % 1000),
        "-m",
    ]
    two = subprocess.run(
        train_cmd(
            tiny_model_dir,
            data,
            tmp_path / "bank-2",
            tmp_path / "run-2",
            6,
            "--per-device-train-batch-size",
            "4",
            "--test-data",
            data,
            launcher=launcher,
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes (FSDP: 2 layers sharded)" in two.stderr  # the tiny Llama has 2 layers
    torch.testing.assert_close(
        _final_prompt(tmp_path / "bank-2"), _final_prompt(tmp_path / "bank-1"), atol=1e-5, rtol=1e-4
    )
    tuned = [
        json.loads((tmp_path / f"run-{n}" / "summary.json").read_text())["tasks"]["sentiment"][
            "test_tuned"
        ]
        for n in (1, 2)
    ]
    assert tuned[0]["accuracy"] == tuned[1]["accuracy"]


def test_sharding_splits_each_decoder_layer_and_refuses_a_trainable_base(tiny_llama):
    from softprompt.errors import ConfigError
    from softprompt.training.sharding import decoder_layers, shard_frozen_base

    assert len(decoder_layers(tiny_llama)) == 2
    with pytest.raises(ConfigError, match="frozen base"):
        shard_frozen_base(tiny_llama, torch.device("cpu"), 2)  # build_tiny_model leaves grads on


def test_train_prompts_api_remembers_template_for_save(tiny_model, tiny_tokenizer, tmp_path):
    from softprompt import train_prompts

    prompted, _, _ = train_setup(tiny_model, tiny_tokenizer, tmp_path)
    data = write_sentiment_jsonl(tmp_path / "api.jsonl")
    result = train_prompts(
        prompted,
        data,
        task="sentiment",
        template=TEMPLATE,
        labels=["negative", "positive"],
        eval_data=data,
        max_steps=3,
        eval_steps=3,
        per_device_train_batch_size=4,
        bf16="no",
    )
    assert result.steps == 3 and result.best_metric is not None
    saved = PromptBank(prompted.save_task("sentiment", tmp_path / "bank").parent).load("sentiment")
    assert saved.meta["template"] == TEMPLATE and saved.meta["verbalizer"]["labels"] == [
        "negative",
        "positive",
    ]


def test_non_finite_gradient_step_is_skipped_and_counted(
    tiny_llama, tiny_tokenizer, tmp_path, caplog
):
    prompted, _, examples = train_setup(tiny_llama, tiny_tokenizer, tmp_path)
    start = prompted.table.get("sentiment").detach().clone()
    poison = tiny_llama.get_input_embeddings().register_forward_hook(
        lambda m, i, out: out * float("nan")
    )
    trainer = Trainer(
        prompted, examples, TrainConfig(max_steps=1, per_device_train_batch_size=4, bf16="no")
    )
    with caplog.at_level("WARNING"):
        record = trainer.train_step()
    poison.remove()
    assert record["skipped"] and trainer.skipped_steps == 1 and "update skipped" in caplog.text
    assert torch.equal(prompted.table.get("sentiment").detach(), start)  # the prompt survived
    assert all(
        torch.isfinite(v).all()
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def test_lr_finder_returns_a_finite_rate_from_a_real_loss_curve_and_restores_the_prompt(
    tiny_llama, tiny_tokenizer, tmp_path
):
    from softprompt.training.lr_find import find_learning_rate

    prompted, _, examples = train_setup(tiny_llama, tiny_tokenizer, tmp_path)
    start = prompted.table.get("sentiment").detach().clone()
    search = find_learning_rate(
        prompted,
        examples,
        TrainConfig(per_device_train_batch_size=8, bf16="no"),
        min_lr=1e-4,
        max_lr=100.0,
        steps=30,
    )
    assert (
        1e-5 <= search.suggested <= 10.0 and search.suggested == search.suggested
    )  # finite, in range
    assert len(search.losses) == len(search.learning_rates) >= 5
    assert search.learning_rates == sorted(search.learning_rates)  # the rate really grew
    assert max(search.losses) > min(search.losses)  # a real curve, not a constant
    assert torch.equal(
        prompted.table.get("sentiment").detach(), start
    )  # the search leaves no trace


def _trained_prompt(tiny_tokenizer, tmp_path, seed: int) -> torch.Tensor:
    from ..conftest import build_tiny_model

    prompted, _, examples = train_setup(build_tiny_model("llama"), tiny_tokenizer, tmp_path)
    Trainer(
        prompted,
        examples,
        TrainConfig(
            max_steps=4, per_device_train_batch_size=4, bf16="no", seed=seed, learning_rate=0.05
        ),
    ).train()
    return prompted.table.get("sentiment").detach().clone()


def test_seeds_same_seed_same_prompt_other_seed_other_prompt(tiny_tokenizer, tmp_path):
    first, again = (
        _trained_prompt(tiny_tokenizer, tmp_path, 0),
        _trained_prompt(tiny_tokenizer, tmp_path, 0),
    )
    other = _trained_prompt(tiny_tokenizer, tmp_path, 1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_step_zero_validation_is_logged_with_the_zero_shot_reference(
    tiny_llama, tiny_tokenizer, tmp_path
):
    from softprompt.training.plots import plot_training

    prompted, task, examples = train_setup(tiny_llama, tiny_tokenizer, tmp_path)
    trainer = Trainer(
        prompted,
        examples,
        TrainConfig(max_steps=2, per_device_train_batch_size=4, eval_steps=2, bf16="no"),
        eval_sets={"sentiment": EvalSet(task, examples)},
        output_dir=tmp_path / "run",
    )
    trainer.train()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and "loss" not in first
    assert first["validation"]["tasks"]["sentiment"]["n"] == len(examples)
    assert first["validation"]["zero_shot"]["tasks"]["sentiment"]["n"] == len(examples)
    plots = plot_training(tmp_path / "run" / "metrics.jsonl", tmp_path / "run")
    assert tmp_path / "run" / "validation.png" in plots


def test_max_eval_examples_validates_on_one_random_sample_not_the_head_of_a_sorted_file(
    tiny_llama, tiny_tokenizer, tmp_path
):
    prompted, task, examples = train_setup(tiny_llama, tiny_tokenizer, tmp_path)
    by_label = sorted(
        examples, key=lambda ex: -ex.label
    )  # all positives first, as the built-in sets are
    trainer = Trainer(
        prompted,
        examples,
        TrainConfig(
            max_steps=2,
            per_device_train_batch_size=4,
            eval_steps=1,
            max_eval_examples=10,
            bf16="no",
        ),
        eval_sets={"sentiment": EvalSet(task, by_label)},
        output_dir=tmp_path / "run",
    )
    trainer.train()
    lines = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    validations = [
        line["validation"]["tasks"]["sentiment"] for line in lines if "validation" in line
    ]
    assert len(validations) == 3 and all(v["n"] == 10 for v in validations)
    rows_per_label = [sum(row) for row in validations[0]["confusion_matrix"]]
    assert (
        min(rows_per_label) > 0
    )  # the head of the file is 20 positives: both labels means a sample
    assert [
        sum(row) for row in validations[-1]["confusion_matrix"]
    ] == rows_per_label  # the same rows each time


def test_resume_after_kill_9_before_the_first_evaluation_matches_uninterrupted_run(
    tiny_model_dir, tmp_path
):
    data = write_sentiment_jsonl(tmp_path / "train.jsonl", repeats=8)
    steps, flags = (
        60,
        ("--eval-steps", "40", "--save-steps", "5", "--save-minutes", "0"),
    )  # evaluations at 40, 60
    subprocess.run(
        train_cmd(tiny_model_dir, data, tmp_path / "bank-a", tmp_path / "run-a", steps, *flags),
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        train_cmd(tiny_model_dir, data, tmp_path / "bank-b", tmp_path / "run-b", steps, *flags),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "run-b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.is_file() and len(metrics.read_text().splitlines()) >= 12
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 40, "killed after the first evaluation: nothing was tested"
    resumed = subprocess.run(
        train_cmd(
            tiny_model_dir, data, tmp_path / "bank-b", tmp_path / "run-b", steps, *flags, "--resume"
        ),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    resumed_at = int(resumed.stderr.split("resumed from step ")[1].split()[0])
    assert 10 <= resumed_at <= killed_at and resumed_at % 5 == 0, resumed.stderr
    torch.testing.assert_close(
        _final_prompt(tmp_path / "bank-b"), _final_prompt(tmp_path / "bank-a"), atol=1e-6, rtol=0
    )
    steps_logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps_logged == list(range(0, steps + 1))  # step 0: the untrained validation


def test_resume_tolerates_a_torn_last_line_and_rewrites_the_log_to_the_checkpoint(
    tiny_llama, tiny_tokenizer, tmp_path
):
    uninterrupted = make_trainer(tiny_llama, tiny_tokenizer, tmp_path, tmp_path / "whole")
    uninterrupted.train()
    first = make_trainer(tiny_llama, tiny_tokenizer, tmp_path, tmp_path / "run")
    first.on_step = die_at(5)
    with pytest.raises(Killed):
        first.train()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 0.6')  # the write that power loss cut short
    second = make_trainer(tiny_llama, tiny_tokenizer, tmp_path, tmp_path / "run")
    assert second.load_checkpoint() and second.step == 3
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [
        0,
        1,
        2,
        3,
    ]  # 0: untrained
    second.train()
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(0, 9))
    torch.testing.assert_close(second.params[0], uninterrupted.params[0], atol=1e-6, rtol=0)


def test_resume_without_any_checkpoint_starts_over_with_a_clean_log(
    tiny_llama, tiny_tokenizer, tmp_path
):
    first = make_trainer(tiny_llama, tiny_tokenizer, tmp_path, tmp_path / "run", save_steps=0)
    first.on_step = die_at(3)
    with pytest.raises(Killed):
        first.train()
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert (
        len(metrics.read_text().splitlines()) == 3
        and not (tmp_path / "run" / "checkpoint.pt").exists()
    )
    second = make_trainer(tiny_llama, tiny_tokenizer, tmp_path, tmp_path / "run", save_steps=0)
    assert not second.load_checkpoint() and metrics.read_text() == ""
    second.train()
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(0, 9))


def test_resume_a_fresh_run_in_a_used_folder_never_picks_up_the_old_checkpoint(
    tiny_llama, tiny_tokenizer, tmp_path
):
    make_trainer(
        tiny_llama, tiny_tokenizer, tmp_path, tmp_path / "run"
    ).train()  # an old, finished run
    fresh = make_trainer(tiny_llama, tiny_tokenizer, tmp_path, tmp_path / "run", save_steps=0)
    fresh.on_step = die_at(2)
    with pytest.raises(Killed):
        fresh.train()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert [
        json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ] == [0, 1]


def test_resume_checkpoints_on_the_wall_clock_too(
    tiny_llama, tiny_tokenizer, tmp_path, monkeypatch
):
    clock = iter(range(0, 10_000, 20))  # each look at the clock is 20 s later
    monkeypatch.setattr("softprompt.training.trainer.time.monotonic", lambda: next(clock))
    trainer = make_trainer(
        tiny_llama, tiny_tokenizer, tmp_path, tmp_path / "run", save_steps=0, save_minutes=0.5
    )
    saved, save = [], trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda: (saved.append(trainer.step), save()))
    trainer.train()
    assert saved == [2, 4, 6, 8]  # 40 s after the last checkpoint, 30 s asked for; and at the end


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("learning_rate", -1.0, "learning_rate must be a finite number > 0"),
        ("learning_rate", float("nan"), "learning_rate must be a finite number > 0"),
        ("learning_rate", 0.0, "> 0"),
        ("weight_decay", float("inf"), "weight_decay must be a finite number >= 0"),
        ("save_minutes", -5.0, "save_minutes"),
        ("save_steps", -1, "save_steps"),
    ],
)
def test_bad_input_train_config_numbers_are_config_errors(field, value, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        TrainConfig(**{field: value})
