"""Batching: Examples -> one causal-LM sequence per row whose labels are -100 on the input (the
loss only sees the answer), in length-grouped batches."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import torch

from softprompt.data.tasks import Example
from softprompt.errors import ConfigError

logger = logging.getLogger(__name__)


IGNORE_INDEX = -100
"""Label value the loss ignores (input tokens and padding)."""


def sample_rows(rows: Sequence, limit: int, seed: int = 0) -> list:
    """At most `limit` rows drawn at random with `seed` (0 = all rows, in order).

    Never simply the first rows: files are often sorted, and the head of one can be a single class
    (the built-in movie reviews are sorted by rating: 289 of the first 300 validation rows are
    positive)."""
    if not limit or len(rows) <= limit:
        return list(rows)
    return random.Random(seed).sample(list(rows), limit)


def collate(
    examples: Sequence[Example], pad_token_id: int, *, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a batch: `input_ids`, `attention_mask`, `labels` [B, L] (labels -100 on the input and
    padding) and `task_ids` [B], all LongTensors. Input and target are joined per row."""
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    if pad_token_id is None:
        raise ConfigError("pad_token_id is None: set tokenizer.pad_token (e.g. to eos)")
    if not examples:
        raise ValueError("collate() needs at least one example")
    B, L = len(examples), max(ex.length for ex in examples)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    for row, ex in enumerate(examples):
        n = ex.length
        cols = slice(0, n) if padding_side == "right" else slice(L - n, L)
        input_ids[row, cols] = torch.tensor(ex.input_ids + ex.target_ids, dtype=torch.long)
        attention_mask[row, cols] = 1
        labels[row, cols] = torch.tensor(
            [IGNORE_INDEX] * len(ex.input_ids) + ex.target_ids, dtype=torch.long
        )
    task_ids = torch.tensor([ex.task_id for ex in examples], dtype=torch.long)  # (B,)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "task_ids": task_ids,
    }


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    mega_batch_mult: int = 50,
    drop_last: bool = False,
) -> list[list[int]]:
    """Batches of indices with similar lengths, as transformers' LengthGroupedSampler does.

    Shuffle the indices, cut them into mega-batches of `batch_size * mega_batch_mult`, sort each
    by length (longest first), cut into batches and shuffle the batch order; the batch holding
    the longest sequence goes first so an out-of-memory shows at step one. Same seed, same
    batches. Without `shuffle` the order is the file order (still grouped within mega-batches).
    """
    if batch_size < 1 or mega_batch_mult < 1:
        raise ConfigError(
            f"batch_size and mega_batch_mult must be >= 1, got {batch_size} and {mega_batch_mult}"
        )
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    mega = batch_size * mega_batch_mult
    batches = [
        group[i : i + batch_size]
        for start in range(0, len(order), mega)
        for group in [sorted(order[start : start + mega], key=lambda j: -lengths[j])]
        for i in range(0, len(group), batch_size)
    ]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        rng.shuffle(batches)
        _longest_first(batches, lengths)
    return batches


def _longest_first(batches: list[list[int]], lengths: Sequence[int]) -> None:
    if batches:
        top = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[top] = batches[top], batches[0]
