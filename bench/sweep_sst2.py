"""How softprompt's defaults were chosen: a small sweep on SST-2, scored on validation rows that
bench/train_sst2.py does not report on (so the reported accuracy is not the selection set).

    python bench/sweep_sst2.py            # ~25 CPU minutes on 2 cores; writes bench/results/sweep_sst2.json

Same budget as the benchmark (300 steps x 16 on a fixed 4,800-example subset). Stage 1 sweeps the
learning rate with 8 text-initialised tokens; stage 2 tries other shapes/inits (--stage2) at
the best learning rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine, sample_jsonl, today, write_result  # noqa: E402
from train_sst2 import LABELS, TEMPLATE  # noqa: E402

INIT_TEXT = "Classify if this review is positive or negative:"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-examples", type=int, default=4800)
    p.add_argument("--select-examples", type=int, default=500)
    p.add_argument("--learning-rates", default="0.03,0.1,0.3")
    p.add_argument("--stage2", default="16:text", help="n:init pairs tried at the best learning rate")
    args = p.parse_args(argv)
    args.stage2 = [(int(n), init) for n, init in (x.split(":") for x in args.stage2.split(",") if x)]
    return args


def selection_rows(n: int) -> list[dict]:
    """Validation rows outside train_sst2.py's reported subset (seed 1, 1,000 rows)."""
    path = SHARED / "data/sst2/validation.jsonl"
    reported = {r["text"] for r in sample_jsonl(path, 1000, seed=1)}
    rest = [r for r in sample_jsonl(path, 0, seed=0) if r["text"] not in reported]
    return rest[:n]


def encode(rows, task, tokenizer):
    from softprompt.data import encode_example

    return [encode_example(tokenizer, task, r, 0, line=i + 1) for i, r in enumerate(rows)]


def run_one(loaded, task, train, select, *, lr, n, init, args) -> dict:
    from softprompt.evaluate import evaluate_classification
    from softprompt.prompted import PromptedModel
    from softprompt.prompts import PromptTuningConfig
    from softprompt.train import TrainConfig, Trainer, autocast

    prompted = PromptedModel(loaded)
    prompted.add_task("sst2", PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init=init,
                                                 prompt_tuning_init_text=INIT_TEXT, init_labels=LABELS))
    trainer = Trainer(prompted, train, TrainConfig(max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                                   learning_rate=lr, eval_steps=args.steps))
    start = time.perf_counter()
    result = trainer.train()
    with autocast(trainer.device, trainer.bf16):
        metrics = evaluate_classification(prompted, task, select, "sst2")
    row = {"learning_rate": lr, "num_virtual_tokens": n, "init": init, "accuracy": metrics["accuracy"],
           "final_loss": result.history[-1]["loss"], "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main(argv=None) -> int:
    from softprompt.data import make_classification_task
    from softprompt.models import load_model

    args = parse_args(argv)
    loaded = load_model(args.model)
    task = make_classification_task("sst2", TEMPLATE, LABELS)
    train = encode(sample_jsonl(SHARED / "data/sst2/train.jsonl", args.train_examples, seed=0), task, loaded.tokenizer)
    select = encode(selection_rows(args.select_examples), task, loaded.tokenizer)
    rows = [run_one(loaded, task, train, select, lr=float(lr), n=8, init="text", args=args)
            for lr in args.learning_rates.split(",")]
    best_lr = max(rows, key=lambda r: r["accuracy"])["learning_rate"]
    for n, init in args.stage2:
        rows.append(run_one(loaded, task, train, select, lr=best_lr, n=n, init=init, args=args))
    best = max(rows, key=lambda r: r["accuracy"])
    report = {"benchmark": "sweep_sst2", "model": args.model, "machine": machine(), "date": today(),
              "command": "python bench/sweep_sst2.py " + " ".join(sys.argv[1:]),
              "settings": {"steps": args.steps, "batch_size": args.batch_size, "train_examples": args.train_examples,
                           "selection_examples": len(select), "template": TEMPLATE},
              "runs": rows, "best": best}
    print(json.dumps(best))
    print(f"wrote {write_result('sweep_sst2.json', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
