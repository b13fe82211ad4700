"""Helpers shared by the benchmark scripts: machine description, data subsets, JSON output."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared"))
RESULTS = REPO / "bench" / "results"


def machine() -> dict:
    """What ran the benchmark: numbers are only comparable on the same machine, in one run."""
    from softprompt.compare import machine as describe_machine

    return {**describe_machine(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


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
