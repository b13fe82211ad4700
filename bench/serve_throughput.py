"""Mixed-task serving throughput: our engine (mixed-task batches) vs PEFT vs the plain model.

The same requests (short prompts, each naming one of T tasks, interleaved) are run three ways,
side by side in one process on one model:

  ours   Engine: batches in arrival order, any mix of tasks per batch, KV prefix cache on.
  peft   One PeftModel holding T prompt-tuning adapters (`add_adapter`). PEFT cannot mix prompt
         adapters in one batch, so requests are grouped by task, `set_adapter`, batched per group.
  plain  The base model with no prompt, batched in arrival order (transformers' own generate /
         forward): the cost floor.

Work per request is identical: `--new-tokens` greedy tokens exactly (EOS ignored everywhere), or a
rank classification over two labels. Prompts task-0..task-{T-1} are random draws of real token
embeddings (init "sampled_vocab"); their values do not change the cost.

    python bench/serve_throughput.py --model default --requests 48
    python bench/serve_throughput.py --model default --requests 256 --tasks 1 4 16 --batch-size 16

Prints a JSON summary and writes it to bench/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from softprompt.bank import PromptBank, SavedPrompt
from softprompt.model.loading import load_model
from softprompt.prompting.soft import PromptTuningConfig, init_prompt
from softprompt.serving.engine import Engine, GenerationRequest

WORDS = (
    "the film was great boring fun awful lovely slow the plot acting music story ending "
    "characters dialogue felt very quite rather not really a bit"
).split()
LABELS, TARGETS = ["positive", "negative"], [" positive", " negative"]
TEMPLATE = "Review: {text}\nSentiment:"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="default", help="Model name for load_model (default: %(default)s)."
    )
    parser.add_argument(
        "--requests", type=int, default=48, help="Requests per setting (default: %(default)s)."
    )
    parser.add_argument(
        "--tasks",
        type=int,
        nargs="+",
        default=[1, 4, 16],
        help="Numbers of interleaved tasks to measure (default: 1 4 16).",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="Rows per batch (default: %(default)s)."
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=8,
        help="Greedy new tokens per request (default: %(default)s).",
    )
    parser.add_argument(
        "--num-virtual-tokens",
        type=int,
        default=16,
        help="Soft prompt length (default: %(default)s).",
    )
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=["generate", "classify"],
        default=["generate", "classify"],
        help="Workloads to measure (default: both).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Timed rounds per system, run round-robin; the best is kept (default: %(default)s).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "serve_throughput.json")
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------- workload


def make_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(count)]


def make_prompts(loaded, count: int, n_virtual: int, seed: int) -> list[torch.Tensor]:
    def config(i):
        return PromptTuningConfig(
            num_virtual_tokens=n_virtual, prompt_tuning_init="sampled_vocab", seed=seed + i
        )

    return [init_prompt(config(i), loaded.model, loaded.tokenizer) for i in range(count)]


def build_engine(loaded, prompts, bank_dir: str) -> Engine:
    bank = PromptBank(bank_dir)
    cfg = loaded.model.config
    for i, values in enumerate(prompts):
        config = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": values.shape[0],
            "token_dim": values.shape[1],
            "num_transformer_submodules": 1,
            "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
        }
        meta = {
            "fingerprint": loaded.fingerprint,
            "template": TEMPLATE,
            "verbalizer": {"labels": LABELS, "targets": TARGETS},
        }
        bank.save(SavedPrompt(f"task-{i}", values, config, meta))
    engine = Engine(loaded, bank)
    engine.eos_token_ids = ()  # exactly --new-tokens per request, as in the other two
    engine.refresh()
    return engine


def build_peft(loaded, prompts):
    from peft import PromptTuningConfig as PeftPromptConfig
    from peft import TaskType, get_peft_model

    def config():
        return PeftPromptConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompts[0].shape[0]
        )

    peft_model = get_peft_model(loaded.model, config(), adapter_name="task-0")
    for i in range(1, len(prompts)):
        peft_model.add_adapter(f"task-{i}", config())
    with torch.no_grad():
        for i, values in enumerate(prompts):
            peft_model.prompt_encoder[f"task-{i}"].embedding.weight.copy_(values)
    peft_model.eval()
    return peft_model


# ---------------------------------------------------------------- the three systems


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ours_generate(engine, requests, args):
    for batch in chunks(requests, args.batch_size):
        engine.generate(
            [
                GenerationRequest(text, task=f"task-{t}", max_new_tokens=args.new_tokens)
                for t, text in batch
            ]
        )


def ours_classify(engine, requests, args):
    for batch in chunks(requests, args.batch_size):
        engine.classify([f"task-{t}" for t, _ in batch], [text for _, text in batch])


def hf_generate(model, tokenizer, texts, args):
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            do_sample=False,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )


def hf_classify(model, tokenizer, texts, n_virtual: int = 0):
    """Rank classification the usual way: right-padded (input + target) pairs, one forward."""
    inputs = [tokenizer(TEMPLATE.format(text=t))["input_ids"] for t in texts]
    targets = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TARGETS]
    rows = [(i, t) for i in inputs for t in targets]
    width = max(len(i) + len(t) for i, t in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (i, t) in enumerate(rows):
        ids[b, : len(i) + len(t)] = torch.tensor(i + t)
        mask[b, : len(i) + len(t)] = 1
    keep = width - min(len(i) for i, _ in rows) + 1  # logits only from the first target position
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
    logprobs = logits.log_softmax(-1)
    start = n_virtual + width - keep  # column (in the model's sequence) of logits[:, 0]
    scores = []
    for b, (i, t) in enumerate(rows):
        cols = [n_virtual + len(i) - 1 + j - start for j in range(len(t))]
        scores.append(sum(float(logprobs[b, c, tok]) for c, tok in zip(cols, t, strict=True)))
    return scores


def peft_run(peft_model, tokenizer, requests, args, mode):
    by_task: dict[int, list[str]] = {}
    for t, text in requests:
        by_task.setdefault(t, []).append(text)
    for t, texts in by_task.items():
        peft_model.set_adapter(f"task-{t}")
        for batch in chunks(texts, args.batch_size):
            if mode == "generate":
                hf_generate(peft_model, tokenizer, batch, args)
            else:
                hf_classify(peft_model, tokenizer, batch, n_virtual=args.num_virtual_tokens)


def plain_run(model, tokenizer, requests, args, mode):
    for batch in chunks([text for _, text in requests], args.batch_size):
        if mode == "generate":
            hf_generate(model, tokenizer, batch, args)
        else:
            hf_classify(model, tokenizer, batch)


# ---------------------------------------------------------------- measuring


def measure(systems: dict, requests, args, mode) -> dict:
    """Each system warmed up on one batch, then timed `--repeats` times round-robin (best kept)."""
    for run in systems.values():
        run(requests[: args.batch_size], mode)
    best = dict.fromkeys(systems, float("inf"))
    for _ in range(args.repeats):
        for name, run in systems.items():
            start = time.perf_counter()
            run(requests, mode)
            best[name] = min(best[name], time.perf_counter() - start)
    out = {
        name: {"seconds": round(s, 4), "requests_per_s": round(len(requests) / s, 3)}
        for name, s in best.items()
    }
    for name, row in out.items():
        print(f"  {mode:8s} {name:6s} {row['requests_per_s']:8.2f} req/s", file=sys.stderr)
    out["ours_over_peft"] = round(out["ours"]["requests_per_s"] / out["peft"]["requests_per_s"], 3)
    out["ours_over_plain"] = round(
        out["ours"]["requests_per_s"] / out["plain"]["requests_per_s"], 3
    )
    return out


def peft_decode_inputs(loaded, peft_model, tokenizer) -> list[int]:
    """Sequence length the base model sees at each forward of one PEFT generate (3 new tokens).

    A working KV cache shows [prompt + input, 1, 1]; a longer decode step means PEFT re-feeds its
    virtual tokens every step (slower, and not the computation intended).
    """
    lengths: list[int] = []

    def record(module, args, kwargs):
        seq = (
            kwargs.get("inputs_embeds")
            if kwargs.get("inputs_embeds") is not None
            else kwargs.get("input_ids")
        )
        lengths.append(int(seq.shape[1]))

    hook = loaded.model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        peft_model.set_adapter("task-0")
        hf_generate(peft_model, tokenizer, ["the film was great"], argparse.Namespace(new_tokens=3))
    finally:
        hook.remove()
    return lengths


def agreement(engine, peft_model, tokenizer, texts, args) -> float:
    """Max |ours - PEFT| over label log-likelihoods of task-0, one row at a time (no padding):
    evidence that both sides do the same work."""
    peft_model.set_adapter("task-0")
    worst = 0.0
    for text in texts:
        ours = engine.classify("task-0", [text])[0].log_likelihoods
        theirs = hf_classify(peft_model, tokenizer, [text], n_virtual=args.num_virtual_tokens)
        worst = max(worst, *(abs(ours[label] - s) for label, s in zip(LABELS, theirs, strict=True)))
    return worst


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = make_prompts(loaded, max(args.tasks), args.num_virtual_tokens, args.seed)
    texts = make_texts(args.requests, args.seed)
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-bank-") as bank_dir:
        engine = build_engine(loaded, prompts, bank_dir)
        peft_model = build_peft(loaded, prompts)
        systems = {
            "ours": lambda reqs, mode: (ours_generate if mode == "generate" else ours_classify)(
                engine, reqs, args
            ),
            "peft": lambda reqs, mode: peft_run(peft_model, tokenizer, reqs, args, mode),
            "plain": lambda reqs, mode: plain_run(model, tokenizer, reqs, args, mode),
        }
        results = {
            "ours_vs_peft_max_abs_logprob_diff": agreement(
                engine, peft_model, tokenizer, texts[:2], args
            ),
            "peft_generate_forward_lengths": peft_decode_inputs(loaded, peft_model, tokenizer),
        }
        for n_tasks in args.tasks:
            requests = [(i % n_tasks, text) for i, text in enumerate(texts)]  # interleaved tasks
            print(f"{n_tasks} task(s), {len(requests)} requests", file=sys.stderr)
            results[f"{n_tasks}_tasks"] = {
                mode: measure(systems, requests, args, mode) for mode in args.mode
            }
    summary = {
        "benchmark": "serve_throughput",
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {
            "name": args.model,
            "base": model.config.name_or_path,
            "dtype": str(model.dtype),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
