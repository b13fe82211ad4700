"""`softprompt train|eval|generate|info|bank|inspect|serve|keys|compare`: the only place that prints.

Each verb parses flags (built from the config dataclasses), calls the library, and reports.
Every SoftPromptError becomes one clear `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from . import __version__
from .atomic import write_file
from .errors import ConfigError, SoftPromptError
from .options import add_arguments, from_args
from .prompts import PromptTuningConfig

log = logging.getLogger("softprompt")


# ---------------------------------------------------------------- shared flags


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), "
                   "'gemma3-270m', a .gguf file, a local model folder, or a hub id (default: %(default)s)")


def _add_task_data(p: argparse.ArgumentParser, *, many: bool) -> None:
    action = "append" if many else None
    p.add_argument("--data", action=action, required=True,
                   help="JSONL/CSV/TSV/parquet file, a datasets folder, or builtin:NAME:SPLIT "
                        "(builtin sets: movie_sentiment, sms_spam, trec)" + (" (repeat per task)" if many else ""))
    p.add_argument("--template", action=action, help="Input template with {column} fields, e.g. "
                   "'Review: {text}\\nSentiment:' (default: the builtin set's, else '{text}')")
    p.add_argument("--labels", action=action, help="Comma-separated label names in class order; "
                   "integer labels index into them (default: the builtin set's)")
    p.add_argument("--targets", action=action, help="Comma-separated target strings per label "
                   "(default: each label with a leading space)")
    p.add_argument("--text-column", help="Column to use as {text}")
    p.add_argument("--label-column", default="label", help="Column holding the label (default: %(default)s)")
    p.add_argument("--input-column", help="Free-form generation: the input column (template '{COLUMN}')")
    p.add_argument("--target-column", help="Free-form generation: the column holding the target text")
    p.add_argument("--skip-bad-rows", action="store_true", help="Drop bad rows with a count instead of failing")
    p.add_argument("--max-length", type=int, default=256, help="Truncate input + target (default: %(default)s)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("softprompt").setLevel(logging.INFO)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _nth(values, i: int, default=None):
    """Per-task flag value: the i-th if given per task, the only one if given once (or a scalar flag)."""
    if not isinstance(values, list):
        return default if values is None else values
    if not values:
        return default
    return values[i] if len(values) > 1 else values[0]


def _task_spec(args, i: int, name: str):
    """A Task from the flags for the i-th task (builtin data supplies template and labels)."""
    from .data import BUILTIN_DATASETS, Task, Template, Verbalizer

    data = _nth(args.data, i)
    builtin = BUILTIN_DATASETS.get(data.split(":")[1]) if str(data).startswith("builtin:") else None
    template = _nth(args.template, i)
    labels = _nth(args.labels, i)
    targets = _nth(args.targets, i)
    if args.target_column:
        field = args.input_column or "text"
        return Task(name, Template.from_cli(template or "{" + field + "}"), None, target_column=args.target_column)
    label_names = labels.split(",") if labels else (list(builtin.labels) if builtin else None)
    if not label_names:
        raise ConfigError("--labels is required for a classification task (or use --target-column)")
    template = Template.from_cli(template) if template else (Template(builtin.template) if builtin else Template("{text}"))
    target_list = targets.split(",") if targets else None
    return Task(name, template, Verbalizer(label_names, target_list), label_column=args.label_column)


def _load_split(path: str, task, tokenizer, task_id: int, args):
    from .data import load_examples

    examples, skipped = load_examples(path, task, tokenizer, task_id, text_column=args.text_column,
                                      skip_bad_rows=args.skip_bad_rows, max_length=args.max_length)
    if skipped:
        print(f"skipped {skipped} bad rows in {path}", file=sys.stderr)
    return examples


def _learning_rate(text: str) -> float | str:
    """--learning-rate: 'auto' or a number (TrainConfig says which numbers are usable)."""
    return text if text == "auto" else float(text)


def _print_json(obj) -> None:
    print(json.dumps(obj, default=str))


# ---------------------------------------------------------------- train


def cmd_train(args) -> int:
    from .bank import PromptBank
    from .deep_prompt import DeepPromptModel
    from .models import load_model
    from .prompted import PromptedModel
    from .train import DEFAULT_LEARNING_RATE, EvalSet, TrainConfig, Trainer, find_learning_rate

    names = args.task
    if len(args.data) not in (1, len(names)):
        raise ConfigError(f"give --data once or once per --task ({len(names)} tasks, {len(args.data)} --data)")
    auto_lr = args.learning_rate == "auto"
    learning_rate = DEFAULT_LEARNING_RATE[args.prompt_type] if args.learning_rate in (None, "auto") else args.learning_rate
    config = from_args(TrainConfig, args, learning_rate=learning_rate)
    tasks = [_task_spec(args, i, name) for i, name in enumerate(names)]
    loaded = load_model(args.model)
    inits = {task.name: _init_config(args, task) for task in tasks}
    prompted = DeepPromptModel(loaded, inits) if args.prompt_type == "deep" else PromptedModel(loaded, inits)
    train_examples, eval_sets, test_sets = [], {}, {}
    for i, (name, task) in enumerate(zip(names, tasks, strict=True)):
        train_examples += _load_split(_nth(args.data, i), task, loaded.tokenizer, i, args)
        if args.eval_data:
            eval_sets[name] = EvalSet(task, _load_split(_nth(args.eval_data, i), task, loaded.tokenizer, i, args))
        if args.test_data:
            test_sets[name] = EvalSet(task, _load_split(_nth(args.test_data, i), task, loaded.tokenizer, i, args))
    output_dir = Path(args.output_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if auto_lr:
        search = find_learning_rate(prompted, train_examples, config)
        config = replace(config, learning_rate=search.suggested)
        print(f"learning rate {search.suggested:.3g} (LR range test over {len(search.losses)} steps)",
              file=sys.stderr)
    run_info = {"task": names, "model": args.model, "prompt_type": args.prompt_type,
                "num_virtual_tokens": args.num_virtual_tokens, "data": args.data}
    trainer = Trainer(prompted, train_examples, config, eval_sets=eval_sets, output_dir=output_dir, run_info=run_info)
    main_process = trainer.accelerator.is_main_process
    if main_process:
        trainer.on_step = _progress_bar(config.max_steps)
        print(f"model {args.model}: {trainer.trainable_parameter_count:,} trainable parameters "
              f"({len(names)} {args.prompt_type} prompt(s) x {args.num_virtual_tokens} tokens, "
              f"learning rate {config.learning_rate:.3g}); "
              f"{len(train_examples)} training examples; {trainer.accelerator.num_processes} processes"
              f"{f' (FSDP: {trainer.sharded_layers} layers sharded)' if trainer.sharded_layers else ''}; "
              f"bf16 autocast {'on' if trainer.bf16 else 'off'}", file=sys.stderr)
    if args.resume:
        resumed = trainer.load_checkpoint()
        print(f"resumed from step {trainer.step}" if resumed else f"no checkpoint in {output_dir}; starting fresh",
              file=sys.stderr)
    result = trainer.train()
    _progress_bar.close()
    tests = _test_metrics(prompted, trainer, tasks, test_sets)  # every process: FSDP forwards are collective
    if not main_process:  # every process holds the same prompt; one writes and reports
        return 0
    summary = _finish_training(args, prompted, trainer, result, tasks, tests, output_dir, PromptBank(args.bank))
    _print_json(summary) if args.json else _print_summary(summary)
    return 0


def _init_config(args, task) -> PromptTuningConfig:
    """Per-task init: class_labels takes that task's label words, and text init without a text
    starts from an instruction naming the labels (e.g. "Classify as negative or positive:")."""
    overrides = {}
    labels = task.verbalizer.labels if task.verbalizer else []
    if args.prompt_tuning_init == "class_labels" and not args.init_labels:
        overrides["init_labels"] = labels
    if args.prompt_tuning_init == "text" and not args.prompt_tuning_init_text:
        overrides["prompt_tuning_init_text"] = ("Classify as " + " or ".join(labels) + ":") if labels else "Answer:"
    return from_args(PromptTuningConfig, args, **overrides)


def _test_metrics(prompted, trainer, tasks, test_sets) -> dict[str, dict]:
    """Zero-shot and tuned test metrics per task that has test data."""
    from .evaluate import evaluate_task
    from .train import autocast

    out = {}
    for task in tasks:
        if task.name in test_sets:
            examples = test_sets[task.name].examples
            with autocast(trainer.device, trainer.bf16):
                out[task.name] = {"test_zero_shot": evaluate_task(prompted, task, examples, None),
                                  "test_tuned": evaluate_task(prompted, task, examples, task.name)}
    return out


def _finish_training(args, prompted, trainer, result, tasks, tests, output_dir: Path, bank) -> dict:
    summary = {"steps": result.steps, "best_step": result.best_step, "best_validation": result.best_metric,
               "train_seconds": round(result.seconds, 2), "examples_per_second": round(result.examples_per_second, 2),
               "trainable_parameters": result.trainable_parameters, "output_dir": str(output_dir), "tasks": {}}
    plots = _draw_plots(output_dir)
    if plots:
        summary["plots"] = [str(p) for p in plots]
    for task in tasks:
        entry = dict(tests.get(task.name, {}))
        meta = {"template": task.template.text, "verbalizer": task.verbalizer.to_dict() if task.verbalizer else None,
                "metrics": {"best_validation": result.best_metric, "best_step": result.best_step, **entry},
                "training": {"data": args.data, "eval_data": args.eval_data, **asdict(trainer.config)}}
        # The run's plots are saved with the prompt (same atomic save), so they travel with it.
        saved = replace(prompted.saved_prompt(task.name, meta), plots={p.stem: p.read_bytes() for p in plots})
        entry["path"] = str(bank.save(saved))
        summary["tasks"][task.name] = entry
    write_file(output_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def _draw_plots(output_dir: Path) -> list[Path]:
    """The run's PNG plots (drawn before the prompt is saved, to go with it); a plot that cannot be
    drawn must not cost the trained prompt, so a failure is reported and the prompt saved without."""
    from .plots import plot_training

    metrics_file = output_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        return []
    try:
        return plot_training(metrics_file, output_dir)
    except Exception as exc:  # matplotlib raises many types
        print(f"warning: could not draw the training plots: {exc}", file=sys.stderr)
        return []


def _print_summary(summary: dict) -> None:
    print(f"trained {summary['steps']} steps in {summary['train_seconds']} s "
          f"({summary['examples_per_second']} examples/s); best validation {summary['best_validation']} "
          f"at step {summary['best_step']}")
    for name, entry in summary["tasks"].items():
        if "test_tuned" in entry:
            zs, tuned = entry["test_zero_shot"], entry["test_tuned"]
            key = "accuracy" if "accuracy" in tuned else "exact_match"
            print(f"{name}: test {key} zero-shot {zs[key]:.4f} -> tuned {tuned[key]:.4f} (n={tuned['n']})")
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
            postfix = {"loss": f"{record['loss']:.4f}", "ex/s": f"{record['examples'] / record['seconds']:.1f}"}
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


# ---------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    from .bank import PromptBank
    from .data import Template
    from .evaluate import evaluate_task
    from .models import load_model
    from .prompted import PromptedModel, model_for_saved
    from .train import TrainConfig, autocast, use_bf16

    loaded = load_model(args.model)
    prompted = PromptedModel(loaded)
    task_name = None
    if args.zero_shot:
        task = _task_spec(args, 0, args.task or "zero-shot")
        if args.hard_prompt:  # the init text as a plain-text prompt, the other usual baseline
            task.template = Template(args.hard_prompt.replace("{", "{{").replace("}", "}}") + " " + task.template.text)
    else:
        if not (args.bank and args.task):
            raise ConfigError("eval needs --bank and --task, or --zero-shot")
        saved = PromptBank(args.bank, create=False).load(args.task)  # reading makes no folder
        prompted = model_for_saved(loaded, saved, args.task)
        task = _task_from_saved(args, saved)
        task_name = args.task
    examples = _load_split(args.data, task, loaded.tokenizer, 0 if task_name else -1, args)
    device = prompted.model.get_input_embeddings().weight.device
    with autocast(device, use_bf16(TrainConfig(bf16=args.bf16), device)):
        metrics = evaluate_task(prompted, task, examples, task_name, batch_size=args.batch_size)
    metrics = {"task": task_name, "zero_shot": bool(args.zero_shot), "template": task.template.text, **metrics}
    if args.json:
        _print_json(metrics)
    else:
        _print_eval(metrics)
    return 0


def _task_from_saved(args, saved):
    """The saved prompt's own template and verbalizer (read as the server reads them, by
    data.task_from_meta) unless flags override them."""
    from .data import Task, Template, task_from_meta
    from .errors import NoVerbalizerError

    meta = dict(saved.meta)
    if args.template:
        meta["template"] = Template.from_cli(args.template).text
    if args.labels:
        meta["verbalizer"] = {"labels": args.labels.split(","), "targets": args.targets.split(",") if args.targets else None}
    if args.target_column:
        return Task(saved.name, Template(meta.get("template") or "{text}"), None, target_column=args.target_column)
    try:
        task = task_from_meta(saved.name, meta)
    except NoVerbalizerError:
        raise ConfigError(f"prompt {saved.name!r} has no verbalizer; pass --labels or --target-column") from None
    task.label_column = args.label_column
    return task


def _print_eval(metrics: dict) -> None:
    if "accuracy" in metrics:
        print(f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  n={metrics['n']}")
        print("confusion (rows = gold, cols = predicted):", metrics["labels"])
        for label, row in zip(metrics["labels"], metrics["confusion_matrix"], strict=True):
            print(f"  {label:>12}: {row}")
    else:
        print(f"exact match {metrics['exact_match']:.4f}  token F1 {metrics['token_f1']:.4f}  "
              f"loss {metrics['loss']:.4f}  n={metrics['n']}")


# ---------------------------------------------------------------- generate / info


def cmd_generate(args) -> int:
    from .bank import PromptBank, read_prompt_dir
    from .models import load_model
    from .prompted import PromptedModel, model_for_saved

    loaded = load_model(args.model)
    prompted, task = PromptedModel(loaded), None
    if args.prompt and args.prompt.lower() != "none":
        saved = read_prompt_dir(args.prompt)
        prompted, task = model_for_saved(loaded, saved), saved.name
    elif args.bank and args.task:
        saved = PromptBank(args.bank, create=False).load(args.task)  # reading makes no folder
        prompted, task = model_for_saved(loaded, saved, args.task), args.task
    texts = [t.encode().decode("unicode_escape") if args.unescape else t for t in args.text]
    outputs = prompted.generate(texts, task, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    if args.json:
        _print_json({"task": task, "outputs": outputs})
    else:
        for text, out in zip(texts, outputs, strict=True):
            print(text + out)
    return 0


def cmd_info(args) -> int:
    from .models import describe, load_model

    info = describe(load_model(args.model))
    if args.json:
        _print_json(info)
    else:
        for key, value in info.items():
            print(f"{key:>22}: {value:,}" if isinstance(value, int) else f"{key:>22}: {value}")
    return 0


# ---------------------------------------------------------------- bank


def cmd_bank(args) -> int:
    from .bank import PromptBank

    bank = PromptBank(args.bank, create=args.bank_command == "import")
    if args.bank_command == "list":
        _, errors = bank.load_all()
        for name in bank.names():
            status = f"BROKEN: {errors[name]}" if name in errors else "ok"
            print(f"{name}\t{status}")
    elif args.bank_command == "show":
        saved = bank.load(args.name)
        _print_json({"name": saved.name, "shape": list(saved.embeddings.shape), "config": saved.config,
                     "meta": saved.meta, "path": str(Path(bank.root) / saved.name)})
    elif args.bank_command == "rm":
        bank.delete(args.name)
        print(f"removed {args.name}")
    elif args.bank_command == "import":
        saved = bank.import_peft(args.source, args.name)
        print(f"imported {saved.name}: {saved.num_virtual_tokens} x {saved.token_dim}")
    elif args.bank_command == "export":
        bank.export(args.name, args.dest)
        print(f"exported {args.name} to {args.dest}")
    return 0


def cmd_inspect(args) -> int:
    from .bank import PromptBank
    from .inspect import inspect_prompts
    from .models import load_model

    loaded = load_model(args.model)
    bank = PromptBank(args.bank, create=False)
    names = args.task or bank.names()
    prompts = {}
    for name in names:
        saved = bank.load(name)
        prompts[name] = saved.embeddings
    report = inspect_prompts(loaded.model, loaded.tokenizer, prompts, k=args.top_k)
    if args.json:
        _print_json(report)
        return 0
    print(f"real token embedding norms: mean {report['embedding_norms']['mean']}, "
          f"std {report['embedding_norms']['std']}")
    for name, info in report["tasks"].items():
        print(f"{name} {info['shape']}:")
        for i, (norm, near) in enumerate(zip(info["norms"], info["nearest_tokens"], strict=True)):
            words = ", ".join(f"{tok!r} {sim:.2f}" for tok, sim in near)
            print(f"  v{i:<3} norm {norm:8.3f}  nearest: {words}")
    for a, row in report["similarity"].items():
        print(f"similarity {a}: " + ", ".join(f"{b} {v:.3f}" for b, v in row.items()))
    return 0


def cmd_serve(args) -> int:
    from .scheduler import SchedulerConfig
    from .server import RequestLimits, serve
    from .tenants import read_keys
    from .vllm_backend import VLLMConfig

    if args.keys:
        read_keys(args.keys)  # a bad keys file fails now, not after the model has loaded
    serve(args.model, args.bank, host=args.host, port=args.port, backend=args.backend,
          vllm=from_args(VLLMConfig, args), scheduling=from_args(SchedulerConfig, args),
          keys=args.keys, audit_log=args.audit_log, limits=from_args(RequestLimits, args))
    return 0


def cmd_keys(args) -> int:
    from .tenants import add_tenant, read_keys, revoke_tenant

    if args.keys_command == "add":
        key = add_tenant(args.file, args.tenant, args.tasks, upload=args.upload, delete=args.delete)
        print(f"added tenant '{args.tenant}' to {args.file}; its key (shown this once, stored only as "
              "its sha256) is:", file=sys.stderr)
        print(key)
    elif args.keys_command == "revoke":
        revoke_tenant(args.file, args.tenant)
        print(f"revoked tenant '{args.tenant}'; a running server drops it within a second, or at SIGHUP",
              file=sys.stderr)
    else:
        tenants = read_keys(args.file)
        if args.json:
            _print_json([{k: v for k, v in t.to_json().items() if k != "key_sha256"} for t in tenants])
        for t in tenants if not args.json else ():
            rights = ",".join(a for a in ("upload", "delete") if getattr(t, a)) or "use"
            print(f"{t.name}\t{' '.join(t.tasks)}\t{rights}\t{t.created or ''}")
    return 0


# ---------------------------------------------------------------- compare


def cmd_compare(args) -> int:
    from tqdm import tqdm

    from .compare import CompareConfig, markdown_table, run_compare
    from .data import BUILTIN_DATASETS, Template

    config = from_args(CompareConfig, args)
    builtin = BUILTIN_DATASETS.get(args.data.split(":")[1]) if args.data.startswith("builtin:") else None
    if not args.labels and not builtin:
        raise ConfigError("--labels is required (comma-separated label names in class order)")
    labels = args.labels.split(",") if args.labels else list(builtin.labels)
    template = Template.from_cli(args.template) if args.template else Template(builtin.template if builtin else "{text}")
    output_dir = Path(args.output_dir or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S"))
    trained = {m for m in config.methods if m != "zero_shot"}
    bar = tqdm(total=config.max_steps * len(trained), desc="compare", unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(event: dict) -> None:
        bar.set_description(f"{event['method']}: {event['stage']}")
        if event["stage"] == "train":
            bar.update(1)
            bar.set_postfix(loss=f"{event['loss']:.4f}")

    try:
        results = run_compare(args.model, args.data, args.eval_data, template=template, labels=labels,
                              targets=args.targets.split(",") if args.targets else None, config=config,
                              output_dir=output_dir, progress=progress)
    finally:
        bar.close()
    print(markdown_table(results))
    print(f"compare.json, compare.md and compare.png in {output_dir}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="softprompt", description="Prompt tuning for frozen causal LMs.")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="Train soft prompts; they land in --bank",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model(p)
    p.add_argument("--task", action="append", required=True, help="Task name (repeat to train several at once)")
    _add_task_data(p, many=True)
    p.add_argument("--eval-data", action="append", help="Validation data (per task)")
    p.add_argument("--test-data", action="append", help="Test data: zero-shot vs tuned reported at the end")
    p.add_argument("--bank", required=True, help="Prompt bank folder where the trained prompts land")
    p.add_argument("--output-dir", help="Metrics, plots and checkpoint (default: runs/<time>)")
    p.add_argument("--resume", action="store_true", help="Continue from the checkpoint in --output-dir")
    p.add_argument("--json", action="store_true", help="Print the summary as JSON on the last line")
    p.add_argument("--prompt-type", choices=["deep", "soft"], default="deep",
                   help="deep: a key/value prefix in every layer (P-tuning v2; the most accurate in "
                        "bench/quality_sst2.py; served by the built-in engine later, not by vLLM); soft: "
                        "vectors before the input (Lester et al.; what vLLM prompt embeddings carry)")
    p.add_argument("--learning-rate", type=_learning_rate, default=None,
                   help="Peak learning rate, or 'auto' (an LR range test picks it). Default: "
                        "1e-2 for deep prompts, 3e-2 for soft prompts (bench/quality_sst2.py)")
    add_arguments(p, PromptTuningConfig, skip=("seed",))  # one --seed for init and batches
    add_arguments(p, TrainConfig, skip=("max_length", "learning_rate"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="Evaluate a saved prompt, or the zero-shot baseline")
    _add_model(p)
    p.add_argument("--bank", help="Prompt bank folder")
    p.add_argument("--task", help="Task in the bank to evaluate")
    p.add_argument("--zero-shot", action="store_true", help="No soft prompt: the template alone")
    p.add_argument("--hard-prompt", help="With --zero-shot: text put before the template (e.g. the init text)")
    p.add_argument("--batch-size", type=int, default=32, help="Rows per forward (default: %(default)s)")
    p.add_argument("--bf16", default="auto", choices=["auto", "yes", "no"], help="bf16 autocast")
    p.add_argument("--json", action="store_true", help="Print metrics as JSON on the last line")
    _add_task_data(p, many=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="Generate text with or without a soft prompt")
    _add_model(p)
    p.add_argument("--prompt", help="A saved prompt folder, or 'none' for the plain model")
    p.add_argument("--bank", help="Prompt bank folder (with --task)")
    p.add_argument("--task", help="Task in the bank")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--unescape", action=argparse.BooleanOptionalAction, default=True,
                   help="Decode \\n and \\t typed in the text")
    p.add_argument("--json", action="store_true")
    p.add_argument("text", nargs="+", help="Input text(s); several make one mixed batch")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="Model parameters, hidden size, vocab, fingerprint, cache path")
    _add_model(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bank", help="List, show, remove, import or export prompts in a bank")
    bank_sub = p.add_subparsers(dest="bank_command", required=True)
    for verb, text in (("list", "List tasks (broken entries flagged)"), ("show", "Shape, init, template, metrics"),
                       ("rm", "Remove a task"), ("import", "Import a PEFT prompt-tuning adapter folder"),
                       ("export", "Write a task as a plain PEFT-loadable folder")):
        q = bank_sub.add_parser(verb, help=text)
        q.add_argument("--bank", required=True, help="Prompt bank folder")
        if verb in ("show", "rm", "export"):
            q.add_argument("name", help="Task name")
        if verb == "import":
            q.add_argument("source", help="PEFT adapter folder")
            q.add_argument("name", help="Task name in the bank")
        if verb == "export":
            q.add_argument("dest", help="Destination folder (must not exist)")
    p.set_defaults(func=cmd_bank)

    p = sub.add_parser("inspect", help="What prompts mean: nearest tokens, norms, similarity between tasks")
    _add_model(p)
    p.add_argument("--bank", required=True, help="Prompt bank folder")
    p.add_argument("--task", action="append", help="Task(s) to inspect (default: all in the bank)")
    p.add_argument("--top-k", type=int, default=5, help="Nearest tokens per virtual token")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over a prompt bank")
    _add_model(p)
    p.add_argument("--bank", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["builtin", "vllm"], default="builtin",
                   help="builtin: this process runs the model; vllm: a light gateway (tokenizer, "
                        "embeddings, bank) in front of a vLLM server (default: %(default)s)")
    from .scheduler import SchedulerConfig
    p.add_argument("--keys", help="Tenants' keys file (softprompt keys add): every /v1 route then needs a "
                   "key, and each tenant sees only its tasks. The admin key is SOFTPROMPT_API_KEY")
    p.add_argument("--audit-log", help="Where admin actions are appended as JSON lines (default with "
                   "--keys: next to it, KEYS.audit.jsonl; else none)")
    from .server import RequestLimits
    from .vllm_backend import VLLMConfig

    add_arguments(p, SchedulerConfig)
    add_arguments(p, RequestLimits)
    add_arguments(p, VLLMConfig)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="Add, revoke or list tenants in a keys file for serve --keys")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    q = keys_sub.add_parser("add", help="Add a tenant with a new random key, printed once (only its hash is stored)")
    q.add_argument("file", help="Keys file (created if missing)")
    q.add_argument("--tenant", required=True, help="Tenant name (as task names: a-z 0-9 . _ -)")
    q.add_argument("--tasks", action="append", required=True,
                   help="Task name pattern the tenant may use, e.g. 'acme-*' (repeat for several)")
    q.add_argument("--upload", action="store_true", help="May upload prompts to tasks its patterns match")
    q.add_argument("--delete", action="store_true", help="May delete tasks its patterns match")
    q = keys_sub.add_parser("revoke", help="Remove a tenant and its key")
    q.add_argument("file", help="Keys file")
    q.add_argument("--tenant", required=True, help="Tenant name")
    q = keys_sub.add_parser("list", help="Tenants, their task patterns and rights (never keys)")
    q.add_argument("file", help="Keys file")
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys)

    from .compare import CompareConfig

    p = sub.add_parser("compare", help="Prompt tuning vs deep prompt vs LoRA vs full fine-tuning, measured "
                       "on your data (writes compare.json, compare.md, compare.png)")
    _add_model(p)
    p.add_argument("--data", required=True, help="Training data: JSONL/CSV/TSV/parquet file or builtin:NAME:SPLIT")
    p.add_argument("--eval-data", required=True, help="Evaluation data (the same examples for every method)")
    p.add_argument("--template", help="Input template, e.g. 'Review: {text}\\nSentiment:' (default: the "
                   "builtin set's, else '{text}')")
    p.add_argument("--labels", help="Comma-separated label names in class order (default: the builtin set's)")
    p.add_argument("--targets", help="Comma-separated target strings per label (default: ' label')")
    p.add_argument("--output-dir", help="Where the results go (default: runs/compare-<time>)")
    add_arguments(p, CompareConfig)
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except SoftPromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
