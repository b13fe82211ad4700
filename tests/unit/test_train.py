"""The training loop: frozen base, learning, resume after kill -9, 2-process == 1-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from softprompt.bank import PromptBank
from softprompt.data import load_examples, make_classification_task
from softprompt.evaluate import evaluate_loss
from softprompt.prompted import PromptedModel
from softprompt.prompts import PromptTuningConfig
from softprompt.train import EvalSet, TrainConfig, Trainer

from ..conftest import write_sentiment_jsonl

TEMPLATE = "review : {text} sentiment :"


def _setup(tiny_model, tiny_tokenizer, tmp_path):
    task = make_classification_task("sentiment", TEMPLATE, ["negative", "positive"])
    examples, _ = load_examples(write_sentiment_jsonl(tmp_path / "train.jsonl"), task, tiny_tokenizer)
    config = PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="text", prompt_tuning_init_text="classify")
    return PromptedModel(tiny_model, {"sentiment": config}, tokenizer=tiny_tokenizer), task, examples


def test_frozen_base_bit_identical_after_training(tiny_model, tiny_tokenizer, tmp_path):
    prompted, task, examples = _setup(tiny_model, tiny_tokenizer, tmp_path)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer = Trainer(prompted, examples, TrainConfig(max_steps=5, per_device_train_batch_size=4, eval_steps=5,
                                                      bf16="no"), eval_sets={"sentiment": EvalSet(task, examples)})
    assert trainer.trainable_parameter_count == 1 * 4 * 32
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_training_lowers_loss_and_logs_monitoring(tiny_model, tiny_tokenizer, tmp_path):
    prompted, task, examples = _setup(tiny_model, tiny_tokenizer, tmp_path)
    start = evaluate_loss(prompted, examples, "sentiment")
    config = TrainConfig(max_steps=30, per_device_train_batch_size=8, learning_rate=0.1, eval_steps=10, bf16="no")
    result = Trainer(prompted, examples, config, eval_sets={"sentiment": EvalSet(task, examples)},
                     output_dir=tmp_path / "run").train()
    assert evaluate_loss(prompted, examples, "sentiment") < start - 0.05
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and len(lines[0]["prompt_grad_norms"]["sentiment"]) == 4
    assert [r["step"] for r in lines if "validation" in r] == [10, 20, 30]
    assert result.best_step in (10, 20, 30) and result.examples_per_second > 0


def test_exploding_gradient_is_warned(tiny_model, tiny_tokenizer, tmp_path, caplog):
    prompted, _, examples = _setup(tiny_model, tiny_tokenizer, tmp_path)
    config = TrainConfig(max_steps=2, per_device_train_batch_size=4, exploding_grad_norm=1e-9, bf16="no")
    with caplog.at_level("WARNING"):
        Trainer(prompted, examples, config).train()
    assert "exploding gradient" in caplog.text


def _train_cmd(model_dir, data, bank, out, steps, *extra, launcher=None):
    cmd = (launcher or [sys.executable, "-m"]) + [
        "softprompt", "train", "--model", model_dir, "--task", "sentiment", "--data", data,
        "--eval-data", data, "--template", TEMPLATE, "--labels", "negative,positive",
        "--num-virtual-tokens", "4", "--prompt-tuning-init-text", "classify", "--max-steps", str(steps),
        "--eval-steps", "5", "--learning-rate", "0.05", "--bf16", "no", "--bank", str(bank),
        "--output-dir", str(out), *extra]
    return cmd


def _final_prompt(bank):
    return PromptBank(bank).load("sentiment").embeddings


def test_resume_after_kill_9_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    data = write_sentiment_jsonl(tmp_path / "train.jsonl", repeats=8)
    steps = 80
    subprocess.run(_train_cmd(tiny_model_dir, data, tmp_path / "bank-a", tmp_path / "run-a", steps), check=True,
                   capture_output=True)
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, data, tmp_path / "bank-b", tmp_path / "run-b", steps),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run-b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 12):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "bank-b" / "sentiment").exists()
    resumed = subprocess.run(_train_cmd(tiny_model_dir, data, tmp_path / "bank-b", tmp_path / "run-b", steps,
                                        "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    torch.testing.assert_close(_final_prompt(tmp_path / "bank-b"), _final_prompt(tmp_path / "bank-a"),
                               atol=1e-6, rtol=0)
    steps_logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_distributed_two_processes_equal_one_process(tiny_model_dir, tmp_path):
    data = write_sentiment_jsonl(tmp_path / "train.jsonl")
    one = subprocess.run(_train_cmd(tiny_model_dir, data, tmp_path / "bank-1", tmp_path / "run-1", 6,
                                    "--per-device-train-batch-size", "8"), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    # on a CPU-only machine accelerate's torchrun launcher (--multi_gpu) falls back to gloo (MULTI_CPU)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(29500 + os.getpid() % 1000), "-m"]
    two = subprocess.run(_train_cmd(tiny_model_dir, data, tmp_path / "bank-2", tmp_path / "run-2", 6,
                                    "--per-device-train-batch-size", "4", launcher=launcher),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stderr
    torch.testing.assert_close(_final_prompt(tmp_path / "bank-2"), _final_prompt(tmp_path / "bank-1"),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_fsdp_two_processes_shard_the_frozen_base_and_equal_one_process(tiny_model_dir, tmp_path):
    """`accelerate launch --use_fsdp`: decoder layers sharded over 2 gloo CPU processes, the prompt
    replicated; the trained prompt equals one whole-model process on the same global batches."""
    data = write_sentiment_jsonl(tmp_path / "train.jsonl")
    one = subprocess.run(_train_cmd(tiny_model_dir, data, tmp_path / "bank-1", tmp_path / "run-1", 6,
                                    "--per-device-train-batch-size", "8", "--test-data", data),
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(29600 + os.getpid() % 1000), "-m"]
    two = subprocess.run(_train_cmd(tiny_model_dir, data, tmp_path / "bank-2", tmp_path / "run-2", 6,
                                    "--per-device-train-batch-size", "4", "--test-data", data, launcher=launcher),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes (FSDP: 2 layers sharded)" in two.stderr  # the tiny Llama has 2 layers
    torch.testing.assert_close(_final_prompt(tmp_path / "bank-2"), _final_prompt(tmp_path / "bank-1"),
                               atol=1e-5, rtol=1e-4)
    tuned = [json.loads((tmp_path / f"run-{n}" / "summary.json").read_text())["tasks"]["sentiment"]["test_tuned"]
             for n in (1, 2)]
    assert tuned[0]["accuracy"] == tuned[1]["accuracy"]


def test_sharding_splits_each_decoder_layer_and_refuses_a_trainable_base(tiny_llama):
    from softprompt.errors import ConfigError
    from softprompt.sharding import decoder_layers, shard_frozen_base

    assert len(decoder_layers(tiny_llama)) == 2
    with pytest.raises(ConfigError, match="frozen base"):
        shard_frozen_base(tiny_llama, torch.device("cpu"), 2)  # build_tiny_model leaves grads on


def test_train_prompts_api_remembers_template_for_save(tiny_model, tiny_tokenizer, tmp_path):
    from softprompt import train_prompts

    prompted, _, _ = _setup(tiny_model, tiny_tokenizer, tmp_path)
    data = write_sentiment_jsonl(tmp_path / "api.jsonl")
    result = train_prompts(prompted, data, task="sentiment", template=TEMPLATE, labels=["negative", "positive"],
                           eval_data=data, max_steps=3, eval_steps=3, per_device_train_batch_size=4, bf16="no")
    assert result.steps == 3 and result.best_metric is not None
    saved = PromptBank(prompted.save_task("sentiment", tmp_path / "bank").parent).load("sentiment")
    assert saved.meta["template"] == TEMPLATE and saved.meta["verbalizer"]["labels"] == ["negative", "positive"]
