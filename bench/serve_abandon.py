"""Abandoned and large requests: how long does the next small request wait?

Over HTTP (uvicorn in this process) on the real model, with one task (a random prompt and a
two-label verbalizer: timings do not depend on the prompt's values):

  abandoned  a classify of --inputs texts, abandoned by its client after --abandon-after seconds,
             then a 1-input classify: its latency, and how long the model stayed busy
  alongside  a classify of --inputs texts kept waited for, and a 1-input classify sent
             --abandon-after seconds into it: its latency, and the large one's
  alone      a 1-input classify on an idle server (the reference)

    python bench/serve_abandon.py --model default --inputs 256

Prints a JSON summary and writes it to bench/results/serve_abandon.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from softprompt.api.app import create_app
from softprompt.bank import PromptBank, SavedPrompt
from softprompt.model.loading import load_model
from softprompt.serving.engine import Engine

TEXT = "the plot was slow but the acting and the music were lovely, and I would watch it again"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="default", help="Model name for load_model (default: %(default)s)."
    )
    parser.add_argument(
        "--inputs",
        type=int,
        default=256,
        help="Texts in the large classify (default: %(default)s).",
    )
    parser.add_argument(
        "--abandon-after", type=float, default=3.0, help="Seconds (default: %(default)s)."
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="Timed 1-input classifies (default: %(default)s)."
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "serve_abandon.json")
    )
    return parser.parse_args(argv)


def serve(loaded, bank) -> tuple[str, object]:
    import uvicorn

    app = create_app(Engine(loaded, bank))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/classify", server


def classify(url: str, n: int, timeout: float = 600) -> float:
    start = time.perf_counter()
    response = httpx.post(url, json={"model": "bench", "input": [TEXT] * n}, timeout=timeout)
    response.raise_for_status()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    loaded = load_model(args.model)
    bank = PromptBank(tempfile.mkdtemp(prefix="bench-bank-"))
    d = loaded.model.get_input_embeddings().weight.shape[1]
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 16,
        "token_dim": d,
        "num_transformer_submodules": 1,
    }
    meta = {
        "fingerprint": loaded.fingerprint,
        "template": "Review: {text}\nSentiment:",
        "verbalizer": {"labels": ["negative", "positive"]},
    }
    bank.save(SavedPrompt("bench", torch.randn(16, d) * 0.5, config, meta))
    url, server = serve(loaded, bank)
    classify(url, 4)  # warm up: the prompt's KV prefix, first-call overheads
    alone = [classify(url, 1) for _ in range(args.repeats)]

    start = time.perf_counter()
    try:
        classify(url, args.inputs, timeout=args.abandon_after)
    except httpx.TimeoutException:
        pass
    after_abandon = classify(url, 1)
    abandoned = {"next_1_input_s": after_abandon, "seconds_after_send": time.perf_counter() - start}

    with ThreadPoolExecutor(1) as pool:
        large = pool.submit(classify, url, args.inputs)
        time.sleep(args.abandon_after)
        small = classify(url, 1)
        alongside = {"small_1_input_s": small, "large_s": large.result()}
    server.should_exit = True
    result = {
        "model": args.model,
        "inputs": args.inputs,
        "abandon_after_s": args.abandon_after,
        "alone_1_input_median_s": statistics.median(alone),
        "abandoned": abandoned,
        "alongside": alongside,
        "machine": machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
