"""Helpers shared by the benchmark scripts: machine description, peak-RSS sampling, JSON output."""

from __future__ import annotations

import json
import os
import platform
import random
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared"))
RESULTS = REPO / "bench" / "results"


def machine() -> dict:
    """What ran the benchmark: numbers are only comparable on the same machine, in one run."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


class PeakRSS:
    """Samples this process's resident memory every 20 ms; `peak` is the highest seen."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._process = psutil.Process()

    def __enter__(self):
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def sample_jsonl(path: Path, n: int, seed: int) -> list[dict]:
    """A fixed random subset of a JSONL file (n <= 0: all rows)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if 0 < n < len(rows):
        rows = random.Random(seed).sample(rows, n)
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
