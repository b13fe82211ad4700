"""Side-by-side comparison of tuning methods, measured on the user's own data.

Methods (all trained by the one `Trainer`, on the same examples, template, verbalizer, batch size,
step budget and seed; each on a fresh load of the base model, so none can contaminate another):

  zero_shot    no training: the template alone (reference row, accuracy only)
  prompt       soft prompt [n, d] before the input; the base stays frozen (checked bit for bit)
  deep_prompt  key/value prefix in every layer (P-tuning v2), through the KV-prefix machinery
  lora         `peft` LoRA on q_proj/v_proj; only the adapter trains
  full         every weight of the model trains

Measured: trainable parameters (counted, and checked against the count computed from shapes),
bytes per task (the files each method saves), peak RSS while training (a sampling thread; plus
CUDA peak on a GPU), seconds per step and examples/s, accuracy (rank classification), task
switch time (load a saved task from disk until it is usable). Computed: bytes to hold 100 tasks
in memory (base once + 100 task tensors; full fine-tuning: 100 model copies).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import hashlib
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator

from .data import Example, Task, Template, load_examples, make_classification_task
from .errors import ConfigError
from .evaluate import evaluate_task
from .models import LoadedModel, load_model
from .options import opt
from .prompts import NO_TASK, PromptTuningConfig
from .train import DEFAULT_LEARNING_RATE, TrainConfig, Trainer, autocast

log = logging.getLogger(__name__)

METHODS = ("zero_shot", "prompt", "deep_prompt", "lora", "full")
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
    learning_rate_prompt: float = opt(DEFAULT_LEARNING_RATE["soft"], "Peak learning rate of prompt tuning "
                                      "(softprompt's soft-prompt default).")
    learning_rate_deep_prompt: float = opt(DEFAULT_LEARNING_RATE["deep"], "Peak learning rate of deep prompts "
                                           "(softprompt's default; P-tuning v2 uses 5e-3..1e-2).")
    learning_rate_lora: float = opt(3e-3, "Peak learning rate of LoRA (the best of 1e-4..3e-3 in "
                                    "bench/quality_sst2.py).")
    learning_rate_full: float = opt(
        3e-5, "Peak learning rate of full fine-tuning (usual range 2e-5..5e-5; not screened yet)."
    )
    warmup_steps: int = opt(10, "Linear warmup steps (every method).")
    num_virtual_tokens: int = opt(16, "Virtual tokens of the prompt and of the deep prompt.")
    prompt_tuning_init: str = opt(
        "text", "Initial prompt (deep prompt: its KV): text, random, sampled_vocab, class_labels."
    )
    prompt_tuning_init_text: str | None = opt(
        None, "Init text (default: 'Classify the text as A or B:' from the labels)."
    )
    lora_r: int = opt(8, "LoRA rank.")
    lora_alpha: int = opt(16, "LoRA scaling alpha.")
    lora_target_modules: list[str] = opt(["q_proj", "v_proj"], "Modules LoRA adapts.")
    max_train_examples: int = opt(
        0, "Train on a seeded sample of at most this many examples (0 = all)."
    )
    max_eval_examples: int = opt(
        0, "Evaluate on a seeded sample of at most this many examples (0 = all)."
    )
    eval_batch_size: int = opt(32, "Rows per evaluation forward.")
    max_length: int = opt(256, "Truncate input + target to this many tokens.")
    switch_repeats: int = opt(5, "Task-switch timings per method (the median is reported).")
    bf16: str = opt("auto", "bf16 autocast for every method: auto, yes, no.")
    seed: int = opt(0, "Seed of the data samples (and of the runs when seeds is empty).")
    seeds: list[int] = opt([], "Run every method once per seed (batch order, init); the table "
                               "reports the mean +- std across seeds. Empty: the one --seed.")
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
    """What Trainer trains and evaluate_task evaluates (`.model`, `.tokenizer`, `.table`, `.loss`)."""
    task_name: str | None
    """Its task in `model.table` (None: the weights themselves are the task)."""
    expected_trainable: int
    """Trainable parameters computed from shapes (checked against the count)."""
    save: Callable[[Path], Path] | None = None
    """Write the task to a folder; returns the folder."""
    load: Callable[[Path], object] | None = None
    """Load the saved task back until it is usable (the task switch); returns what to release."""
    release: Callable[[object], None] = field(default=lambda _: None)


# ---------------------------------------------------------------- entry point


def run_compare(
    model_name: str,
    train_path: str,
    eval_path: str,
    *,
    template: str | Template,
    labels: list[str],
    targets: list[str] | None = None,
    config: CompareConfig | None = None,
    output_dir: str | Path | None = None,
    progress: Progress | None = None,
    **options,
) -> dict:
    """Train and measure each method; returns the results dict (and writes compare.json/.md/.png
    into `output_dir` when given). `options` override fields of `config`."""
    config = replace(config or CompareConfig(), **options)
    task = make_classification_task(TASK, template, labels, targets)
    methods = [m for m in METHODS if m == "zero_shot" or m in config.methods]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    runs, data = [], None
    with tempfile.TemporaryDirectory(prefix="softprompt-compare-") as tmp:
        workdir = Path(output_dir) / "saved" if (output_dir and config.keep_saved) else Path(tmp)
        for method, seed in run_plan(methods, config.seeds or [config.seed]):
            torch.manual_seed(seed)  # LoRA's init; prompts take the seed from their config
            loaded = load_model(model_name)  # a fresh base per run: no cross-contamination
            data = data or _load_data(train_path, eval_path, task, loaded.tokenizer, config)
            row = _run_method(method, loaded, data, replace(config, seed=seed), accelerator,
                              workdir / f"{method}-{seed}", progress)
            runs.append({**row, "seed": seed})
            del loaded
            release_memory()
    rows = [mean_over_seeds([r for r in runs if r["method"] == m]) for m in methods]
    results = {
        "model": model_name,
        "data": str(train_path),
        "eval_data": str(eval_path),
        "template": task.template.text,
        "labels": list(labels),
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": asdict(config),
        "methods": rows,
        "runs": runs,
    }
    if output_dir:
        write_outputs(results, output_dir)
    return results


def run_plan(methods: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(method, seed) pairs: zero-shot once (nothing in it depends on a seed), the others per seed."""
    once = [(m, seeds[0]) for m in methods if m == "zero_shot"]
    return once + [(m, seed) for seed in seeds for m in methods if m != "zero_shot"]


