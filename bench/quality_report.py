"""bench/results/quality_sst2.{json,md,png} from a quality study's runs.jsonl (bench/quality_sst2.py).

Selection accuracy (300 validation sentences) chose every setting; the tables report accuracy on
the other 700 sentences. The time-to-accuracy figure turns each learning curve's steps into CPU
minutes with the seconds/step measured on this machine (quality_sst2_cpu_speed.json).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import machine, today

LABELS = {
    "prompt": "soft prompt",
    "deep_prompt": "deep prompt",
    "lora": "LoRA",
    "full": "full fine-tuning",
    "peft_prompt": "PEFT prompt tuning",
    "zero_shot": "zero-shot",
}
COLORS = {
    "prompt": "#1f77b4",
    "deep_prompt": "#17becf",
    "lora": "#ff7f0e",
    "full": "#d62728",
    "peft_prompt": "#9467bd",
}


def load_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def setting(spec: dict) -> str:
    """A short description of what differs from the method's baseline."""
    if spec["method"] == "zero_shot":
        words = (
            f", verbalizer {spec['verbalizer']}"
            if spec["verbalizer"] != "negative_positive"
            else ""
        )
        return f"template {spec['template']}{words}"
    parts = [
        "lr from the LR range test" if spec.get("lr_auto") else f"lr {spec['learning_rate']:g}",
        f"{spec['num_virtual_tokens']} tok" if "prompt" in spec["method"] else "",
        f"init {spec['init']}" if spec["init"] != "text" else "",
        spec["schedule"] if spec["schedule"] != "linear" else "",
        f"template {spec['template']}" if spec["template"] != "review" else "",
        f"verbalizer {spec['verbalizer']}" if spec["verbalizer"] != "negative_positive" else "",
        f"batch {spec['batch_size']}" if spec["batch_size"] != 16 else "",
        f"{spec['train_examples']} examples" if spec["train_examples"] else "",
        f"MLP {spec['reparam_hidden']}" if spec["reparam_hidden"] else "",
        f"last {spec['prefix_layers']} layers" if spec["prefix_layers"] else "",
        f"{spec['steps']} steps x {spec['batch_size']}",
    ]
    return ", ".join(p for p in parts if p)


def speed_key(spec: dict) -> str:
    """What one training step's cost depends on: the method, the prompt length, the layers a deep
    prompt trains, an MLP, the template (input length), the batch size; not the learning rate,
    schedule or step count. quality_sst2_cpu_speed.json is keyed by it."""
    parts = [
        spec["method"],
        f"{spec['num_virtual_tokens']} tok" if "prompt" in spec["method"] else "",
        f"last {spec['prefix_layers']} layers" if spec.get("prefix_layers") else "",
        f"MLP {spec['reparam_hidden']}" if spec.get("reparam_hidden") else "",
        f"template {spec['template']}" if spec["template"] != "review" else "",
        f"batch {spec['batch_size']}" if spec["batch_size"] != 16 else "",
    ]
    return ", ".join(p for p in parts if p)


def cpu_seconds_per_step(speed: dict, spec: dict) -> float | None:
    """Seconds per training step on the 2-core CPU for this setting, if cpu-speed timed it."""
    return speed["seconds_per_step"].get(speed_key(spec))


def diverged_at(run: dict) -> int | None:
    """First validation step where the run had collapsed (loss NaN: accuracy pinned to one class)."""
    if not isinstance(run.get("final_loss"), float) or run["final_loss"] == run["final_loss"]:
        return None
    return next(
        (c["step"] for c in run.get("curve", []) if c["report"] < 0.55 and c["step"] > 0), None
    )


