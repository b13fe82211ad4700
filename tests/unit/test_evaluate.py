"""Rank classification: a prompt ensemble scores the mean of its members' label log-likelihoods."""

from __future__ import annotations

import pytest
import torch

from softprompt.data import load_examples, make_classification_task
from softprompt.prompting.prompted import PromptedModel
from softprompt.training.evaluation import evaluate_classification, label_log_likelihoods

from ..conftest import write_sentiment_jsonl


def test_ensemble_of_two_prompts_equals_the_mean_of_their_separate_scores(
    tiny_model, tiny_tokenizer, tmp_path
):
    task = make_classification_task(
        "sentiment", "review : {text} sentiment :", ["negative", "positive"]
    )
    examples, _ = load_examples(
        write_sentiment_jsonl(tmp_path / "d.jsonl", repeats=1), task, tiny_tokenizer
    )
    d = tiny_model.get_input_embeddings().weight.shape[1]
    prompted = PromptedModel(
        tiny_model,
        {
            "a": torch.randn(3, d, generator=torch.Generator().manual_seed(1)),
            "b": torch.randn(5, d, generator=torch.Generator().manual_seed(2)),
        },
        tokenizer=tiny_tokenizer,
    )
    targets = task.verbalizer.target_token_ids(tiny_tokenizer)
    alone = [label_log_likelihoods(prompted, examples, targets, t, batch_size=7) for t in (0, 1)]
    together = label_log_likelihoods(
        prompted, examples, targets, [0, 1], batch_size=7
    )  # mixed batches
    torch.testing.assert_close(together, (alone[0] + alone[1]) / 2, atol=1e-5, rtol=0)
    assert not torch.allclose(alone[0], alone[1])  # the members really differ
    metrics = evaluate_classification(prompted, task, examples, ["a", "b"])
    predicted = together.argmax(1)
    gold = torch.tensor([ex.label for ex in examples])
    assert metrics["accuracy"] == pytest.approx(float((predicted == gold).float().mean()))


def _scores_one_forward_per_label(model, examples, targets, task_id):
    """The general path by hand: every (example, label) pair through the model's loss."""
    from softprompt.data import Example, collate

    rows = []
    for ex in examples:
        pairs = [Example(ex.input_ids, target, task_id, None) for target in targets]
        batch = collate(pairs, 0, padding_side="left")
        nll = model.loss(
            batch["input_ids"],
            batch["attention_mask"],
            batch["task_ids"],
            batch["labels"],
            reduction="none",
        )
        rows.append(-nll.float())
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["soft", "deep"])
def test_one_token_labels_read_from_one_forward_equal_one_forward_per_label(
    kind, tiny_llama, tiny_tokenizer, tmp_path
):
    from softprompt.prompting.deep import DeepPromptModel

    task = make_classification_task(
        "sentiment", "review : {text} sentiment :", ["negative", "positive"], [" bad", " good"]
    )
    examples, _ = load_examples(
        write_sentiment_jsonl(tmp_path / "d.jsonl", repeats=1), task, tiny_tokenizer
    )
    d = tiny_llama.get_input_embeddings().weight.shape[1]
    prompt = torch.randn(3, d, generator=torch.Generator().manual_seed(3))
    model = (PromptedModel if kind == "soft" else DeepPromptModel)(
        tiny_llama, {"a": prompt}, tokenizer=tiny_tokenizer
    )
    targets = task.verbalizer.target_token_ids(tiny_tokenizer)
    assert all(len(t) == 1 for t in targets)  # the one-forward path
    fast = label_log_likelihoods(model, examples, targets, 0, batch_size=5)
    torch.testing.assert_close(
        fast, _scores_one_forward_per_label(model, examples, targets, 0), atol=1e-5, rtol=0
    )
