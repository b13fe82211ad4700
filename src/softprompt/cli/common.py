"""Flags and helpers the commands share: model and data flags, per-task flag values, the Task a
command's flags describe, loading a split (bad rows reported), logging setup, JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from softprompt.errors import ConfigError


def add_model_flag(p: argparse.ArgumentParser) -> None:
    """--model: the base model to load."""
    p.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2-135M-Instruct), "
        "'gemma3-270m', a .gguf file, a local model folder, or a hub id (default: %(default)s)",
    )


def add_task_data_flags(p: argparse.ArgumentParser, *, many: bool) -> None:
    """--data, the task's template and labels (one set per task with `many`)."""
    action = "append" if many else None
    p.add_argument(
        "--data",
        action=action,
        required=True,
        help="JSONL/CSV/TSV/parquet file, a datasets folder, or builtin:NAME:SPLIT "
        "(builtin sets: movie_sentiment, sms_spam, trec)" + (" (repeat per task)" if many else ""),
    )
    p.add_argument(
        "--template",
        action=action,
        help="Input template with {column} fields, e.g. "
        "'Review: {text}\\nSentiment:' (default: the builtin set's, else '{text}')",
    )
    p.add_argument(
        "--labels",
        action=action,
        help="Comma-separated label names in class order; "
        "integer labels index into them (default: the builtin set's)",
    )
    p.add_argument(
        "--targets",
        action=action,
        help="Comma-separated target strings per label (default: each label with a leading space)",
    )
    p.add_argument("--text-column", help="Column to use as {text}")
    p.add_argument(
        "--label-column", default="label", help="Column holding the label (default: %(default)s)"
    )
    p.add_argument(
        "--input-column", help="Free-form generation: the input column (template '{COLUMN}')"
    )
    p.add_argument(
        "--target-column", help="Free-form generation: the column holding the target text"
    )
    p.add_argument(
        "--skip-bad-rows", action="store_true", help="Drop bad rows with a count instead of failing"
    )
    p.add_argument(
        "--max-length", type=int, default=256, help="Truncate input + target (default: %(default)s)"
    )


def setup_logging(verbose: bool) -> None:
    """Log to stderr: INFO with --verbose, else warnings only."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("softprompt").setLevel(logging.INFO)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def nth(values, i: int, default=None):
    """Per-task flag value: the i-th if given per task, the only one if given once (or a scalar flag)."""
    if not isinstance(values, list):
        return default if values is None else values
    if not values:
        return default
    return values[i] if len(values) > 1 else values[0]


def task_from_flags(args, i: int, name: str):
    """A Task from the flags for the i-th task (builtin data supplies template and labels)."""
    from softprompt.data import BUILTIN_DATASETS, Task, Template, Verbalizer

    data = nth(args.data, i)
    builtin = BUILTIN_DATASETS.get(data.split(":")[1]) if str(data).startswith("builtin:") else None
    template = nth(args.template, i)
    labels = nth(args.labels, i)
    targets = nth(args.targets, i)
    if args.target_column:
        field = args.input_column or "text"
        return Task(
            name,
            Template.from_cli(template or "{" + field + "}"),
            None,
            target_column=args.target_column,
        )
    label_names = labels.split(",") if labels else (list(builtin.labels) if builtin else None)
    if not label_names:
        raise ConfigError("--labels is required for a classification task (or use --target-column)")
    template = (
        Template.from_cli(template)
        if template
        else (Template(builtin.template) if builtin else Template("{text}"))
    )
    target_list = targets.split(",") if targets else None
    return Task(
        name, template, Verbalizer(label_names, target_list), label_column=args.label_column
    )


def load_split(path: str, task, tokenizer, task_id: int, args):
    """The Examples of one data file for `task`, rows that cannot be read reported and skipped."""
    from softprompt.data import load_examples

    examples, skipped = load_examples(
        path,
        task,
        tokenizer,
        task_id,
        text_column=args.text_column,
        skip_bad_rows=args.skip_bad_rows,
        max_length=args.max_length,
    )
    if skipped:
        print(f"skipped {skipped} bad rows in {path}", file=sys.stderr)
    return examples


def parse_learning_rate(text: str) -> float | str:
    """--learning-rate: 'auto' or a number (TrainConfig says which numbers are usable)."""
    return text if text == "auto" else float(text)


def print_json(obj) -> None:
    """One JSON line on stdout (values JSON cannot hold written as strings)."""
    print(json.dumps(obj, default=str))
