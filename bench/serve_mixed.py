"""Mixed serving load: short requests arriving while a long generation runs, static vs continuous
batching, in one run on one machine.

The built-in engine's scheduler (`softprompt.serving.scheduler.BatchScheduler`) runs in-process, without
HTTP, once with `join_running=False` (static: a batch runs to its end before anything else
starts) and once with `join_running=True` (continuous: new rows join the running batch at its
next step, scoring runs between steps). Per mode and repeat:

  mixed    one long generation (256 new tokens, greedy, `ignore_eos` so it really runs 256 steps)
           starts; once it streams its first text, 32 short requests arrive one every
           --interval-ms (default: the long generation's time alone / 32, so the arrivals are
           spread over its life, and a short request seldom meets another short one: what is
           measured is the long generation's effect; a smaller --interval-ms measures a denser
           load): over 8 tasks, half /v1/classify-like (one input, rank classification), half
           8-token greedy generations. Each short request's latency is from its arrival to its
           result.
  alone    each of the 32 short requests alone on an idle scheduler (its latency alone), and
           the long generation alone.
  uniform  32 generations of 32 tokens queued at once (throughput when nothing is mixed),
           --uniform-repeats runs per mode alternating, the medians compared.

Also measured, side by side: a decoding step of 1-16 rows with the engine's small-batch product
on CPU (`softprompt.small_batch`) and with the library's kernel.

Reported: p50 / p95 latency of the short requests alone and under the long generation, their
ratio (target: p95 under the long generation <= 2x p95 alone), the long generation's own
latency, and throughput (generated tokens plus classified inputs per second).

    python bench/serve_mixed.py --model default

Prints a JSON summary and writes it to bench/results/serve_mixed.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from serve_latency import prompt_values  # noqa: E402

from softprompt.bank import PromptBank, SavedPrompt
from softprompt.model.loading import load_model
from softprompt.model.small_batch import use_small_batch_matmul
from softprompt.prompting import inject
from softprompt.serving.engine import ClassifyRequest, Engine, GenerationRequest
from softprompt.serving.scheduler import BatchScheduler

TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = {"labels": ["positive", "negative"], "targets": [" positive", " negative"]}
TEXTS = [
    "the plot was slow but the acting was lovely",
    "a dull, joyless film",
    "I laughed the whole time",
    "the music alone is worth it",
    "two hours I will never get back",
    "a warm and clever story",
    "the ending made no sense",
    "beautifully shot and well acted",
]
LONG_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle.\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="default", help="Model name for load_model (default: %(default)s)."
    )
    parser.add_argument(
        "--tasks", type=int, default=8, help="Soft-prompt tasks (default: %(default)s)."
    )
    parser.add_argument(
        "--num-virtual-tokens", type=int, default=16, help="Prompt length (default: %(default)s)."
    )
    parser.add_argument(
        "--short", type=int, default=32, help="Short requests per run (default: %(default)s)."
    )
    parser.add_argument(
        "--short-tokens", type=int, default=8, help="New tokens of a short generation."
    )
    parser.add_argument(
        "--long-tokens", type=int, default=256, help="New tokens of the long generation."
    )
    parser.add_argument(
        "--interval-ms",
        type=float,
        default=0.0,
        help="Between short arrivals (default 0: the long generation's time alone / --short).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="Mixed runs per mode, alternating (default: %(default)s).",
    )
    parser.add_argument(
        "--uniform-repeats",
        type=int,
        default=3,
        help="Uniform-load runs per mode (default: %(default)s).",
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "serve_mixed.json")
    )
    return parser.parse_args(argv)


def fill_bank(loaded, bank: PromptBank, args) -> list[str]:
    names = [f"task-{i}" for i in range(args.tasks)]
    cfg = loaded.model.config
    for i, name in enumerate(names):
        values = prompt_values(loaded, args.num_virtual_tokens, seed=i)
        config = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": values.shape[0],
            "token_dim": values.shape[1],
            "num_transformer_submodules": 1,
            "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
        }
        meta = {"fingerprint": loaded.fingerprint, "template": TEMPLATE, "verbalizer": VERBALIZER}
        bank.save(SavedPrompt(name, values, config, meta))
    return names


def short_requests(names: list[str], args) -> list:
    """Half classifications, half short generations, over every task."""
    out = []
    for i in range(args.short):
        task, text = names[i % len(names)], TEXTS[i % len(TEXTS)]
        if i % 2:
            out.append(ClassifyRequest(task, [text]))
        else:
            out.append(
                GenerationRequest(
                    TEMPLATE.format(text=text), task=task, max_new_tokens=args.short_tokens
                )
            )
    return out


def work_units(request, result) -> int:
    """Generated tokens, or inputs classified."""
    return (
        result.completion_tokens if isinstance(request, GenerationRequest) else len(request.texts)
    )


def timed(scheduler: BatchScheduler, engine: Engine, request, record: list) -> threading.Event:
    """Submit `request`; on its result append (latency_s, work units, end time) to `record`."""
    done, start = threading.Event(), time.perf_counter()
    future = scheduler.enqueue(engine.prepare(request))

    def finished(f):
        record.append(
            (time.perf_counter() - start, work_units(request, f.result()), time.perf_counter())
        )
        done.set()

    future.add_done_callback(finished)
    return done


def long_alone(engine: Engine, args) -> float:
    """Seconds of the long generation on an idle scheduler."""
    record: list = []
    scheduler = BatchScheduler(engine, max_wait_ms=0)
    try:
        timed(scheduler, engine, long_request(args), record).wait()
    finally:
        scheduler.close()
    return record[0][0]


def long_request(args, on_text=None) -> GenerationRequest:
    return GenerationRequest(
        LONG_PROMPT, max_new_tokens=args.long_tokens, ignore_eos=True, on_text=on_text
    )


def decode_step_ms(loaded, rows_list=(1, 2, 4, 8, 16), steps: int = 6) -> dict:
    """Ms of a decoding step (rows at ~100 cached columns) with the small-batch product and with
    the library's kernel on the same model: per kernel, two alternating runs of `steps` steps,
    the lower of the two runs' medians (the machine's noise only adds time)."""
    tokenizer, model = loaded.tokenizer, loaded.model
    ids = tokenizer([LONG_PROMPT * 4], return_tensors="pt").input_ids
    out: dict = {}
    for rows in rows_list:
        for kernel, enabled in (
            ("library", False),
            ("small_batch", True),
            ("library", False),
            ("small_batch", True),
        ):
            use_small_batch_matmul(model, enabled)
            state = inject.prefill(
                model, ids.repeat(rows, 1), torch.ones(rows, ids.shape[1], dtype=torch.long)
            )
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                state = inject.decode(model, state, state.logits.argmax(-1))
                times.append(time.perf_counter() - start)
            out.setdefault(str(rows), {}).setdefault(kernel, []).append(
                statistics.median(times[1:]) * 1000
            )
    use_small_batch_matmul(model, True)
    return {
        rows: {kernel: round(min(ms), 1) for kernel, ms in kernels.items()}
        for rows, kernels in out.items()
    }


def alone(engine: Engine, join: bool, requests: list) -> list[float]:
    scheduler = BatchScheduler(engine, max_wait_ms=0, join_running=join)
    try:
        latencies = []
        for request in requests:
            record: list = []
            timed(scheduler, engine, request, record).wait()
            latencies.append(record[0][0])
        return latencies
    finally:
        scheduler.close()


def mixed(engine: Engine, join: bool, requests: list, args) -> dict:
    scheduler = BatchScheduler(engine, args.max_batch_size, max_wait_ms=0, join_running=join)
    try:
        first_text = threading.Event()
        long = long_request(args, on_text=lambda _: first_text.set())
        long_record, short_record, events = [], [], []
        start = time.perf_counter()
        events.append(timed(scheduler, engine, long, long_record))
        first_text.wait(60)
        for request in requests:
            events.append(timed(scheduler, engine, request, short_record))
            time.sleep(args.interval_ms / 1000)
        for event in events:
            event.wait()
        wall = max(end for _, _, end in long_record + short_record) - start
        units = sum(u for _, u, _ in long_record + short_record)
        return {
            "short_s": [lat for lat, _, _ in short_record],
            "long_s": long_record[0][0],
            "long_tokens": long_record[0][1],
            "wall_s": wall,
            "units_per_s": units / wall,
            "largest_batch": scheduler.largest_batch,
        }
    finally:
        scheduler.close()


def uniform(engine: Engine, join: bool, names: list[str], args) -> dict:
    """32 generations of 32 tokens, prepared first and then queued together (so both modes start
    from the same full batch): generated tokens per second."""
    scheduler = BatchScheduler(engine, args.max_batch_size, max_wait_ms=5, join_running=join)
    try:
        requests = [
            GenerationRequest(
                TEMPLATE.format(text=TEXTS[i % 8]), task=names[i % len(names)], max_new_tokens=32
            )
            for i in range(32)
        ]
        prepared = [engine.prepare(r) for r in requests]
        start = time.perf_counter()
        results = [f.result() for f in [scheduler.enqueue(p) for p in prepared]]
        wall = time.perf_counter() - start
        tokens = sum(r.completion_tokens for r in results)
        return {"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2)}
    finally:
        scheduler.close()


def uniform_runs(engine: Engine, modes: dict, names: list[str], args) -> dict:
    """--uniform-repeats runs per mode, alternating; the median tokens/s and every run."""
    runs: dict[str, list] = {mode: [] for mode in modes}
    for _ in range(args.uniform_repeats):
        for mode, join in modes.items():
            runs[mode].append(uniform(engine, join, names, args))
    return {
        mode: {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mode_runs),
            "runs": mode_runs,
        }
        for mode, mode_runs in runs.items()
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(alone_s: list[float], runs: list[dict]) -> dict:
    short = [s for run in runs for s in run["short_s"]]
    out = {
        "alone_p50_ms": pct(alone_s, 0.5) * 1000,
        "alone_p95_ms": pct(alone_s, 0.95) * 1000,
        "mixed_p50_ms": pct(short, 0.5) * 1000,
        "mixed_p95_ms": pct(short, 0.95) * 1000,
        "long_generation_s": statistics.mean(run["long_s"] for run in runs),
        "mixed_units_per_s": statistics.mean(run["units_per_s"] for run in runs),
        "largest_batch": max(run["largest_batch"] for run in runs),
        "short_requests_n": len(short),
    }
    out["p95_ratio_mixed_vs_alone"] = out["mixed_p95_ms"] / out["alone_p95_ms"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    loaded = load_model(args.model)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-mixed-") as tmp:
        bank = PromptBank(Path(tmp) / "bank")
        names = fill_bank(loaded, bank, args)
        engine = Engine(loaded, bank)
        requests = short_requests(names, args)
        engine.run(engine.prepare_all(requests))  # warm: tasks loaded, KV prefixes computed
        modes = {"static": False, "continuous": True}
        alone_s = {mode: alone(engine, join, requests) for mode, join in modes.items()}
        long_alone_s = long_alone(engine, args)
        if not args.interval_ms:
            args.interval_ms = round(1000 * long_alone_s / args.short, 1)
        runs: dict[str, list] = {mode: [] for mode in modes}
        for _ in range(args.repeats):  # alternate, so a noisy moment hits both modes
            for mode, join in modes.items():
                runs[mode].append(mixed(engine, join, requests, args))
                print(
                    f"  {mode}: long {runs[mode][-1]['long_s']:.1f} s, short p95 "
                    f"{pct(runs[mode][-1]['short_s'], 0.95):.2f} s",
                    file=sys.stderr,
                )
        uniform_load = uniform_runs(engine, modes, names, args)
    decode_steps = decode_step_ms(loaded)
    results = {
        mode: {**summary(alone_s[mode], runs[mode]), "uniform": uniform_load[mode]}
        for mode in modes
    }
    continuous = results["continuous"]
    result = {
        "benchmark": "serve_mixed",
        "command": "python bench/serve_mixed.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_1_5_15min": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "model": {"name": args.model, "base": loaded.name, "dtype": str(loaded.model.dtype)},
        "settings": vars(args),
        "long_generation_alone_s": round(long_alone_s, 3),
        "results": results,
        "decode_step_ms_by_rows": decode_steps,
        "targets": {
            "short_p95_under_long_le_2x_alone": continuous["p95_ratio_mixed_vs_alone"] <= 2.0,
            "uniform_throughput_not_below_static": (
                continuous["uniform"]["tokens_per_s"]
                >= results["static"]["uniform"]["tokens_per_s"]
            ),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")  # written whole, then renamed over the old result
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(out)
    print(
        json.dumps(
            {
                "long_generation_alone_s": result["long_generation_alone_s"],
                "results": results,
                "decode_step_ms_by_rows": decode_steps,
                "targets": result["targets"],
            },
            indent=2,
        )
    )
    return result


if __name__ == "__main__":
    main()
