"""Scoring: the summed log-probability of each row's target tokens after its input.

This is the arithmetic behind rank classification everywhere: `softprompt eval`, the trainer's
validation and compare (through `evaluate.label_log_likelihoods`) and the engine's
`/v1/classify` and scoring (`Engine.score_pairs`). Each caller brings only its model-specific
forward, a `LastLogits` function; batching, left padding, the one-token fast path and the
log-probability sums are done here once, so the same rows give the same scores from either.

One-token fast path: rows with the same task (prompt) and input whose targets are one token each
(the K labels of one example, usually) share one forward and read every target from its next-token
distribution, instead of one forward per target. A one-token target's log-likelihood is that
token's log-probability there, so the numbers are the same.

Token detail (`token_scores`): the same forwards, read per target token, optionally with the k most
likely tokens at each position: the log-probabilities that `/v1/completions` returns for `echo`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from softprompt.data import Example, collate, length_grouped_batches

LastLogits = Callable[[list, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(tasks of the B rows, left-padded ids (B, L), attention mask (B, L), keep) -> the logits of
the last `keep` columns (B, keep, V). Each row's task is whatever its `ScoreRow.task` holds."""


@dataclass(eq=False)
class ScoreRow:
    """One target to score after one input, with the prompt the input is read under."""

    input_ids: list[int]
    """The input tokens (at least one: the first target is predicted from the last of them)."""
    target_ids: list[int]
    """The target tokens whose log-probabilities are summed (at least one)."""
    task: Hashable = None
    """The row's prompt reference, as the caller's `LastLogits` understands it (a task id, an
    engine task, None for no prompt); equal tasks and inputs let one-token targets share a forward."""
    top_k: int | None = None
    """None: the row's summed score is wanted; a number: its tokens one by one, with the `top_k`
    most likely tokens at each target position (`token_scores`; the engine's echo)."""


@dataclass
class TokenScores:
    """One row's target tokens read one by one (`token_scores`)."""

    logprobs: list[float]
    """Log-probability of each target token after the tokens before it."""
    top: list[list[tuple[int, float]]]
    """Per target token, the row's `top_k` most likely (token id, log-probability), best first."""
    total: float
    """Their sum, computed exactly as `score_rows` computes it."""


@dataclass(eq=False)
class _Forward:
    """One row of a model batch and the scores read from it: `reads` holds (row index, target
    ids, fed) where `fed` target tokens are part of `ids` (a multi-token target is fed whole and
    read from the columns before the last; one-token targets are read from the last column)."""

    task: Hashable
    ids: list[int]
    reads: list[tuple[int, list[int], int]] = field(default_factory=list)


