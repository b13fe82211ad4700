"""Serving a large bank: start-up, memory, listing and request latency with 1 to 10,000 tasks.

For each bank size (and prompt kind) a bank of generated tasks is written through the bank's own
save API (random rows of real token embeddings for soft prompts, random key/value rows at a
trained deep prompt's scale for deep ones; each with a template and a verbalizer), then the real
`softprompt serve` runs on it, alone, in its own process:

  startup_s          from starting the process to /health answering 200, the median of
                     --startup-repeats starts (after one unmeasured start, so that every start
                     finds the model's files in the page cache)
  rss_mb             the server's resident memory after start-up, after the load, and the peak
  models_*_s         GET /v1/models (its first page): the first call, and the median of the next
  classify, generate /v1/classify (one text) and /v1/completions (32 tokens, greedy, no early
                     stop) from --concurrency clients, tasks drawn with Zipf (s = 1.1, rank order
                     shuffled) or uniform popularity; p50/p95 latency and throughput, and the
                     throughput as a fraction of the same load on a bank of one task

Banks live under --bank-dir (default /tmp, never the repository) and are reused by later runs
with the same settings; deep banks stop at --max-deep-tasks (a 16-token deep prompt of SmolLM2
is 0.74 MB). Extra flags for the server (e.g. memory tiers) go in --server-args.

    python bench/serve_scale.py                                    # 100, 1,000, 10,000 tasks
    python bench/serve_scale.py --sizes 100 --requests 16 --out /tmp/scale.json
    python bench/serve_scale.py --server-args "--max-loaded-tasks 256 --max-resident-tasks 64"

Writes bench/results/serve_scale.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from softprompt.bank import PromptBank, SavedPrompt, peft_prompt_config  # noqa: E402
from softprompt.model.loading import load_model  # noqa: E402
from softprompt.prompting.deep import DeepPromptModel  # noqa: E402
from softprompt.serving.vllm.process import free_port  # noqa: E402

ZIPF_S = 1.1
TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = {"labels": ["positive", "negative"], "targets": [" positive", " negative"]}
WORDS = (
    "the film was great boring fun awful lovely slow the plot acting music story ending "
    "characters dialogue felt very quite rather not really a bit"
).split()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="Model to serve (default: %(default)s).")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100, 1000, 10000],
        help="Bank sizes in tasks; a 1-task bank is always measured as the baseline.",
    )
    parser.add_argument("--kinds", nargs="+", choices=["soft", "deep"], default=["soft", "deep"])
    parser.add_argument(
        "--max-deep-tasks",
        type=int,
        default=1000,
        help="Largest deep-prompt bank (disk: ~0.74 MB a task on SmolLM2; default: %(default)s).",
    )
    parser.add_argument(
        "--requests", type=int, default=128, help="Timed requests per load (default: %(default)s)."
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="Concurrent clients (default: %(default)s)."
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens per generation.")
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    parser.add_argument(
        "--server-args",
        default="",
        help="Extra flags for `softprompt serve`, one string (e.g. tier bounds).",
    )
    parser.add_argument("--models-repeats", type=int, default=10, help="Timed GET /v1/models.")
    parser.add_argument(
        "--startup-repeats",
        type=int,
        default=3,
        help="Server starts per bank; the median is reported (default: %(default)s).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of banks, texts and popularity.")
    parser.add_argument(
        "--bank-dir",
        default="/tmp/softprompt-serve-scale",
        help="Where the generated banks live (reused across runs; default: %(default)s).",
    )
    parser.add_argument(
        "--clean", action="store_true", help="Remove the generated banks at the end."
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "serve_scale.json")
    )
    args = parser.parse_args(argv)
    for name in (
        "requests",
        "concurrency",
        "new_tokens",
        "num_virtual_tokens",
        "models_repeats",
        "startup_repeats",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.sizes) < 1:
        parser.error("--sizes must be >= 1")
    return args


# ---------------------------------------------------------------- banks


def task_name(i: int) -> str:
    return f"task-{i:05d}"


class Prompts:
    """Random but valid prompts for one model: soft rows are real token embeddings, deep rows
    random at the scale of a deep prompt initialised from them; each saved with PEFT's config."""

    def __init__(self, loaded, n_virtual: int):
        model, cfg = loaded.model, loaded.model.config
        self.embeddings = model.get_input_embeddings().weight.detach().float().cpu()  # (V, d)
        self.meta = {
            "fingerprint": loaded.fingerprint,
            "template": TEMPLATE,
            "verbalizer": VERBALIZER,
        }
        self.n_virtual = n_virtual
        self.soft_config = peft_prompt_config(
            num_virtual_tokens=n_virtual,
            token_dim=self.embeddings.shape[1],
            num_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            base_model_name_or_path=model.config.name_or_path,
        )
        proto = DeepPromptModel(
            model, {"proto": self.soft_rows(0)}, tokenizer=loaded.tokenizer
        ).saved_prompt("proto")
        self.deep_config, self.deep_scale = proto.config, float(proto.embeddings.std())
        self.deep_width = proto.embeddings.shape[1]

    def soft_rows(self, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(self.embeddings.shape[0], (self.n_virtual,), generator=generator)
        return self.embeddings[ids].clone()  # (n, d)

    def saved(self, kind: str, name: str, seed: int) -> SavedPrompt:
        if kind == "soft":
            return SavedPrompt(name, self.soft_rows(seed), self.soft_config, self.meta)
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randn(self.n_virtual, self.deep_width, generator=generator) * self.deep_scale
        return SavedPrompt(name, rows, self.deep_config, self.meta)  # (n, layers * 2 * kv)


def ensure_bank(
    prompts: Prompts, root: Path, kind: str, size: int, seed: int
) -> tuple[Path, float]:
    """The bank of `size` generated tasks of `kind` (made now, or kept from an earlier run with
    the same settings); returns (its folder, seconds spent writing it, 0 when reused)."""
    spec = {"kind": kind, "size": size, "seed": seed, "num_virtual_tokens": prompts.n_virtual}
    folder = root / f"{kind}-{size}-v{prompts.n_virtual}-seed{seed}"
    marker = folder / ".bench-spec.json"  # hidden: the bank ignores it
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder, 0.0
    shutil.rmtree(folder, ignore_errors=True)
    bank, start = PromptBank(folder), time.perf_counter()
    for i in range(size):
        bank.save(prompts.saved(kind, task_name(i), seed * 1_000_003 + i))
    marker.write_text(json.dumps(spec))
    return folder, time.perf_counter() - start


# ---------------------------------------------------------------- the server


class Server:
    """`softprompt serve` on a free loopback port, its log in a file, stopped on exit."""

    def __init__(self, model: str, bank: Path, extra: list[str], log: Path):
        self.port, self.log = free_port(), log
        command = [sys.executable, "-m", "softprompt", "serve", "--model", model]
        command += ["--bank", str(bank), "--port", str(self.port), *extra]
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.perf_counter()
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.peak_rss = 0

    def wait_healthy(self, timeout_s: float = 600) -> float:
        """Seconds from the start of the process to /health answering 200."""
        deadline = self.started + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}); see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"server did not answer /health in {timeout_s} s; see {self.log}")

    def rss_mb(self) -> float:
        process = psutil.Process(self.process.pid)
        total = process.memory_info().rss + sum(
            child.memory_info().rss for child in process.children(recursive=True)
        )
        self.peak_rss = max(self.peak_rss, total)
        return round(total / 2**20, 1)

    def sample_rss(self):
        """Sample the RSS every 0.2 s in the background until the returned stop() is called."""
        stop = threading.Event()

        def loop():
            while not stop.wait(0.2):
                self.rss_mb()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return lambda: (stop.set(), thread.join())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---------------------------------------------------------------- load


