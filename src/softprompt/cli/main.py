"""The parser (every command's flags, built in one place) and `main`: run the chosen command, turn
every SoftPromptError into one `error: ...` line and exit status 2."""

from __future__ import annotations

import argparse
import sys

from softprompt import __version__
from softprompt.cli.bank import cmd_bank, cmd_inspect
from softprompt.cli.common import (
    add_model_flag,
    add_task_data_flags,
    parse_learning_rate,
    setup_logging,
)
from softprompt.cli.compare import cmd_compare
from softprompt.cli.model import cmd_eval, cmd_generate, cmd_info
from softprompt.cli.serve import cmd_keys, cmd_serve
from softprompt.cli.train import cmd_train
from softprompt.errors import SoftPromptError
from softprompt.options import add_arguments
from softprompt.prompting.soft import PromptTuningConfig


def build_parser() -> argparse.ArgumentParser:
    from softprompt.prompting.kinds import KINDS
    from softprompt.training.trainer import TrainConfig

    parser = argparse.ArgumentParser(
        prog="softprompt", description="Prompt tuning for frozen causal LMs."
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="Log progress details to stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="Train soft prompts; they land in --bank",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_flag(p)
    p.add_argument(
        "--task", action="append", required=True, help="Task name (repeat to train several at once)"
    )
    add_task_data_flags(p, many=True)
    p.add_argument("--eval-data", action="append", help="Validation data (per task)")
    p.add_argument(
        "--test-data", action="append", help="Test data: zero-shot vs tuned reported at the end"
    )
    p.add_argument(
        "--bank", required=True, help="Prompt bank folder where the trained prompts land"
    )
    p.add_argument("--output-dir", help="Metrics, plots and checkpoint (default: runs/<time>)")
    p.add_argument(
        "--resume", action="store_true", help="Continue from the checkpoint in --output-dir"
    )
    p.add_argument("--json", action="store_true", help="Print the summary as JSON on the last line")
    p.add_argument(
        "--prompt-type",
        choices=sorted(KINDS),
        default="deep",
        help="deep: a key/value prefix in every layer (P-tuning v2; the most accurate in "
        "bench/quality_sst2.py; served by the built-in engine later, not by vLLM); soft: "
        "vectors before the input (Lester et al.; what vLLM prompt embeddings carry)",
    )
    p.add_argument(
        "--learning-rate",
        type=parse_learning_rate,
        default=None,
        help="Peak learning rate, or 'auto' (an LR range test picks it). Default: "
        + ", ".join(f"{k.default_learning_rate:g} for {name} prompts" for name, k in KINDS.items())
        + " (bench/quality_sst2.py)",
    )
    add_arguments(p, PromptTuningConfig, skip=("seed",))  # one --seed for init and batches
    add_arguments(p, TrainConfig, skip=("max_length", "learning_rate"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="Evaluate a saved prompt, or the zero-shot baseline")
    add_model_flag(p)
    p.add_argument("--bank", help="Prompt bank folder")
    p.add_argument("--task", help="Task in the bank to evaluate")
    p.add_argument("--zero-shot", action="store_true", help="No soft prompt: the template alone")
    p.add_argument(
        "--hard-prompt", help="With --zero-shot: text put before the template (e.g. the init text)"
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="Rows per forward (default: %(default)s)"
    )
    p.add_argument("--bf16", default="auto", choices=["auto", "yes", "no"], help="bf16 autocast")
    p.add_argument("--json", action="store_true", help="Print metrics as JSON on the last line")
    add_task_data_flags(p, many=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="Generate text with or without a soft prompt")
    add_model_flag(p)
    p.add_argument("--prompt", help="A saved prompt folder, or 'none' for the plain model")
    p.add_argument("--bank", help="Prompt bank folder (with --task)")
    p.add_argument("--task", help="Task in the bank")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--unescape",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Decode \\n and \\t typed in the text",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("text", nargs="+", help="Input text(s); several make one mixed batch")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="Model parameters, hidden size, vocab, fingerprint, cache path")
    add_model_flag(p)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--source",
        action="store_true",
        help="Print only the model's local folder (config, weights, tokenizer; an embedded model's "
        "is its converted copy), e.g. lm-eval's tokenizer=; the model is not loaded",
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bank", help="List, show, remove, import or export prompts in a bank")
    bank_sub = p.add_subparsers(dest="bank_command", required=True)
    for verb, text in (
        (
            "list",
            "List tasks, each 'ok', 'BROKEN: why' (its files) or 'UNUSABLE with model M: why' "
            "(trained on another base model, another width or kind), as `serve --model` would "
            "judge them with --model (default: the default model)",
        ),
        ("show", "Shape, init, template, metrics"),
        ("rm", "Remove a task"),
        ("import", "Import a PEFT prompt-tuning adapter folder"),
        ("export", "Write a task as a plain PEFT-loadable folder"),
    ):
        q = bank_sub.add_parser(verb, help=text, description=text)
        q.add_argument("--bank", required=True, help="Prompt bank folder")
        if verb == "list":
            add_model_flag(q)  # the model the tasks are checked against
        if verb in ("show", "rm", "export"):
            q.add_argument("name", help="Task name")
        if verb == "import":
            q.add_argument("source", help="PEFT adapter folder")
            q.add_argument("name", help="Task name in the bank")
        if verb == "export":
            q.add_argument("dest", help="Destination folder (must not exist)")
    p.set_defaults(func=cmd_bank)

    p = sub.add_parser(
        "inspect", help="What prompts mean: nearest tokens, norms, similarity between tasks"
    )
    add_model_flag(p)
    p.add_argument("--bank", required=True, help="Prompt bank folder")
    p.add_argument("--task", action="append", help="Task(s) to inspect (default: all in the bank)")
    p.add_argument("--top-k", type=int, default=5, help="Nearest tokens per virtual token")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over a prompt bank")
    add_model_flag(p)
    p.add_argument("--bank", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--backend",
        choices=["builtin", "vllm"],
        default="builtin",
        help="builtin: this process runs the model; vllm: a light gateway (tokenizer, "
        "embeddings, bank) in front of a vLLM server (default: %(default)s)",
    )
    from softprompt.serving.scheduler import SchedulerConfig

    p.add_argument(
        "--keys",
        help="Tenants' keys file (softprompt keys add): every /v1 route then needs a "
        "key, and each tenant sees only its tasks. The admin key is SOFTPROMPT_API_KEY",
    )
    p.add_argument(
        "--audit-log",
        help="Where admin actions are appended as JSON lines (default with "
        "--keys: next to it, KEYS.audit.jsonl; else none)",
    )
    from softprompt.api.app import ProxyConfig, RequestLimits
    from softprompt.serving.registry import TierConfig
    from softprompt.serving.vllm.backend import VLLMConfig

    add_arguments(p, SchedulerConfig)
    add_arguments(p, TierConfig)
    add_arguments(p, RequestLimits)
    add_arguments(p, ProxyConfig)
    add_arguments(p, VLLMConfig)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="Add, revoke or list tenants in a keys file for serve --keys")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    q = keys_sub.add_parser(
        "add", help="Add a tenant with a new random key, printed once (only its hash is stored)"
    )
    q.add_argument("file", help="Keys file (created if missing)")
    q.add_argument("--tenant", required=True, help="Tenant name (as task names: a-z 0-9 . _ -)")
    q.add_argument(
        "--tasks",
        action="append",
        required=True,
        help="Task name pattern the tenant may use, e.g. 'acme-*' (repeat for several)",
    )
    q.add_argument(
        "--upload", action="store_true", help="May upload prompts to tasks its patterns match"
    )
    q.add_argument("--delete", action="store_true", help="May delete tasks its patterns match")
    q = keys_sub.add_parser("revoke", help="Remove a tenant and its key")
    q.add_argument("file", help="Keys file")
    q.add_argument("--tenant", required=True, help="Tenant name")
    q = keys_sub.add_parser("list", help="Tenants, their task patterns and rights (never keys)")
    q.add_argument("file", help="Keys file")
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys)

    from softprompt.training.compare import CompareConfig

    p = sub.add_parser(
        "compare",
        help="Prompt tuning vs deep prompt vs LoRA vs full fine-tuning, measured "
        "on your data (writes compare.json, compare.md, compare.png)",
    )
    add_model_flag(p)
    p.add_argument(
        "--data",
        required=True,
        help="Training data: JSONL/CSV/TSV/parquet file or builtin:NAME:SPLIT",
    )
    p.add_argument(
        "--eval-data", required=True, help="Evaluation data (the same examples for every method)"
    )
    p.add_argument(
        "--template",
        help="Input template, e.g. 'Review: {text}\\nSentiment:' (default: the "
        "builtin set's, else '{text}')",
    )
    p.add_argument(
        "--labels", help="Comma-separated label names in class order (default: the builtin set's)"
    )
    p.add_argument("--targets", help="Comma-separated target strings per label (default: ' label')")
    p.add_argument("--output-dir", help="Where the results go (default: runs/compare-<time>)")
    add_arguments(p, CompareConfig)
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except SoftPromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
