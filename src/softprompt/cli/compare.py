"""`softprompt compare`: prompt tuning vs deep prompt vs LoRA vs full fine-tuning on the user's data."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from softprompt.errors import ConfigError
from softprompt.options import from_args


def cmd_compare(args) -> int:
    from tqdm import tqdm

    from softprompt.data import BUILTIN_DATASETS, Template
    from softprompt.training.compare import CompareConfig, markdown_table, run_compare

    config = from_args(CompareConfig, args)
    builtin = (
        BUILTIN_DATASETS.get(args.data.split(":")[1]) if args.data.startswith("builtin:") else None
    )
    if not args.labels and not builtin:
        raise ConfigError("--labels is required (comma-separated label names in class order)")
    labels = args.labels.split(",") if args.labels else list(builtin.labels)
    template = (
        Template.from_cli(args.template)
        if args.template
        else Template(builtin.template if builtin else "{text}")
    )
    output_dir = Path(args.output_dir or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S"))
    trained = {m for m in config.methods if m != "zero_shot"}
    bar = tqdm(
        total=config.max_steps * len(trained),
        desc="compare",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def progress(event: dict) -> None:
        bar.set_description(f"{event['method']}: {event['stage']}")
        if event["stage"] == "train":
            bar.update(1)
            bar.set_postfix(loss=f"{event['loss']:.4f}")

    try:
        results = run_compare(
            args.model,
            args.data,
            args.eval_data,
            template=template,
            labels=labels,
            targets=args.targets.split(",") if args.targets else None,
            config=config,
            output_dir=output_dir,
            progress=progress,
        )
    finally:
        bar.close()
    print(markdown_table(results))
    print(f"compare.json, compare.md and compare.png in {output_dir}", file=sys.stderr)
    return 0