def make_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(count)]


def zipf_weights(n: int, s: float = ZIPF_S) -> list[float]:
    """P(rank k) proportional to 1 / k^s, k = 1..n."""
    weights = [1.0 / k**s for k in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def draw_tasks(n_tasks: int, count: int, popularity: str, seed: int) -> list[str]:
    """`count` task names from a bank of `n_tasks`: uniform, or Zipf over a shuffled rank order
    (so the popular tasks are not the first names)."""
    rng = random.Random(seed)
    if popularity == "uniform":
        return [task_name(rng.randrange(n_tasks)) for _ in range(count)]
    ranked = list(range(n_tasks))
    rng.shuffle(ranked)
    return [task_name(i) for i in rng.choices(ranked, weights=zipf_weights(n_tasks), k=count)]


def bodies(op: str, tasks: list[str], texts: list[str], new_tokens: int) -> list[tuple[str, dict]]:
    if op == "classify":
        return [
            ("/v1/classify", {"model": t, "input": x}) for t, x in zip(tasks, texts, strict=True)
        ]
    return [
        (
            "/v1/completions",
            {
                "model": t,
                "prompt": TEMPLATE.format(text=x),
                "max_tokens": new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        for t, x in zip(tasks, texts, strict=True)
    ]


async def run_load(url: str, requests: list[tuple[str, dict]], concurrency: int) -> dict:
    """Send `requests` from `concurrency` clients; latency percentiles and throughput."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(path: str, body: dict) -> tuple[float, int]:
            async with gate:
                start = time.perf_counter()
                response = await client.post(path, json=body)
                seconds = time.perf_counter() - start
            if response.status_code != 200:
                raise RuntimeError(
                    f"{path} {body['model']}: {response.status_code} {response.text}"
                )
            usage = response.json().get("usage") or {}
            return seconds, usage.get("completion_tokens", 0)

        start = time.perf_counter()
        done = await asyncio.gather(*(one(path, body) for path, body in requests))
        wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in done)
    tokens = sum(n for _, n in done)
    result = {
        "n": len(requests),
        "distinct_tasks": len({body["model"] for _, body in requests}),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(requests) / wall, 3),
        "p50_s": round(percentile(latencies, 0.50), 4),
        "p95_s": round(percentile(latencies, 0.95), 4),
    }
    if tokens:
        result["completion_tokens_per_s"] = round(tokens / wall, 2)
    return result


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile of sorted values."""
    return sorted_values[min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))]


def time_models(url: str, repeats: int) -> dict:
    def once() -> tuple[float, dict]:
        start = time.perf_counter()
        response = httpx.get(f"{url}/v1/models", timeout=600)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()

    first, page = once()
    rest = [once()[0] for _ in range(repeats)]
    return {
        "models_first_s": round(first, 4),
        "models_p50_s": round(statistics.median(rest), 4),
        "models_page_entries": len(page["data"]),
        "models_has_more": page.get("has_more"),
    }


# ---------------------------------------------------------------- one bank


def measure(args, bank: Path, kind: str, size: int, log: Path) -> dict:
    starts = []
    for _ in range(args.startup_repeats - 1):  # extra starts for the median; the last one serves
        extra = Server(args.model, bank, shlex.split(args.server_args), log)
        try:
            starts.append(extra.wait_healthy())
        finally:
            extra.stop()
    server = Server(args.model, bank, shlex.split(args.server_args), log)
    try:
        starts.append(server.wait_healthy())
        row = {"kind": kind, "tasks": size, "startup_s": round(statistics.median(starts), 3)}
        row["startup_runs_s"] = [round(s, 3) for s in starts]
        row["rss_mb_start"] = server.rss_mb()
        row |= time_models(server.url, args.models_repeats)
        texts = make_texts(args.requests, args.seed + 1)
        warm = [task_name(0)] * 2  # the model's first forward passes, not a task's first load
        stop_sampling = server.sample_rss()
        row["loads"] = {}
        try:
            for op in ("classify", "generate"):
                asyncio.run(run_load(server.url, bodies(op, warm, texts[:2], args.new_tokens), 2))
            for popularity in ("zipf", "uniform") if size > 1 else ("one task",):
                for op in ("classify", "generate"):
                    seed = args.seed + 2 + (op == "generate")
                    tasks = draw_tasks(size, args.requests, popularity, seed)
                    load = bodies(op, tasks, texts, args.new_tokens)
                    result = asyncio.run(run_load(server.url, load, args.concurrency))
                    row["loads"].setdefault(popularity, {})[op] = result
        finally:
            stop_sampling()
        row["rss_mb_end"] = server.rss_mb()
        row["rss_mb_peak"] = round(server.peak_rss / 2**20, 1)
        row["health"] = httpx.get(f"{server.url}/health", timeout=30).json()
        return row
    finally:
        server.stop()


def add_ratios(rows: list[dict]) -> None:
    """Each bank's start-up and throughput as a fraction of its kind's 1-task bank."""
    base = {row["kind"]: row for row in rows if row["tasks"] == 1}
    for row in rows:
        one = base.get(row["kind"])
        if one is None or row is one:
            continue
        row["startup_vs_1_task"] = round(row["startup_s"] / one["startup_s"], 3)
        ref = one["loads"]["one task"]
        for loads in row["loads"].values():
            for op, result in loads.items():
                result["throughput_vs_1_task"] = round(
                    result["requests_per_s"] / ref[op]["requests_per_s"], 3
                )


def warm_start(args, prompts: Prompts, root: Path) -> float:
    """Start and stop one server, unmeasured, so that every measured start finds the model's files
    and the Python packages in the page cache (else the first bank measured pays for it)."""
    bank, _ = ensure_bank(prompts, root, "soft", 1, args.seed)
    server = Server(args.model, bank, shlex.split(args.server_args), root / "server-warm.log")
    try:
        return round(server.wait_healthy(), 3)
    finally:
        server.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    loaded = load_model(args.model)
    precision = str(next(loaded.model.parameters()).dtype).replace("torch.", "")
    prompts = Prompts(loaded, args.num_virtual_tokens)
    del loaded
    gc.collect()
    root = Path(args.bank_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    warm_start_s = warm_start(args, prompts, root)
    for kind in args.kinds:
        for size in sorted({1, *args.sizes}):
            if kind == "deep" and size > args.max_deep_tasks:
                skipped.append(f"deep x {size}: above --max-deep-tasks {args.max_deep_tasks}")
                continue
            bank, write_s = ensure_bank(prompts, root, kind, size, args.seed)
            print(f"[{kind} x {size}] bank {bank} ({write_s:.1f} s to write)", file=sys.stderr)
            row = measure(args, bank, kind, size, root / f"server-{kind}-{size}.log")
            row["bank_write_s"] = round(write_s, 1)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    add_ratios(rows)
    result = {
        "benchmark": "serve_scale",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model,
        "precision": precision,
        "n": {
            "requests_per_load": args.requests,
            "models_repeats": args.models_repeats,
            "startup_repeats": args.startup_repeats,
        },
        "seeds": {
            "banks": args.seed,
            "texts": args.seed + 1,
            "classify_tasks": args.seed + 2,
            "generate_tasks": args.seed + 3,
        },
        "settings": {
            "concurrency": args.concurrency,
            "new_tokens": args.new_tokens,
            "num_virtual_tokens": args.num_virtual_tokens,
            "zipf_s": ZIPF_S,
            "server_args": args.server_args,
        },
        "warm_start_s": warm_start_s,
        "runs": rows,
        "skipped": skipped,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.clean:
        for kind in args.kinds:
            for folder in root.glob(f"{kind}-*"):
                shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