def mean_over_seeds(runs: list[dict]) -> dict:
    """One method's runs (one per seed) as one row: the mean of every measured number, plus
    accuracy_std (sample std; 0 for one seed) and each seed's accuracy. Zero-shot runs once (it
    has no seed)."""
    row = dict(runs[0])
    for key, value in runs[0].items() if len(runs) > 1 else ():
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "seed":
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.fmean(values) if len(values) == len(runs) else value
    accuracies = [r["accuracy"] for r in runs]
    row["accuracy_std"] = statistics.stdev(accuracies) if len(runs) > 1 else 0.0
    row["accuracy_per_seed"] = accuracies
    row["seeds"] = [r["seed"] for r in runs]
    return row


def write_outputs(results: dict, output_dir: str | Path) -> dict[str, Path]:
    """compare.json, compare.md and compare.png in `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "md": out / "compare.md", "png": out / "compare.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["md"].write_text(markdown_table(results) + "\n")
    plot_results(results, paths["png"])
    return paths


def _load_data(train_path, eval_path, task: Task, tokenizer, config: CompareConfig) -> CompareData:
    def load(path, limit):
        examples, _ = load_examples(path, task, tokenizer, 0, max_length=config.max_length)
        if limit and len(examples) > limit:
            examples = random.Random(config.seed).sample(examples, limit)
        return examples

    train = load(train_path, config.max_train_examples)
    evals = load(eval_path, config.max_eval_examples)
    if not train or not evals:
        raise ConfigError(f"no examples in {train_path if not train else eval_path}")
    return CompareData(task, train, evals)


def machine() -> dict:
    """Where the numbers were measured."""
    info = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------- building each method


def build_method(
    method: str, loaded: LoadedModel, config: CompareConfig, labels: list[str]
) -> MethodRun:
    """The trainable object of `method` on `loaded` (which it may modify: pass a fresh load)."""
    return _BUILDERS[method](loaded, config, labels)


def _prompt_config(config: CompareConfig, labels: list[str]) -> PromptTuningConfig:
    text = config.prompt_tuning_init_text or f"Classify the text as {' or '.join(labels)}:"
    return PromptTuningConfig(
        num_virtual_tokens=config.num_virtual_tokens,
        prompt_tuning_init=config.prompt_tuning_init,
        prompt_tuning_init_text=text,
        init_labels=list(labels),
        seed=config.seed,
    )


def _build_zero_shot(loaded, config, labels) -> MethodRun:
    from .prompted import PromptedModel

    return MethodRun("zero_shot", PromptedModel(loaded), None, 0)


def _build_prompt(loaded, config, labels) -> MethodRun:
    from .bank import PromptBank, read_prompt_dir
    from .prompted import PromptedModel

    prompted = PromptedModel(loaded, {TASK: _prompt_config(config, labels)})
    return MethodRun(
        "prompt",
        prompted,
        TASK,
        config.num_virtual_tokens * prompted.token_dim,
        save=lambda folder: Path(os.path.realpath(prompted.save_task(TASK, PromptBank(folder)))),
        load=lambda folder: prompted.add_task("switched", read_prompt_dir(folder)),
    )


def _build_deep_prompt(loaded, config, labels) -> MethodRun:
    from .deep_prompt import DeepPromptModel

    deep = DeepPromptModel(loaded, {TASK: _prompt_config(config, labels)})
    return MethodRun(
        "deep_prompt",
        deep,
        TASK,
        deep.shape.numel(config.num_virtual_tokens),
        save=lambda folder: Path(os.path.realpath(deep.save_task(TASK, folder))),
        load=lambda folder: deep.load_task(folder, "switched"),
    )


def _build_lora(loaded, config, labels) -> MethodRun:
    from peft import LoraConfig, get_peft_model

    from .prompted import PromptedModel

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    expected = sum(
        config.lora_r * (m.in_features + m.out_features)
        for name, m in loaded.model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules
    )
    peft_model = get_peft_model(loaded.model, lora)
    prompted = PromptedModel(peft_model, tokenizer=loaded.tokenizer)  # freezes everything ...
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name)  # ... then only the adapter trains

    def load(folder: Path) -> str:
        name = f"switch{len(peft_model.peft_config)}"
        peft_model.load_adapter(str(folder), adapter_name=name)
        peft_model.set_adapter(name, inference_mode=True)
        return name

    def release(name: str) -> None:
        peft_model.set_adapter("default", inference_mode=True)
        peft_model.delete_adapter(name)

    return MethodRun(
        "lora",
        prompted,
        None,
        expected,
        save=lambda folder: _save_pretrained(peft_model, folder),
        load=load,
        release=release,
    )


def _build_full(loaded, config, labels) -> MethodRun:
    from transformers import AutoModelForCausalLM

    from .prompted import PromptedModel

    prompted = PromptedModel(loaded)
    prompted.model.requires_grad_(
        True
    )  # every weight trains (eval mode kept: no dropout, as for the others)

    def load(folder: Path):
        device = prompted.model.get_input_embeddings().weight.device  # where training left it
        return AutoModelForCausalLM.from_pretrained(folder).to(device)

    return MethodRun(
        "full",
        prompted,
        None,
        sum(p.numel() for p in prompted.model.parameters()),
        save=lambda folder: _save_pretrained(prompted.model, folder),
        load=load,
    )


def _save_pretrained(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


_BUILDERS = {
    "zero_shot": _build_zero_shot,
    "prompt": _build_prompt,
    "deep_prompt": _build_deep_prompt,
    "lora": _build_lora,
    "full": _build_full,
}


# ---------------------------------------------------------------- measuring one method


def _run_method(
    method: str,
    loaded: LoadedModel,
    data: CompareData,
    config: CompareConfig,
    accelerator: Accelerator,
    workdir: Path,
    progress: Progress | None,
) -> dict:
    base_bytes = _parameter_bytes(loaded.model)
    row = {
        "method": method,
        "learning_rate": None,
        "total_params": sum(p.numel() for p in loaded.model.parameters()),
    }
    base_digest = model_digest(loaded.model) if method in ("prompt", "deep_prompt") else None
    run = build_method(method, loaded, config, data.task.verbalizer.labels)
    row |= _train(run, data, config, accelerator, progress)
    if base_digest is not None:
        row["base_unchanged"] = model_digest(loaded.model) == base_digest
        if not row["base_unchanged"]:
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
    from .train import use_bf16

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
    "prompt": "read the bank folder + PromptedModel.add_task (from disk)",
    "deep_prompt": "DeepPromptModel.load_task (from disk)",
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


# ---------------------------------------------------------------- reporting


def _count(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _seconds(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _number(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _accuracy(row: dict) -> str:
    """Mean accuracy, with +- the std across seeds when there were several."""
    if len(row.get("seeds", [])) > 1:
        return f"{row['accuracy']:.3f} +- {row['accuracy_std']:.3f}"
    return f"{row['accuracy']:.3f}"


_LABELS = {
    "zero_shot": "zero-shot (reference)",
    "prompt": "prompt tuning",
    "deep_prompt": "deep prompt (P-tuning v2)",
    "lora": "LoRA",
    "full": "full fine-tuning",
}


def markdown_table(results: dict) -> str:
    """The comparison as a markdown table with the measurement notes under it."""
    rows = results["methods"]
    cuda = any(r.get("cuda_peak_memory_bytes") for r in rows)
    head = ["method", "trainable params", "disk per task", "peak RSS training (+ over start)"]
    head += ["CUDA peak"] if cuda else []
    head += ["s / step", "examples / s", "accuracy", "task switch", "100 tasks in memory"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for r in rows:
        peak = (
            "-"
            if r["peak_memory_bytes"] is None
            else f"{_bytes(r['peak_memory_bytes'])} (+{_bytes(r['training_memory_bytes'])})"
        )
        cells = [
            _LABELS.get(r["method"], r["method"]),
            _count(r["trainable_params"]),
            _bytes(r["bytes_per_task"]),
            peak,
        ]
        cells += [_bytes(r["cuda_peak_memory_bytes"])] if cuda else []
        cells += [
            _seconds(r["seconds_per_step"]),
            _number(r["examples_per_second"]),
            _accuracy(r),
            _seconds(r["task_switch_seconds"]) if r["method"] != "zero_shot" else "-",
            _bytes(r["memory_bytes_100_tasks"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _notes(results)


def _notes(results: dict) -> str:
    config, machine_info = results["config"], results["machine"]
    where = (
        machine_info.get("gpu") or f"{machine_info['cpu']}, {machine_info['torch_threads']} threads"
    )
    return (
        f"Model `{results['model']}`; {results['train_examples']} training examples from `{results['data']}`, "
        f"accuracy on {results['eval_examples']} examples of `{results['eval_data']}` (rank classification); "
        f"{config['max_steps']} steps x batch {config['per_device_train_batch_size']} for every method, "
        f"seeds {config['seeds'] or [config['seed']]} (accuracy: mean +- std across seeds), "
        f"on {where}, {results['date']}.\n"
        "Measured: trainable parameters, bytes of the saved files per task, peak RSS of the process while "
        "training (and its rise over the start of training), median seconds per step and examples/s, "
        "accuracy, task switch (median time to load a saved task from disk until usable: prompt = bank "
        "folder + add_task, deep prompt = load_task, LoRA = load_adapter + set_adapter, full = "
        "from_pretrained; files in the page cache). Computed: 100 tasks in memory = the base once + 100 "
        "float32 task tensors (full fine-tuning: 100 model copies)."
    )


def plot_results(results: dict, path: str | Path) -> Path:
    """A PNG of bar charts, one panel per column, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("trainable_params", "trainable parameters", True, _count),
        ("bytes_per_task", "bytes on disk per task", True, _bytes),
        ("memory_bytes_100_tasks", "bytes for 100 tasks in memory", True, _bytes),
        ("peak_memory_bytes", "peak RSS while training", False, _bytes),
        ("seconds_per_step", "seconds per step", False, _seconds),
        ("examples_per_second", "examples / s", False, _number),
        ("accuracy", "accuracy", False, lambda x: f"{x:.3f}"),
        ("task_switch_seconds", "task switch (s, from disk)", True, _seconds),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, title, log_scale, fmt) in zip(axes.flat, panels, strict=True):
        rows = [
            r
            for r in results["methods"]
            if r.get(key) is not None and (r[key] > 0 or not log_scale)
        ]
        values = [r[key] for r in rows]
        errors = [r.get("accuracy_std", 0.0) for r in rows] if key == "accuracy" else None
        bars = ax.bar(
            [r["method"] for r in rows], values, yerr=errors, capsize=3,
            color=[_COLORS[r["method"]] for r in rows],
        )
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.margins(y=0.15)
        if log_scale and rows:
            ax.set_yscale("log")
    fig.suptitle(f"{results['model']}: {results['config']['max_steps']} steps per method")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


_COLORS = {
    "zero_shot": "#999999",
    "prompt": "#1f77b4",
    "deep_prompt": "#17becf",
    "lora": "#ff7f0e",
    "full": "#d62728",
}


__all__ = [
    "CompareConfig",
    "METHODS",
    "PeakMemory",
    "build_method",
    "markdown_table",
    "model_digest",
    "plot_results",
    "run_compare",
    "write_outputs",
]