def left_pad(rows: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one width: ids and attention mask (B, L) on `device`."""
    batch = collate([Example(list(row), [], 0, None) for row in rows], pad_id, padding_side="left")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.no_grad()
def score_rows(
    rows: Sequence[ScoreRow],
    last_logits: LastLogits,
    *,
    pad_id: int,
    device,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Summed target log-probability of each row (N,) float32 on the CPU.

    Forwards run `batch_size` model rows at a time, grouped by length (less padding); `progress`
    is called with the number of rows scored after each forward.
    """
    scores = torch.zeros(len(rows))
    if not rows:
        return scores
    for row_index, picked, _ in _batches(rows, last_logits, pad_id, device, batch_size, progress):
        scores[row_index] = picked.sum(1).cpu()
    return scores


@torch.no_grad()
def token_scores(
    rows: Sequence[ScoreRow],
    last_logits: LastLogits,
    *,
    pad_id: int,
    device,
    batch_size: int,
) -> list[TokenScores]:
    """Each row's target tokens one by one, with its `top_k` alternatives: the same forwards and
    log-softmax as `score_rows` (whose sums are the `total`s)."""
    out: list[TokenScores | None] = [None] * len(rows)
    if not rows:
        return []
    for row_index, picked, top in _batches(rows, last_logits, pad_id, device, batch_size, None):
        totals = picked.sum(1).cpu()
        for r, i in enumerate(row_index.tolist()):
            n, k = len(rows[i].target_ids), rows[i].top_k or 0
            values, ids = top
            best = [
                list(zip(ids[r, j, :k].tolist(), values[r, j, :k].tolist(), strict=True))
                for j in range(n)
            ]
            out[i] = TokenScores(picked[r, :n].tolist(), best, float(totals[r]))
    return out


def _batches(rows, last_logits, pad_id, device, batch_size, progress):
    """(row indices (R,), per-token target log-probabilities (R, n) with 0 past a row's end,
    top-k (values, ids) each (R, n, k) on the CPU) of each model batch."""
    forwards = _plan(rows)
    order = length_grouped_batches(
        [len(f.ids) for f in forwards], batch_size, seed=0, shuffle=False
    )
    for batch_index in order:
        batch = [forwards[i] for i in batch_index]
        row_index, picked, top = _score_batch(batch, rows, last_logits, pad_id, device)
        if progress:
            progress(len(row_index))
        yield row_index, picked, top


def _plan(rows: Sequence[ScoreRow]) -> list[_Forward]:
    """The model rows to run: one per multi-token target, one per (task, input) for the
    one-token targets after it (in the order rows first need them)."""
    forwards: list[_Forward] = []
    shared: dict[tuple, _Forward] = {}
    for i, row in enumerate(rows):
        if not row.input_ids or not row.target_ids:
            raise ValueError(f"score row {i} needs input and target tokens")
        if len(row.target_ids) > 1:
            forwards.append(
                _Forward(
                    row.task,
                    row.input_ids + row.target_ids,
                    [(i, row.target_ids, len(row.target_ids))],
                )
            )
            continue
        key = (row.task, tuple(row.input_ids))
        if key not in shared:
            shared[key] = _Forward(row.task, list(row.input_ids))
            forwards.append(shared[key])
        shared[key].reads.append((i, row.target_ids, 0))
    return forwards


def _score_batch(
    batch: list[_Forward], rows: Sequence[ScoreRow], last_logits: LastLogits, pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(row indices (R,), target log-probabilities (R, n) (0 past a row's end), top-k (values,
    ids) each (R, n, k) on the CPU, k = the batch's largest `top_k`) of one model batch."""
    ids, mask = left_pad([f.ids for f in batch], pad_id, device)  # (B, L)
    keep = max(fed for f in batch for _, _, fed in f.reads) + 1  # columns whose logits are read
    logprobs = (
        last_logits([f.task for f in batch], ids, mask, keep).float().log_softmax(-1)
    )  # (B, keep, V)
    reads = [(b, read) for b, f in enumerate(batch) for read in f.reads]
    width = max(len(targets) for _, (_, targets, _) in reads)
    batch_rows = torch.zeros(
        len(reads), width, dtype=torch.long
    )  # (R, n) the batch row of each token
    columns, tokens = torch.zeros_like(batch_rows), torch.zeros_like(batch_rows)
    real = torch.zeros(len(reads), width, dtype=torch.bool)
    for r, (b, (_, targets, fed)) in enumerate(reads):
        n, start = (
            len(targets),
            keep - 1 - fed,
        )  # rows end at the last column; start predicts targets[0]
        batch_rows[r], real[r, :n] = b, True
        columns[r, :n] = torch.arange(start, start + n)
        tokens[r, :n] = torch.tensor(targets)
    batch_rows, columns = batch_rows.to(device), columns.to(device)
    picked = logprobs[batch_rows, columns, tokens.to(device)]  # (R, n)
    picked = picked.masked_fill(~real.to(device), 0.0)
    k = min(max(rows[row].top_k or 0 for _, (row, _, _) in reads), logprobs.shape[-1])
    if k:
        values, top_ids = logprobs[batch_rows, columns].topk(k, dim=-1)  # (R, n, k)
        top = (values.cpu(), top_ids.cpu())
    else:
        top = (
            torch.zeros(len(reads), width, 0),
            torch.zeros(len(reads), width, 0, dtype=torch.long),
        )
    return torch.tensor([row for _, (row, _, _) in reads]), picked, top


__all__ = ["LastLogits", "ScoreRow", "TokenScores", "left_pad", "score_rows", "token_scores"]
