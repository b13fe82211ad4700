"""Prompt tuning on SST-2: zero-shot vs softprompt vs PEFT, same data, budget, init and evaluator.

    python bench/train_sst2.py                 # ~20 CPU minutes on 2 cores
    python bench/train_sst2.py --steps 20 --train-examples 320 --eval-examples 100   # smoke run

Each method runs in its own subprocess (so peak RSS is its own), one after the other in one run,
on the same tokenised examples: softprompt's Trainer vs PEFT's prompt tuning driven the way its
docs do it (random batches padded to the longest row, full logits, fp32). Both prompts are scored
by the same rank classifier. Writes bench/results/train_sst2.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SHARED,
    machine,
    sample_jsonl,
    split_validation,
    today,
    train_peft_prompt,
    write_jsonl,
    write_result,
)

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = ["negative", "positive"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="default")
    p.add_argument("--train", default=str(SHARED / "data/sst2/train.jsonl"))
    p.add_argument(
        "--train-examples", type=int, default=4800, help="fixed random subset of the train file"
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="default: softprompt's TrainConfig default",
    )
    p.add_argument(
        "--num-virtual-tokens", type=int, default=None, help="default: softprompt's default"
    )
    p.add_argument("--init-text", default="Classify if this review is positive or negative:")
    p.add_argument("--methods", default="zero_shot,softprompt,peft")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one method in this process
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--output", default="train_sst2.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------- shared pieces


def load(args):
    from softprompt.data import load_examples, make_classification_task
    from softprompt.model.loading import load_model
    from softprompt.prompting.prompted import PromptedModel

    loaded = load_model(args.model)
    task = make_classification_task("sst2", TEMPLATE, LABELS)
    train, _ = load_examples(Path(args.data_dir) / "train.jsonl", task, loaded.tokenizer, 0)
    evaluation, _ = load_examples(Path(args.data_dir) / "eval.jsonl", task, loaded.tokenizer, 0)
    return loaded, PromptedModel(loaded), task, train, evaluation


def defaults(args):
    from softprompt.prompting.soft import PromptTuningConfig
    from softprompt.training.trainer import TrainConfig

    lr = args.learning_rate if args.learning_rate is not None else TrainConfig().learning_rate
    n_default = PromptTuningConfig.__dataclass_fields__["num_virtual_tokens"].default
    n = args.num_virtual_tokens if args.num_virtual_tokens is not None else n_default
    return lr, n


def score(prompted, task, evaluation, task_name):
    from softprompt.training.evaluation import evaluate_classification
    from softprompt.training.trainer import TrainConfig, autocast, use_bf16

    device = prompted.model.get_input_embeddings().weight.device
    with autocast(device, use_bf16(TrainConfig(), device)):  # one evaluator, one precision for all
        return evaluate_classification(prompted, task, evaluation, task_name)


# ---------------------------------------------------------------- methods (one per subprocess)


def run_zero_shot(args) -> dict:
    _, prompted, task, _, evaluation = load(args)
    metrics = score(prompted, task, evaluation, None)
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "n_eval": metrics["n"],
    }


def run_softprompt(args) -> dict:
    from softprompt.prompting.soft import PromptTuningConfig
    from softprompt.training.trainer import TrainConfig, Trainer

    _, prompted, task, train, evaluation = load(args)
    lr, n = defaults(args)
    prompted.add_task(
        "sst2",
        PromptTuningConfig(
            num_virtual_tokens=n, prompt_tuning_init="text", prompt_tuning_init_text=args.init_text
        ),
    )
    config = TrainConfig(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        eval_steps=args.steps,
    )
    trainer = Trainer(prompted, train, config)
    result = trainer.train()
    metrics = score(prompted, task, evaluation, "sst2")
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "n_eval": metrics["n"],
        "train_seconds": result.seconds,
        "examples_per_second": result.examples_per_second,
        "trainable_parameters": result.trainable_parameters,
        "learning_rate": lr,
        "num_virtual_tokens": n,
        "bf16_autocast": trainer.bf16,
        "final_loss": result.history[-1]["loss"],
    }


def run_peft(args) -> dict:
    """PEFT prompt tuning the way its docs train it: shuffled batches, right padding, full logits."""
    loaded, prompted, task, train, evaluation = load(args)
    lr, n = defaults(args)
    prompt, seconds, last_loss = train_peft_prompt(
        loaded,
        train,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=lr,
        num_virtual_tokens=n,
        init_text=args.init_text,
    )
    prompted.add_task("peft", prompt)
    metrics = score(prompted, task, evaluation, "peft")
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "n_eval": metrics["n"],
        "train_seconds": seconds,
        "examples_per_second": args.steps * args.batch_size / seconds,
        "trainable_parameters": prompt.numel(),
        "learning_rate": lr,
        "num_virtual_tokens": n,
        "final_loss": last_loss,
    }


PHASES = {"zero_shot": run_zero_shot, "softprompt": run_softprompt, "peft": run_peft}


def run_phase(args) -> None:
    torch.manual_seed(0)
    result = PHASES[args.phase](args)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


# ---------------------------------------------------------------- driver


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:
        run_phase(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(
            sample_jsonl(Path(args.train), args.train_examples, seed=0), Path(tmp) / "train.jsonl"
        )
        write_jsonl(
            split_validation("sst2")[1], Path(tmp) / "eval.jsonl"
        )  # rows that chose nothing
        results = {}
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--phase", method, "--data-dir", tmp] + (
                argv or sys.argv[1:]
            )
            print(f"running {method} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return 1
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
            print(method, results[method], file=sys.stderr, flush=True)
    report = summarise(args, results)
    path = write_result(args.output, report)
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def summarise(args, results: dict) -> dict:
    summary = {name: {"accuracy": round(r["accuracy"], 4)} for name, r in results.items()}
    ours, peft = results.get("softprompt"), results.get("peft")
    if ours and peft:
        summary["speedup_examples_per_second"] = round(
            ours["examples_per_second"] / peft["examples_per_second"], 2
        )
        summary["peak_rss_ratio"] = round(ours["peak_rss_bytes"] / peft["peak_rss_bytes"], 3)
        summary["accuracy_delta_vs_peft"] = round(ours["accuracy"] - peft["accuracy"], 4)
    return {
        "benchmark": "train_sst2",
        "model": args.model,
        "machine": machine(),
        "date": today(),
        "settings": {
            "train_examples": args.train_examples,
            "eval_examples": "700 report rows (bench/common.split_validation)",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "template": TEMPLATE,
            "labels": LABELS,
            "init_text": args.init_text,
        },
        "command": "python bench/train_sst2.py " + " ".join(sys.argv[1:]),
        "results": results,
        "summary": summary,
    }


if __name__ == "__main__":
    sys.exit(main())