def screen_table(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        if r.get("stage") != "screen" or "report_accuracy" not in r:
            continue
        spec = r["spec"]
        rows.append(
            {
                "group": spec["group"],
                "method": spec["method"],
                "setting": setting(spec),
                "select_accuracy": round(r["select_accuracy"], 4),
                "report_accuracy": round(r["report_accuracy"], 4),
                "best_step": r.get("best_step"),
                "diverged_at_step": diverged_at(r),
                "seed": spec["seed"],
                "device": r.get("device"),
                "train_seconds": r.get("train_seconds"),
            }
        )
    return sorted(rows, key=lambda x: (x["method"], -x["select_accuracy"]))


def default_zero_shot(table: list[dict]) -> float | None:
    """Zero-shot report accuracy with the default template and label words, the plot's baseline (the
    screen also scores other templates and words zero-shot: averaging them in would mislead)."""
    default = setting(
        {"method": "zero_shot", "template": "review", "verbalizer": "negative_positive"}
    )
    scores = [
        r["report_accuracy"]
        for r in table
        if r["method"] == "zero_shot" and r["setting"] == default
    ]
    return statistics.fmean(scores) if scores else None


def best_per_method(table: list[dict]) -> dict[str, dict]:
    best = {}
    for row in table:
        if (
            row["method"] not in best
            or row["select_accuracy"] > best[row["method"]]["select_accuracy"]
        ):
            best[row["method"]] = row
    return best


def minutes_to(curve: list[dict], seconds_per_step: float, target: float) -> float | None:
    step = next((c["step"] for c in curve if c["report"] >= target), None)
    return None if step is None else round(step * seconds_per_step / 60, 1)


def confirm_table(runs: list[dict], speed: dict, task: str = "sst2") -> list[dict]:
    """Each confirmed setting on each device: mean +- std over its seeds, and the mean curve.
    (CPU minutes use SST-2's seconds/step: for AG News, whose inputs are longer, they are not given.)"""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r.get("stage") == "confirm" and "report_accuracy" in r and r["spec"]["task"] == task:
            key = (r["spec"]["method"], setting(r["spec"]), r.get("device"))
            groups.setdefault(key, []).append(r)
    rows = []
    for r in runs:  # a run cut off before its last step: its curve so far, reported as such
        if r.get("stage") == "confirm" and "stopped_at_step" in r and r["spec"]["task"] == task:
            groups.setdefault(
                (r["spec"]["method"], setting(r["spec"]), r.get("device")), []
            ).append(r)
    for (method, described, device), seeds in sorted(groups.items()):
        if any("stopped_at_step" in r for r in seeds):
            rows.append(_unfinished_row(method, described, device, seeds))
            continue
        report = [r["report_accuracy"] for r in seeds]
        curve = mean_curve([r["curve"] for r in seeds if "curve" in r])
        sps = cpu_seconds_per_step(speed, seeds[0]["spec"]) if task == "sst2" else None
        rows.append(
            {
                "method": method,
                "setting": described,
                "device": device,
                "seconds_per_step_cpu": sps,
                "seeds": sorted(r["spec"]["seed"] for r in seeds),
                "report_mean": round(statistics.fmean(report), 4),
                "report_std": round(_std(report), 4),
                "select_mean": round(statistics.fmean(r["select_accuracy"] for r in seeds), 4),
                "report_per_seed": [round(a, 4) for a in report],
                "curve_mean": curve,
                "cpu_minutes_to_0.90": minutes_to(curve, sps, 0.90) if sps and curve else None,
            }
        )
    pooled = _pooled_rows(runs, rows, task, speed)
    replaced = {(p["method"], p["setting"], p["device"]) for p in pooled}
    return [r for r in rows if (r["method"], r["setting"], r["device"]) not in replaced] + pooled


def _pooled_rows(runs: list[dict], rows: list[dict], task: str, speed: dict) -> list[dict]:
    """A confirmed setting's finished runs on every device (the screen's run is a seed too): one
    row over all of them, each seed labelled with its device. On one device it replaces the
    confirmation's own row (which it contains)."""
    pooled = []
    for described, method in sorted(
        {(r["setting"], r["method"]) for r in rows if not r.get("unfinished")}
    ):
        done = [
            r
            for r in runs
            if r.get("stage") in ("screen", "confirm")
            and "report_accuracy" in r
            and r["spec"]["method"] == method
            and setting(r["spec"]) == described
            and r["spec"]["task"] == task
        ]
        confirmed = max(
            len(r["seeds"]) for r in rows if (r["setting"], r["method"]) == (described, method)
        )
        if len(done) <= confirmed:  # nothing to add to the confirmation's own row
            continue
        report = [r["report_accuracy"] for r in done]
        devices = {r.get("device") for r in done}
        curve = mean_curve([r["curve"] for r in done if "curve" in r])
        sps = (
            cpu_seconds_per_step(speed, done[0]["spec"])
            if task == "sst2" and len(devices) == 1
            else None
        )
        device = (
            devices.pop()
            if len(devices) == 1
            else "all ("
            + ", ".join(f"seed {r['spec']['seed']}: {r.get('device')}" for r in done)
            + ")"
        )
        pooled.append(
            {
                "method": method,
                "setting": described,
                "device": device,
                "seeds": [r["spec"]["seed"] for r in done],
                "report_per_seed": [round(a, 4) for a in report],
                "seconds_per_step_cpu": sps,
                "report_mean": round(statistics.fmean(report), 4),
                "report_std": round(_std(report), 4),
                "select_mean": round(statistics.fmean(r["select_accuracy"] for r in done), 4),
                "curve_mean": curve,
                "cpu_minutes_to_0.90": minutes_to(curve, sps, 0.90) if sps and curve else None,
                "pooled": True,
            }
        )
    return pooled


def _unfinished_row(method: str, described: str, device: str, seeds: list[dict]) -> dict:
    """Seeds of one setting of which at least one was cut off: the mean curve up to the last step
    every seed reached, and each seed's accuracy there; no final accuracy is claimed."""
    curve = mean_curve([r["curve"] for r in seeds])
    last = curve[-1]["step"] if curve else 0
    at_last = [next(c["report"] for c in r["curve"] if c["step"] == last) for r in seeds]
    return {
        "method": method,
        "setting": described,
        "device": device,
        "seeds": sorted(r["spec"]["seed"] for r in seeds),
        "unfinished": True,
        "compared_at_step": last,
        "report_per_seed": [round(a, 4) for a in at_last],
        "report_mean": round(statistics.fmean(at_last), 4),
        "report_std": round(_std(at_last), 4),
        "curve_mean": curve,
        "cpu_minutes_to_0.90": None,
    }


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Mean (and std) accuracy at the steps every seed's curve has."""
    steps = (
        sorted(set.intersection(*(set(c["step"] for c in curve) for curve in curves)))
        if curves
        else []
    )
    points = []
    for step in steps:
        values = [next(c["report"] for c in curve if c["step"] == step) for curve in curves]
        points.append(
            {
                "step": step,
                "report": round(statistics.fmean(values), 4),
                "report_std": round(_std(values), 4),
            }
        )
    return points


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def with_precision(run: dict) -> dict:
    """The device label says how a GPU run computed: bf16 autocast or fp32 (this CPU is always fp32)."""
    if run.get("device") in (None, "cpu"):
        return run
    return {**run, "device": f"{run['device']} {'bf16' if run.get('bf16') else 'fp32'}"}


def other_model_rows(runs: list[dict]) -> list[dict]:
    """Runs on another base model than the default SmolLM2 (`QUALITY_MODEL`), the settings unchanged:
    each finished run, or a cut-off run's last validation, labelled as such."""
    rows = []
    for r in runs:
        if r.get("model", "default") == "default" or not (
            "report_accuracy" in r or "stopped_at_step" in r
        ):
            continue
        last = r["curve"][-1] if "stopped_at_step" in r else None
        rows.append(
            {
                "model": r["model"],
                "method": r["spec"]["method"],
                "task": r["spec"]["task"],
                "setting": setting(r["spec"]),
                "device": r.get("device"),
                "seed": r["spec"]["seed"],
                "report_accuracy": round(last["report"] if last else r["report_accuracy"], 4),
                "select_accuracy": round(last["select"] if last else r["select_accuracy"], 4),
                "stopped_at_step": r.get("stopped_at_step"),
                "curve": r.get("curve"),
            }
        )
    return rows


def write_report(
    runs_path: Path,
    ensembles_path: Path | None,
    results: Path,
    command: str | None,
    not_run: list[str],
) -> list[Path]:
    """`not_run`: the planned screen settings no run measured yet, described."""
    everything = [with_precision(r) for r in load_runs(runs_path)]
    runs = [
        r for r in everything if r.get("model", "default") == "default"
    ]  # SmolLM2: the study proper
    speed = json.loads((results / "quality_sst2_cpu_speed.json").read_text())
    table = screen_table(runs)
    best = best_per_method(table)
    curves = {}
    for method, row in best.items():
        if method == "zero_shot":
            continue
        run = next(
            r
            for r in runs
            if r.get("stage") == "screen"
            and r["spec"]["method"] == method
            and setting(r["spec"]) == row["setting"]
            and "curve" in r
        )
        sps = cpu_seconds_per_step(speed, run["spec"])
        curves[method] = {
            "setting": row["setting"],
            "seconds_per_step_cpu": sps,
            "curve": run["curve"],
            "cpu_minutes_to_0.90": minutes_to(run["curve"], sps, 0.90) if sps else None,
        }
    devices = sorted({r["device"] for r in runs if r.get("device")})
    report = {
        "benchmark": "quality_sst2",
        "date": today(),
        "report_machine": machine(),
        "study_devices": devices,
        "command": command,
        "runs_file": str(runs_path),
        "data": "../shared/data/sst2: train 55,377 phrases; validation 1,000 sentences split by "
        "bench/common.split_validation into 300 selection + 700 report rows",
        "n_report": 700,
        "n_select": 300,
        "seeds": sorted({r["spec"]["seed"] for r in runs}),
        "screen": table,
        "best_per_method": best,
        "time_to_accuracy": curves,
        "confirm": confirm_table(runs, speed),
        "agnews": confirm_table(runs, speed, task="agnews"),
        "agnews_data": "../shared/data/agnews: train 9,000 articles; validation 1,000 split by "
        "bench/common.split_validation into 300 selection + 700 report rows; template "
        "'Article: {text}\\nTopic:', labels World / Sports / Business / Sci/Tech "
        "(targets ' World', ' Sports', ' Business', ' Technology')",
        "other_models": other_model_rows(everything),
        "cpu_seconds_per_step": speed,
        "not_run": not_run,
        "ensembles": json.loads(ensembles_path.read_text())["ensembles"]
        if ensembles_path and ensembles_path.is_file()
        else [],
    }
    out = results / "quality_sst2"
    paths = [out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report) + "\n")
    plot(report, paths[2])
    return paths


