"""Measuring one method: train, evaluate, save and switch, memory, and the frozen-base digest."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import logging
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator

from softprompt.model.loading import LoadedModel
from softprompt.prompting.soft import NO_TASK
from softprompt.training.compare.config import CompareConfig, CompareData, MethodRun, Progress
from softprompt.training.compare.methods import build_method
from softprompt.training.evaluation import evaluate_task
from softprompt.training.trainer import TrainConfig, Trainer, autocast

log = logging.getLogger(__name__)


def run_method(
    method: str,
    loaded: LoadedModel,
    data: CompareData,
    config: CompareConfig,
    accelerator: Accelerator,
    workdir: Path,
    progress: Progress | None,
) -> dict:
    """Train, evaluate and save one method on `loaded`: its row of the comparison table."""
    base_bytes = _parameter_bytes(loaded.model)
    row = {
        "method": method,
        "learning_rate": None,
        "total_params": sum(p.numel() for p in loaded.model.parameters()),
    }
    # Full fine-tuning is digested too: its row shows the same check seeing a trained base change
    # (LoRA adds modules to the model object, so its digest would say nothing about the base).
    base_digest = (
        model_digest(loaded.model) if method in ("prompt", "deep_prompt", "full") else None
    )
    run = build_method(method, loaded, config, data.task.verbalizer.labels)
    row |= _train(run, data, config, accelerator, progress)
    if base_digest is not None:
        row["base_unchanged"] = model_digest(loaded.model) == base_digest
        if not row["base_unchanged"] and method != "full":
            raise AssertionError(f"{method} changed the frozen base model")
    _notify(progress, method, "evaluate")
    row |= _evaluate(run, data, config, accelerator)
    _notify(progress, method, "save and switch")
    row |= _save_and_switch(run, workdir, config.switch_repeats)
    row["memory_bytes_100_tasks"] = _memory_100_tasks(method, base_bytes, row)
    row["memory_100_tasks_basis"] = _MEMORY_BASIS[method]
    log.info(
        "%s: accuracy %.4f, %s trainable parameters",
        method,
        row["accuracy"],
        row["trainable_params"],
    )
    _notify(progress, method, "done", accuracy=row["accuracy"])
    return row


def _notify(progress: Progress | None, method: str, stage: str, **extra) -> None:
    if progress:
        progress({"method": method, "stage": stage, **extra})


def _train(
    run: MethodRun,
    data: CompareData,
    config: CompareConfig,
    accelerator: Accelerator,
    progress: Progress | None,
) -> dict:
    """Train through the shared Trainer; timing and peak memory of the training steps only."""
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    if trainable != run.expected_trainable:
        raise AssertionError(
            f"{run.method}: {trainable} trainable parameters, expected {run.expected_trainable}"
        )
    if run.method == "zero_shot":
        return {
            "trainable_params": 0,
            "peak_memory_bytes": None,
            "training_memory_bytes": None,
            "cuda_peak_memory_bytes": None,
            "seconds_per_step": None,
            "examples_per_second": None,
            "train_seconds": None,
            "steps": 0,
            "final_loss": None,
        }
    task_id = 0 if run.task_name else NO_TASK
    examples = [replace(ex, task_id=task_id) for ex in data.train]
    train_config = TrainConfig(
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        learning_rate=config.learning_rate(run.method),
        warmup_steps=config.warmup_steps,
        eval_steps=config.max_steps,
        bf16=config.bf16,
        seed=config.seed,
    )
    on_step = (
        (
            lambda r: progress(
                {
                    "method": run.method,
                    "stage": "train",
                    "step": r["step"],
                    "max_steps": config.max_steps,
                    "loss": r["loss"],
                }
            )
        )
        if progress
        else None
    )
    trainer = Trainer(run.model, examples, train_config, on_step=on_step, accelerator=accelerator)
    release_memory()
    with PeakMemory(trainer.device) as memory:
        result = trainer.train()
    steps = [r["seconds"] for r in result.history]
    return {
        "learning_rate": train_config.learning_rate,
        "trainable_params": trainer.trainable_parameter_count,
        "peak_memory_bytes": memory.peak_rss,
        "training_memory_bytes": memory.peak_rss - memory.start_rss,
        "cuda_peak_memory_bytes": memory.cuda_peak,
        "seconds_per_step": statistics.median(steps),
        "examples_per_second": statistics.median(
            r["examples"] / r["seconds"] for r in result.history
        ),
        "train_seconds": result.seconds,
        "steps": result.steps,
        "final_loss": result.history[-1]["loss"],
        "bf16": trainer.bf16,
    }


def _evaluate(
    run: MethodRun, data: CompareData, config: CompareConfig, accelerator: Accelerator
) -> dict:
    from softprompt.training.trainer import use_bf16

    run.model.to(accelerator.device)
    start = time.perf_counter()
    with autocast(accelerator.device, use_bf16(TrainConfig(bf16=config.bf16), accelerator.device)):
        metrics = evaluate_task(
            run.model, data.task, data.eval, run.task_name, batch_size=config.eval_batch_size
        )
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "eval_examples": metrics["n"],
        "eval_seconds": time.perf_counter() - start,
    }


def _save_and_switch(run: MethodRun, folder: Path, repeats: int) -> dict:
    """Bytes of the saved task (every file) and the median time to load it back until usable."""
    if run.save is None:
        return {
            "bytes_per_task": 0,
            "weights_bytes": 0,
            "saved_files": [],
            "task_switch_seconds": 0.0,
        }
    folder = run.save(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        handle = run.load(folder)
        _sync()
        timings.append(time.perf_counter() - start)
        run.release(handle)
        del handle
    gc.collect()
    return {
        "bytes_per_task": sum(p.stat().st_size for p in files),
        "weights_bytes": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
        "saved_files": [p.name for p in files],
        "task_switch_seconds": statistics.median(timings),
        "task_switch_how": _SWITCH_HOW[run.method],
    }


_SWITCH_HOW = {
    "prompt": "PromptedModel.load_task (from disk)",
    "deep_prompt": "PromptedModel.load_task (from disk)",
    "lora": "PeftModel.load_adapter + set_adapter (from disk)",
    "full": "AutoModelForCausalLM.from_pretrained (from disk)",
}
_MEMORY_BASIS = {
    "zero_shot": "computed: base parameters once",
    "prompt": "computed: base once + 100 x prompt tensor",
    "deep_prompt": "computed: base once + 100 x KV prefix tensor",
    "lora": "computed: base once + 100 x adapter tensors",
    "full": "computed: 100 x model parameters",
}


def _memory_100_tasks(method: str, base_bytes: int, row: dict, tasks: int = 100) -> int:
    """Bytes to hold `tasks` tasks at once: the base is shared except for full fine-tuning."""
    if method == "zero_shot":
        return base_bytes
    if method == "full":
        return tasks * base_bytes
    return base_bytes + tasks * row["trainable_params"] * 4  # task tensors are float32


def _parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so the next method's RSS
    starts from what is really in use rather than from the previous method's high-water mark."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may include freed memory
        pass


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_digest(model) -> str:
    """SHA-256 over every tensor of the state dict (bit-exact, without copying the weights)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()


class PeakMemory:
    """Peak RSS of this process, sampled in a background thread, and the CUDA peak on a GPU."""

    def __init__(self, device: torch.device | None = None, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.process = psutil.Process()
        self.start_rss = self.peak_rss = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self.start_rss = self.peak_rss = self.process.memory_info().rss
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
        if self._cuda:
            self.cuda_peak = int(torch.cuda.max_memory_allocated(self.device))

    @property
    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"
