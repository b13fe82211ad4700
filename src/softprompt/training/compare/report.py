"""The results as a markdown table and a plot."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


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
        + _merged_note(results)
        + "Measured: trainable parameters, bytes of the saved files per task, peak RSS of the process while "
        "training (and its rise over the start of training), median seconds per step and examples/s, "
        "accuracy, task switch (median time to load a saved task from disk until usable: prompt = bank "
        "folder + add_task, deep prompt = load_task, LoRA = load_adapter + set_adapter, full = "
        "from_pretrained; files in the page cache). Computed: 100 tasks in memory = the base once + 100 "
        "float32 task tensors (full fine-tuning: 100 model copies)."
    )


def _merged_note(results: dict) -> str:
    parts = results.get("merged_parts", 1)
    if parts < 2:
        return ""
    return (
        f"Merged from {parts} separate compare runs (the same data, model and budget; accuracy is "
        "unaffected); where they ran side by side on one machine, the speed and memory columns "
        "include the others' load.\n"
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
            [r["method"] for r in rows],
            values,
            yerr=errors,
            capsize=3,
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
