"""`softprompt train`: train soft or deep prompts on the user's data and save them, with the run's
plots, in a bank; the progress bar and the summary."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from softprompt.atomic import write_file
from softprompt.cli.common import load_split, nth, print_json, task_from_flags
from softprompt.errors import ConfigError
from softprompt.options import from_args
from softprompt.prompting.soft import PromptTuningConfig, default_init_text


def cmd_train(args) -> int:
    from softprompt.bank import PromptBank
    from softprompt.model.loading import load_model
    from softprompt.prompting.kinds import default_learning_rate, kind_named
    from softprompt.prompting.prompted import PromptedModel
    from softprompt.training.lr_find import find_learning_rate
    from softprompt.training.trainer import EvalSet, TrainConfig, Trainer

    names = args.task
    if len(args.data) not in (1, len(names)):
        raise ConfigError(
            f"give --data once or once per --task ({len(names)} tasks, {len(args.data)} --data)"
        )
    auto_lr = args.learning_rate == "auto"
    learning_rate = (
        default_learning_rate(args.prompt_type)
        if args.learning_rate in (None, "auto")
        else args.learning_rate
    )
    config = from_args(TrainConfig, args, learning_rate=learning_rate)
    tasks = [task_from_flags(args, i, name) for i, name in enumerate(names)]
    loaded = load_model(args.model)
    inits = {task.name: _init_config(args, task) for task in tasks}
    prompted = PromptedModel(loaded, inits, kind=kind_named(args.prompt_type))
    train_examples, eval_sets, test_sets = [], {}, {}
    for i, (name, task) in enumerate(zip(names, tasks, strict=True)):
        train_examples += load_split(nth(args.data, i), task, loaded.tokenizer, i, args)
        if args.eval_data:
            eval_sets[name] = EvalSet(
                task, load_split(nth(args.eval_data, i), task, loaded.tokenizer, i, args)
            )
        if args.test_data:
            test_sets[name] = EvalSet(
                task, load_split(nth(args.test_data, i), task, loaded.tokenizer, i, args)
            )
    output_dir = Path(args.output_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if auto_lr:
        search = find_learning_rate(prompted, train_examples, config)
        config = replace(config, learning_rate=search.suggested)
        print(
            f"learning rate {search.suggested:.3g} (LR range test over {len(search.losses)} steps)",
            file=sys.stderr,
        )
    run_info = {
        "task": names,
        "model": args.model,
        "prompt_type": args.prompt_type,
        "num_virtual_tokens": args.num_virtual_tokens,
        "data": args.data,
    }
    trainer = Trainer(
        prompted,
        train_examples,
        config,
        eval_sets=eval_sets,
        output_dir=output_dir,
        run_info=run_info,
    )
    main_process = trainer.accelerator.is_main_process
    if main_process:
        trainer.on_step = _progress_bar(config.max_steps)
        print(
            f"model {args.model}: {trainer.trainable_parameter_count:,} trainable parameters "
            f"({len(names)} {args.prompt_type} prompt(s) x {args.num_virtual_tokens} tokens, "
            f"learning rate {config.learning_rate:.3g}); "
            f"{len(train_examples)} training examples; {trainer.accelerator.num_processes} processes"
            f"{f' (FSDP: {trainer.sharded_layers} layers sharded)' if trainer.sharded_layers else ''}; "
            f"bf16 autocast {'on' if trainer.bf16 else 'off'}",
            file=sys.stderr,
        )
    if args.resume:
        resumed = trainer.load_checkpoint()
        print(
            f"resumed from step {trainer.step}"
            if resumed
            else f"no checkpoint in {output_dir}; starting fresh",
            file=sys.stderr,
        )
    result = trainer.train()
    _progress_bar.close()
    tests = _test_metrics(
        prompted, trainer, tasks, test_sets
    )  # every process: FSDP forwards are collective
    if not main_process:  # every process holds the same prompt; one writes and reports
        return 0
    summary = _finish_training(
        args, prompted, trainer, result, tasks, tests, output_dir, PromptBank(args.bank)
    )
    print_json(summary) if args.json else _print_summary(summary)
    return 0


def _init_config(args, task) -> PromptTuningConfig:
    """Per-task init: class_labels takes that task's label words, and text init without a text
    starts from an instruction naming the labels (e.g. "Classify as negative or positive:")."""
    overrides = {}
    labels = task.verbalizer.labels if task.verbalizer else []
    if args.prompt_tuning_init == "class_labels" and not args.init_labels:
        overrides["init_labels"] = labels
    if args.prompt_tuning_init == "text" and not args.prompt_tuning_init_text:
        overrides["prompt_tuning_init_text"] = default_init_text(labels)
    return from_args(PromptTuningConfig, args, **overrides)


def _test_metrics(prompted, trainer, tasks, test_sets) -> dict[str, dict]:
    """Zero-shot and tuned test metrics per task that has test data."""
    from softprompt.training.evaluation import evaluate_task
    from softprompt.training.trainer import autocast

    out = {}
    for task in tasks:
        if task.name in test_sets:
            examples = test_sets[task.name].examples
            with autocast(trainer.device, trainer.bf16):
                out[task.name] = {
                    "test_zero_shot": evaluate_task(prompted, task, examples, None),
                    "test_tuned": evaluate_task(prompted, task, examples, task.name),
                }
    return out


def _finish_training(args, prompted, trainer, result, tasks, tests, output_dir: Path, bank) -> dict:
    summary = {
        "steps": result.steps,
        "best_step": result.best_step,
        "best_validation": result.best_metric,
        "train_seconds": round(result.seconds, 2),
        "examples_per_second": round(result.examples_per_second, 2),
        "trainable_parameters": result.trainable_parameters,
        "output_dir": str(output_dir),
        "tasks": {},
    }
    plots = _draw_plots(output_dir)
    if plots:
        summary["plots"] = [str(p) for p in plots]
    for task in tasks:
        entry = dict(tests.get(task.name, {}))
        meta = {
            "template": task.template.text,
            "verbalizer": task.verbalizer.to_dict() if task.verbalizer else None,
            "metrics": {
                "best_validation": result.best_metric,
                "best_step": result.best_step,
                **entry,
            },
            "training": {"data": args.data, "eval_data": args.eval_data, **asdict(trainer.config)},
        }
        # The run's plots are saved with the prompt (same atomic save), so they travel with it.
        saved = replace(
            prompted.saved_prompt(task.name, meta), plots={p.stem: p.read_bytes() for p in plots}
        )
        entry["path"] = str(bank.save(saved))
        summary["tasks"][task.name] = entry
    write_file(output_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def _draw_plots(output_dir: Path) -> list[Path]:
    """The run's PNG plots (drawn before the prompt is saved, to go with it); a plot that cannot be
    drawn must not cost the trained prompt, so a failure is reported and the prompt saved without."""
    from softprompt.training.plots import plot_training

    metrics_file = output_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        return []
    try:
        return plot_training(metrics_file, output_dir)
    except Exception as exc:  # matplotlib raises many types
        print(f"warning: could not draw the training plots: {exc}", file=sys.stderr)
        return []


def _print_summary(summary: dict) -> None:
    print(
        f"trained {summary['steps']} steps in {summary['train_seconds']} s "
        f"({summary['examples_per_second']} examples/s); best validation {summary['best_validation']} "
        f"at step {summary['best_step']}"
    )
    for name, entry in summary["tasks"].items():
        if "test_tuned" in entry:
            zs, tuned = entry["test_zero_shot"], entry["test_tuned"]
            key = "accuracy" if "accuracy" in tuned else "exact_match"
            print(
                f"{name}: test {key} zero-shot {zs[key]:.4f} -> tuned {tuned[key]:.4f} (n={tuned['n']})"
            )
        print(f"{name}: prompt saved to {entry['path']}")
    print(f"metrics and plots in {summary['output_dir']}")


class _ProgressBar:
    """tqdm bar with loss and speed; created lazily so library code never draws."""

    def __init__(self):
        self.bar = None

    def __call__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

        def on_step(record: dict) -> None:
            postfix = {
                "loss": f"{record['loss']:.4f}",
                "ex/s": f"{record['examples'] / record['seconds']:.1f}",
            }
            if "validation" in record and record["validation"]["metric"] is not None:
                postfix["val"] = f"{record['validation']['metric']:.4f}"
            self.bar.set_postfix(postfix)
            self.bar.n = record["step"]
            self.bar.refresh()

        return on_step

    def close(self):
        if self.bar is not None:
            self.bar.close()


_progress_bar = _ProgressBar()