def cut_off_note(step: int, curve: list[dict]) -> str:
    return (
        f" (cut off at step {step}; report acc by step: "
        + ", ".join(f"{c['step']}: {c['report']:.3f}" for c in curve)
        + ")"
    )


def markdown(report: dict) -> str:
    lines = [
        f"Quality study, SST-2 (devices: {', '.join(report['study_devices'])}; {report['date']}). Accuracy on "
        f"the {report['n_report']} report sentences; settings chosen on the {report['n_select']} selection "
        "sentences.",
        "",
    ]
    if report["confirm"]:
        lines += [
            "Confirmation: the best screened setting, several seeds (mean +- std over seeds; minutes to 0.90 "
            "from the mean curve x CPU seconds/step measured here):",
            "",
            "| method | setting | device | seeds | report acc per seed | report acc | CPU minutes to 0.90 |",
            "|---|---|---|---|---|---:|---:|",
        ]
        for r in report["confirm"]:
            minutes = (
                r["cpu_minutes_to_0.90"] if r["cpu_minutes_to_0.90"] is not None else "not reached"
            )
            if r.get("unfinished"):
                minutes = (
                    f"cut off: accuracy at step {r['compared_at_step']}, not the end of training"
                )
            elif r.get("pooled") and r["device"].startswith("all ("):
                minutes = "- (devices differ)"
            lines.append(
                f"| {LABELS[r['method']]} | {r['setting']} | {r['device']} | {','.join(map(str, r['seeds']))} | "
                f"{', '.join(f'{a:.3f}' for a in r['report_per_seed'])} | "
                f"{r['report_mean']:.3f} +- {r['report_std']:.3f} | {minutes} |"
            )
        lines += [""]
    if report.get("agnews"):
        lines += [
            "AG News (4 labels; the SST-2-confirmed settings unchanged; accuracy on its 700 report rows, "
            "settings and checkpoints chosen on the 300 selection rows):",
            "",
            "| method | setting | device | seeds | report acc per seed | report acc | selection acc |",
            "|---|---|---|---|---|---:|---:|",
        ]
        for r in report["agnews"]:
            seeds = "-" if r["method"] == "zero_shot" else ",".join(map(str, r["seeds"]))
            # no final accuracy for a cut-off run: its curve so far (report rows at each validation)
            note = (
                cut_off_note(r["compared_at_step"], r["curve_mean"]) if r.get("unfinished") else ""
            )
            lines.append(
                f"| {LABELS[r['method']]} | {r['setting']}{note} | {r['device']} | {seeds} | "
                f"{', '.join(f'{a:.3f}' for a in r['report_per_seed'])} | "
                f"{r['report_mean']:.3f} +- {r['report_std']:.3f} | "
                f"{format(r['select_mean'], '.3f') if 'select_mean' in r else '-'} |"
            )
        lines += [""]
    if report["ensembles"]:
        lines += [
            "Prompt ensembles (Lester et al. sec. 6): a confirmed setting's seeds in one mixed-task batch, label "
            "scores averaged (`python bench/quality_sst2.py ensemble`):",
            "",
            "| method | setting | members (device) | member report acc | their mean | ensemble report acc | "
            "ensemble selection acc |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for e in report["ensembles"]:
            members = ", ".join(
                f"{m} ({d})" for m, d in zip(e["members"], e["member_devices"], strict=True)
            )
            lines.append(
                f"| {LABELS[e['method']]} | {e['setting']} | {members} | "
                f"{', '.join(f'{a:.3f}' for a in e['member_report_accuracy'])} | "
                f"{statistics.fmean(e['member_report_accuracy']):.3f} | {e['report_accuracy']:.3f} | "
                f"{e['select_accuracy']:.3f} |"
            )
        lines += [""]
    if report["other_models"]:
        lines += [
            "Another base model (the SmolLM2 settings unchanged; accuracy on the same 700 report rows):",
            "",
            "| model | task | method | setting | device | seed | report acc | selection acc |",
            "|---|---|---|---|---|---:|---:|---:|",
        ]
        for r in report["other_models"]:
            cut = cut_off_note(r["stopped_at_step"], r["curve"]) if r["stopped_at_step"] else ""
            lines.append(
                f"| {r['model']} | {r['task']} | {LABELS[r['method']]} | {r['setting']}{cut} | {r['device']} | "
                f"{r['seed']} | {r['report_accuracy']:.3f} | {r['select_accuracy']:.3f} |"
            )
        lines += [""]
    lines += [
        "Screen (one seed per setting):",
        "",
        "| method | setting | selection acc | report acc | best step | collapsed (loss NaN) at step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["screen"]:
        lines.append(
            f"| {LABELS[r['method']]} | {r['setting']} | {r['select_accuracy']:.3f} | "
            f"{r['report_accuracy']:.3f} | {r['best_step'] or '-'} | {r['diverged_at_step'] or '-'} |"
        )
    lines += [
        "",
        "Time to accuracy (steps from the curve x CPU seconds/step measured here for that setting):",
        "",
        "| method | best setting | CPU s/step | CPU minutes to 0.90 (report rows) |",
        "|---|---|---:|---:|",
    ]
    for method, c in report["time_to_accuracy"].items():
        sps = c["seconds_per_step_cpu"]
        lines.append(
            f"| {LABELS[method]} | {c['setting']} | {sps:.2f} | "
            f"{c['cpu_minutes_to_0.90'] if c['cpu_minutes_to_0.90'] is not None else 'not reached'} |"
            if sps
            else f"| {LABELS[method]} | {c['setting']} | - | - |"
        )
    if report["not_run"]:
        lines += [
            "",
            f"Not run yet (planned in the screen; the GPU or session time ran out first): {'; '.join(report['not_run'])}.",
        ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_minutes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, c in report["time_to_accuracy"].items():
        steps = [p["step"] for p in c["curve"]]
        accuracy = [p["report"] for p in c["curve"]]
        label = f"{LABELS[method]} ({c['setting']})"
        ax_steps.plot(
            steps,
            accuracy,
            marker="o",
            lw=1,
            alpha=0.6,
            color=COLORS.get(method),
            label=label + ", 1 seed",
        )
        if c["seconds_per_step_cpu"]:
            ax_minutes.plot(
                [s * c["seconds_per_step_cpu"] / 60 for s in steps],
                accuracy,
                marker="o",
                color=COLORS.get(method),
                label=LABELS[method],
            )
    for c in report["confirm"]:
        if c["device"].startswith(
            "all ("
        ):  # its seeds are drawn already: the screen's curve and each device's mean
            continue
        steps = [p["step"] for p in c["curve_mean"]]
        mean = [p["report"] for p in c["curve_mean"]]
        std = [p["report_std"] for p in c["curve_mean"]]
        sps = c.get("seconds_per_step_cpu")
        label = f"{LABELS[c['method']]}, {len(c['seeds'])} seeds on {c['device']} (mean +- std)"
        for ax, xs in (
            (ax_steps, steps),
            (ax_minutes, [s * sps / 60 for s in steps] if sps else None),
        ):
            if xs is None:
                continue
            ax.plot(xs, mean, color=COLORS.get(c["method"]), lw=2.5, label=label)
            ax.fill_between(
                xs,
                [m - d for m, d in zip(mean, std, strict=True)],
                [m + d for m, d in zip(mean, std, strict=True)],
                color=COLORS.get(c["method"]),
                alpha=0.2,
            )
    zero = default_zero_shot(report["screen"])
    for ax, xlabel in (
        (ax_steps, "training step (batch 16)"),
        (ax_minutes, "CPU minutes (2 cores, measured s/step)"),
    ):
        ax.axhline(0.90, color="grey", ls=":", lw=1)
        if zero is not None:
            ax.axhline(zero, color="grey", ls="--", lw=1, label=f"zero-shot {zero:.3f}")
        ax.set(xlabel=xlabel, ylabel="accuracy, 700 report sentences", ylim=(0.45, 0.95))
        ax.legend(fontsize=7)
    ax_steps.set_title("Learning curves (best setting of each method)")
    ax_minutes.set_title("Time to accuracy on this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
