"""PNG plots of a training run, drawn from its metrics.jsonl (so they can be redrawn any time)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png, validation.png and grad_norms.png next to the metrics; returns their paths."""
    records = read_metrics(metrics_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [_plot_loss(records, out / "loss.png")]
    if any("validation" in r and r["validation"].get("metric") is not None for r in records):
        written.append(_plot_validation(records, out / "validation.png"))
    if any("prompt_grad_norms" in r for r in records):
        written.append(_plot_grad_norms(records, out / "grad_norms.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_loss(records: list[dict], path: Path) -> Path:
    steps = [r for r in records if "loss" in r]  # the step-0 validation has no loss
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    ax.set(xlabel="step", ylabel="training loss", title="Loss")
    return _save(fig, path)


def _plot_validation(records: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    evals = [r for r in records if "validation" in r]
    zero_shot = evals[0]["validation"].get("zero_shot") or {"tasks": {}}  # logged at step 0
    for task in evals[0]["validation"]["tasks"]:
        values = [r["validation"]["tasks"][task] for r in evals]
        key = "accuracy" if "accuracy" in values[0] else "loss"
        (line,) = ax.plot(
            [r["step"] for r in evals], [v[key] for v in values], marker="o", label=f"{task} {key}"
        )
        if task in zero_shot["tasks"]:  # the plain model on the same rows: what training must beat
            reference = zero_shot["tasks"][task][key]
            ax.axhline(
                reference,
                color=line.get_color(),
                ls="--",
                lw=1,
                label=f"{task} zero-shot {reference:.3f}",
            )
    ax.set(xlabel="step", title="Validation")
    ax.legend()
    return _save(fig, path)


def _plot_grad_norms(records: list[dict], path: Path) -> Path:
    """One line per virtual token: which positions learn, which vanish or explode."""
    rows = [r for r in records if "prompt_grad_norms" in r]
    tasks = list(rows[0]["prompt_grad_norms"])
    fig, axes = plt.subplots(len(tasks), 1, figsize=(6, 2.5 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        norms = [r["prompt_grad_norms"][task] for r in rows]
        for token in range(len(norms[0])):
            ax.plot([r["step"] for r in rows], [n[token] for n in norms], lw=0.6, label=f"v{token}")
        ax.set(
            yscale="log",
            xlabel="step",
            ylabel="grad norm",
            title=f"Per-token gradient norms: {task}",
        )
        if len(norms[0]) <= 16:
            ax.legend(fontsize=6, ncol=4)
    return _save(fig, path)
