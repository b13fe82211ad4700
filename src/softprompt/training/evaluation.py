"""Evaluation: rank classification over a verbalizer, generation metrics, and loss.

Rank classification scores every label's target tokens after the input (sum of log-probs) and
picks the most likely one, so a prompt is judged on exactly what it was trained to do, with no
free-text parsing.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from softprompt.data import Example, Task, collate
from softprompt.prompting.scorer import ScoreRow, score_rows
from softprompt.prompting.soft import NO_TASK

log = logging.getLogger(__name__)


def label_log_likelihoods(
    prompted,
    examples: list[Example],
    target_ids: list[list[int]],
    task_id: int | Sequence[int],
    *,
    batch_size: int = 32,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Log-likelihood [E, K] of each of K label targets after each example's input (prompting/scorer.py:
    the same arithmetic as the engine's /v1/classify; one-token labels share one forward).

    Several task ids make a prompt ensemble (Lester et al. 2021, sec. 6): every (example, label,
    prompt) row goes through the same mixed-task batches and the scores are averaged over prompts.
    """
    task_ids = [task_id] if isinstance(task_id, int) else list(task_id)
    rows = [
        ScoreRow(ex.input_ids, target, t)
        for t in task_ids
        for ex in examples
        for target in target_ids
    ]
    device = prompted.model.get_input_embeddings().weight.device

    def last_logits(
        tasks: list[int], ids: torch.Tensor, mask: torch.Tensor, keep: int
    ) -> torch.Tensor:
        return prompted.last_logits(ids, mask, torch.tensor(tasks, device=device), keep)

    scores = score_rows(
        rows,
        last_logits,
        pad_id=prompted.tokenizer.pad_token_id or 0,
        device=device,
        batch_size=batch_size,
        progress=progress,
    )
    return scores.view(len(task_ids), len(examples), len(target_ids)).mean(0)  # (E, K)


def classification_metrics(predictions: list[int], gold: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows = gold, columns = predicted)."""
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for p, g in zip(predictions, gold, strict=True):
        confusion[g][p] += 1
    f1s = []
    for c in range(k):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(k))
        actual = sum(confusion[c])
        f1s.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    n = len(gold)
    return {
        "accuracy": sum(confusion[c][c] for c in range(k)) / n if n else 0.0,
        "macro_f1": sum(f1s) / k if k else 0.0,
        "n": n,
        "labels": list(labels),
        "confusion_matrix": confusion,
    }


def evaluate_classification(
    prompted,
    task: Task,
    examples: list[Example],
    task_name: str | None | Sequence[str],
    *,
    batch_size: int = 32,
    progress: Callable | None = None,
) -> dict:
    """Rank-classification metrics of `task_name`'s prompt (None = no prompt; a list of names =
    their ensemble, label scores averaged) on `examples`."""
    names = [task_name] if task_name is None or isinstance(task_name, str) else list(task_name)
    task_ids = [prompted.table.index(name) for name in names]
    targets = task.verbalizer.target_token_ids(prompted.tokenizer)
    scores = label_log_likelihoods(
        prompted, examples, targets, task_ids, batch_size=batch_size, progress=progress
    )
    predictions = scores.argmax(1).tolist()
    return classification_metrics(
        predictions, [ex.label for ex in examples], task.verbalizer.labels
    )


# ---------------------------------------------------------------- free-form generation


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, articles and extra spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    n = len(references)
    exact = sum(
        normalize_answer(p) == normalize_answer(r)
        for p, r in zip(predictions, references, strict=True)
    )
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True))
    return {"exact_match": exact / n if n else 0.0, "token_f1": f1 / n if n else 0.0, "n": n}


@torch.no_grad()
def evaluate_generation(
    prompted,
    examples: list[Example],
    task_name: str | None,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> dict:
    """Greedy generation on each input; exact match and token F1 against the target text."""
    tok = prompted.tokenizer
    device = prompted.model.get_input_embeddings().weight.device
    predictions: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(
            [Example(ex.input_ids, [], 0, None) for ex in chunk],
            tok.pad_token_id or 0,
            padding_side="left",
        )
        ids = prompted.generate_ids(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            task_name,
            max_new_tokens=max_new_tokens,
        )
        predictions += tok.batch_decode(ids, skip_special_tokens=True)
    references = [tok.decode(ex.target_ids, skip_special_tokens=True) for ex in examples]
    return {
        **generation_metrics(predictions, references),
        "examples": [
            {"prediction": p, "reference": r}
            for p, r in list(zip(predictions, references, strict=True))[:5]
        ],
    }


@torch.no_grad()
def evaluate_loss(
    prompted, examples: list[Example], task_name: str | None, *, batch_size: int = 16
) -> float:
    """Mean per-token loss on the target tokens."""
    task_id = NO_TASK if task_name is None else prompted.table.index(task_name)
    device = prompted.model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = [
            Example(ex.input_ids, ex.target_ids, task_id, ex.label)
            for ex in examples[start : start + batch_size]
        ]
        batch = collate(chunk, prompted.tokenizer.pad_token_id or 0, padding_side="left")
        n_tokens = int((batch["labels"] != -100).sum())
        loss = prompted.loss(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["task_ids"].to(device),
            batch["labels"].to(device),
        )
        total += float(loss) * n_tokens
        count += n_tokens
    return total / max(count, 1)


def evaluate_task(
    prompted, task: Task, examples: list[Example], task_name: str | None, **kwargs
) -> dict:
    """Metrics for a task: rank classification when it has a verbalizer, generation otherwise."""
    if task.is_classification:
        return evaluate_classification(prompted, task, examples, task_name, **kwargs)
    kwargs.pop("progress", None)
    metrics = evaluate_generation(prompted, examples, task_name, **kwargs)
    metrics["loss"] = evaluate_loss(prompted, examples, task_name)
    return metrics
