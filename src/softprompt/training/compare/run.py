"""The entry point: every (method, seed) on a fresh base model, the mean over seeds, the output files."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from softprompt.atomic import write_file
from softprompt.data import Task, Template, load_examples, make_classification_task, sample_rows
from softprompt.errors import ConfigError
from softprompt.model.loading import load_model
from softprompt.training.compare.config import METHODS, TASK, CompareConfig, CompareData, Progress
from softprompt.training.compare.measure import release_memory, run_method
from softprompt.training.compare.report import markdown_table, plot_results

log = logging.getLogger(__name__)


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
            row = run_method(
                method,
                loaded,
                data,
                replace(config, seed=seed),
                accelerator,
                workdir / f"{method}-{seed}",
                progress,
            )
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


# What must be equal for two compare runs to be rows of one table (the budget, the data, the base).
_SAME_IN_EVERY_PART = (
    "model",
    "data",
    "eval_data",
    "template",
    "labels",
    "train_examples",
    "eval_examples",
)


def merge_results(parts: list[dict]) -> dict:
    """Several `run_compare` results of one comparison, each run for some methods and seeds (e.g. in
    parallel processes on one GPU, or on several machines), as one result: every (method, seed) run
    once, rows recomputed with `mean_over_seeds`. Raises ConfigError when the parts differ in data,
    model or budget, or when one (method, seed) was run twice."""
    if not parts:
        raise ConfigError("nothing to merge")
    first = parts[0]
    budget = {k: v for k, v in first["config"].items() if k not in ("methods", "seeds", "seed")}
    runs, seen = [], set()
    for index, part in enumerate(parts):
        for key in _SAME_IN_EVERY_PART:
            if part[key] != first[key]:
                raise ConfigError(
                    f"part {index + 1} differs from part 1 in {key}: {part[key]!r} != {first[key]!r}"
                )
        for key, value in part["config"].items():
            if key in budget and value != budget[key]:
                raise ConfigError(
                    f"part {index + 1} differs from part 1 in config.{key}: {value!r} != {budget[key]!r}"
                )
        for run in part["runs"]:
            zero_shot = (
                run["method"] == "zero_shot"
            )  # it has no seed: one run stands for every part's
            key = (run["method"], None if zero_shot else run["seed"])
            if key in seen and zero_shot:
                continue
            if key in seen:
                raise ConfigError(f"part {index + 1} runs {run['method']} seed {run['seed']} again")
            seen.add(key)
            runs.append(run)
    present = {r["method"] for r in runs}
    methods = [m for m in METHODS if m in present]
    seeds = sorted({r["seed"] for r in runs if r["method"] != "zero_shot"})
    return {
        **first,
        "date": max(part["date"] for part in parts),
        "config": {
            **first["config"],
            "methods": [m for m in methods if m != "zero_shot"],
            "seeds": seeds,
        },
        "methods": [mean_over_seeds([r for r in runs if r["method"] == m]) for m in methods],
        "runs": runs,
        "merged_parts": len(parts),
    }


def write_outputs(results: dict, output_dir: str | Path) -> dict[str, Path]:
    """compare.json, compare.md and compare.png in `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "md": out / "compare.md", "png": out / "compare.png"}
    write_file(paths["json"], json.dumps(results, indent=2) + "\n")
    write_file(paths["md"], markdown_table(results) + "\n")
    plot_results(results, paths["png"])
    return paths


def _load_data(train_path, eval_path, task: Task, tokenizer, config: CompareConfig) -> CompareData:
    def load(path, limit, seed):
        examples, _ = load_examples(path, task, tokenizer, 0, max_length=config.max_length)
        return sample_rows(examples, limit, seed)

    train = load(train_path, config.max_train_examples, config.seed)
    evals = load(
        eval_path, config.max_eval_examples, 0
    )  # every method and seed scored on the same rows
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
