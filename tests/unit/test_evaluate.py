"""Rank classification: a prompt ensemble scores the mean of its members' label log-likelihoods."""

from __future__ import annotations

import pytest
import torch

from softprompt.data import load_examples, make_classification_task
from softprompt.evaluate import evaluate_classification, label_log_likelihoods
from softprompt.prompted import PromptedModel

from ..conftest import write_sentiment_jsonl


def test_ensemble_of_two_prompts_equals_the_mean_of_their_separate_scores(tiny_model, tiny_tokenizer, tmp_path):
    task = make_classification_task("sentiment", "review : {text} sentiment :", ["negative", "positive"])
    examples, _ = load_examples(write_sentiment_jsonl(tmp_path / "d.jsonl", repeats=1), task, tiny_tokenizer)
    d = tiny_model.get_input_embeddings().weight.shape[1]
    prompted = PromptedModel(tiny_model, {"a": torch.randn(3, d, generator=torch.Generator().manual_seed(1)),
                                          "b": torch.randn(5, d, generator=torch.Generator().manual_seed(2))},
                             tokenizer=tiny_tokenizer)
    targets = task.verbalizer.target_token_ids(tiny_tokenizer)
    alone = [label_log_likelihoods(prompted, examples, targets, t, batch_size=7) for t in (0, 1)]
    together = label_log_likelihoods(prompted, examples, targets, [0, 1], batch_size=7)  # mixed batches
    torch.testing.assert_close(together, (alone[0] + alone[1]) / 2, atol=1e-5, rtol=0)
    assert not torch.allclose(alone[0], alone[1])  # the members really differ
    metrics = evaluate_classification(prompted, task, examples, ["a", "b"])
    predicted = together.argmax(1)
    gold = torch.tensor([ex.label for ex in examples])
    assert metrics["accuracy"] == pytest.approx(float((predicted == gold).float().mean()))
