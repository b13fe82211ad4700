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
    from softprompt.training.compare import machine as describe_machine

    return {
        **describe_machine(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "avx512_bf16": avx512_bf16(),
    }


def avx512_bf16() -> bool:
    """Whether the CPU has AVX512-BF16 (bf16 autocast on: training steps ~2.5x faster)."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def sample_jsonl(path: Path, n: int, seed: int) -> list[dict]:
    """A fixed random subset of a JSONL file (n <= 0: all rows)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if 0 < n < len(rows):
        rows = random.Random(seed).sample(rows, n)
    return rows


SELECTION_ROWS = 300
"""Validation rows set aside for choosing settings (and checkpoints); never reported on."""


def split_validation(task: str = "sst2") -> tuple[list[dict], list[dict]]:
    """(selection, report) rows of `task`'s validation file: a fixed shuffle, the first 300 rows
    for choosing settings and checkpoints, the rest for reported accuracy. Every benchmark uses
    this one split, so no reported number comes from rows that chose a setting."""
    rows = sample_jsonl(SHARED / f"data/{task}/validation.jsonl", 0, seed=0)
    random.Random(2026).shuffle(rows)
    return rows[:SELECTION_ROWS], rows[SELECTION_ROWS:]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def train_peft_prompt(
    loaded,
    examples,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    num_virtual_tokens: int,
    init_text: str,
    warmup_steps: int = 10,
    seed: int = 0,
    eval_every: int = 0,
    on_eval=None,
):
    """PEFT prompt tuning the way its docs train it (shuffled batches, right padding, full logits,
    fp32): the reference every softprompt number is compared with. Returns (the trained prompt
    [n, d], training seconds, last loss); `on_eval(step, prompt)` is called every `eval_every`
    steps, outside the timed region."""
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import get_scheduler

    from softprompt.data import collate

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        loaded.model,
        PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=init_text,
            tokenizer_name_or_path=loaded.source,
        ),
    )
    device = loaded.model.get_input_embeddings().weight.device
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps
    )
    order, rng, batches = list(range(len(examples))), random.Random(seed), []
    while len(batches) < steps:
        rng.shuffle(order)
        batches += [
            order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)
        ]
    prompt = lambda: peft_model.get_prompt_embedding_to_save("default").detach().float().cpu()  # noqa: E731
    pad, seconds = loaded.tokenizer.pad_token_id, 0.0
    peft_model.train()
    for step, rows in enumerate(batches[:steps], start=1):
        start = time.perf_counter()
        batch = {
            k: v.to(device)
            for k, v in collate([examples[i] for i in rows], pad, padding_side="right").items()
        }
        out = peft_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        if on_eval and eval_every and (step % eval_every == 0 or step == steps):
            peft_model.eval()
            on_eval(step, prompt())
            peft_model.train()
    peft_model.eval()
    return prompt(), seconds, float(out.loss)
