"""The one scorer (prompting/scorer.py): `softprompt eval` (evaluation.label_log_likelihoods) and the engine's
/v1/classify give the same scores on the same rows, for a soft prompt, a deep prompt and no prompt,
with one-token and multi-token labels; the one-token fast path shares forwards and changes no score."""

from __future__ import annotations

import pytest
import torch

from softprompt.bank import PromptBank
from softprompt.data import encode_example, make_classification_task
from softprompt.prompting.deep import DeepPromptModel
from softprompt.prompting.prompted import PromptedModel
from softprompt.prompting.scorer import ScoreRow, score_rows
from softprompt.prompting.soft import NO_TASK
from softprompt.serving.engine import ClassifyRequest, Engine
from softprompt.training.evaluation import label_log_likelihoods

from ..conftest import build_tiny_tokenizer

TEMPLATE = "review : {text} sentiment :"
TEXTS = [
    "the movie was great",
    "a boring plot",
    "fun",
    "the actor is not very good and the film is bad",
    "i love this film",
    "awful",
    "it was a movie",
]
VERBALIZERS = {
    "multi-token": (["positive", "negative", "neutral"], [" good", " very bad film", " not bad"]),
    "one-token": (["positive", "negative"], [" good", " bad"]),
}
BATCH = 3  # model rows per forward, the same for both callers: several batches, mixed widths


def _saved_bank(model, tokenizer, path, labels, targets) -> PromptBank:
    """A bank holding a soft prompt `soft` and a deep prompt `deep` with the task's template and
    verbalizer (what /v1/classify reads)."""
    meta = {"template": TEMPLATE, "verbalizer": {"labels": labels, "targets": targets}}
    generator = torch.Generator().manual_seed(7)
    soft = PromptedModel(
        model, {"soft": torch.randn(3, 32, generator=generator)}, tokenizer=tokenizer
    )
    soft.save_task("soft", path, meta=meta)
    deep = DeepPromptModel(
        model, {"deep": torch.randn(2, 32, generator=generator)}, tokenizer=tokenizer
    )
    with torch.no_grad():  # away from its soft init, so the deep path is really exercised
        deep.table.get("deep").add_(
            0.3 * torch.randn(deep.table.get("deep").shape, generator=generator)
        )
    deep.save_task("deep", path, meta=meta)
    return PromptBank(path)


def _eval_scores(model, tokenizer, bank, prompt: str | None, labels, targets) -> torch.Tensor:
    """What `softprompt eval` scores: the task's model loaded from the bank, rows through
    evaluate.label_log_likelihoods."""
    task = make_classification_task("t", TEMPLATE, labels, targets)
    examples = [
        encode_example(tokenizer, task, {"text": t}, 0, require_target=False) for t in TEXTS
    ]
    if prompt is None:
        prompted, task_id = PromptedModel(model, tokenizer=tokenizer), NO_TASK
    elif prompt == "deep":
        prompted, task_id = DeepPromptModel(model, tokenizer=tokenizer), 0
        prompted.add_saved(bank.load("deep"))
    else:
        prompted, task_id = (
            PromptedModel(model, {"soft": bank.load("soft")}, tokenizer=tokenizer),
            0,
        )
    targets_ids = task.verbalizer.target_token_ids(tokenizer)
    return label_log_likelihoods(prompted, examples, targets_ids, task_id, batch_size=BATCH)


def _served_scores(engine: Engine, prompt: str | None, labels) -> torch.Tensor:
    """What /v1/classify scores (no prompt = the task's template and verbalizer, zero-shot)."""
    request = ClassifyRequest(prompt or "soft", TEXTS, zero_shot=prompt is None)
    results = engine.run([engine.prepare(request)])[0]
    return torch.tensor([[r.log_likelihoods[label] for label in labels] for r in results])


@pytest.mark.parametrize("verbalizer", list(VERBALIZERS))
@pytest.mark.parametrize("prompt", ["soft", "deep", None])
def test_eval_and_classify_give_bit_identical_scores(tiny_llama, tmp_path, prompt, verbalizer):
    labels, targets = VERBALIZERS[verbalizer]
    tokenizer = build_tiny_tokenizer()
    bank = _saved_bank(tiny_llama, tokenizer, tmp_path / "bank", labels, targets)
    # The prefix cache off: the engine feeds a soft prompt as PromptedModel does (embeddings); a
    # deep prompt enters as its KV either way, as in DeepPromptModel.
    engine = Engine((tiny_llama, tokenizer), bank, use_prefix_cache=False, score_batch_size=BATCH)
    expected = _eval_scores(tiny_llama, tokenizer, bank, prompt, labels, targets)
    served = _served_scores(engine, prompt, labels)
    assert torch.equal(served, expected.float()), (served - expected).abs().max()
    assert served.isfinite().all() and len({tuple(row) for row in served.tolist()}) == len(TEXTS)


@pytest.mark.parametrize("prompt", ["soft", "deep"])
def test_classify_with_the_prefix_cache_equals_eval_to_1e_6(tiny_llama, tmp_path, prompt):
    labels, targets = VERBALIZERS["multi-token"]
    tokenizer = build_tiny_tokenizer()
    bank = _saved_bank(tiny_llama, tokenizer, tmp_path / "bank", labels, targets)
    engine = Engine((tiny_llama, tokenizer), bank, use_prefix_cache=True, score_batch_size=BATCH)
    expected = _eval_scores(tiny_llama, tokenizer, bank, prompt, labels, targets)
    # To 1e-6 relative (with a 1e-6 floor): the scores are float32 sums of log-probabilities of
    # about 14, whose last bit is 1e-6, so a different but exact summation order may differ by an
    # ulp or two; an absolute 1e-6 would ask for less than one ulp.
    torch.testing.assert_close(
        _served_scores(engine, prompt, labels), expected, atol=1e-6, rtol=1e-6
    )
    # A soft prompt's keys and values are computed once (the KV-prefix path); a deep prompt's are
    # its stored rows, so nothing is computed for it.
    assert engine.prefix_computations == (1 if prompt == "soft" else 0)


def _plain_last_logits(model, calls: list[int]):
    def last_logits(tasks, ids, mask, keep):
        calls.append(len(ids))
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits

    return last_logits


def test_one_token_targets_share_a_forward_and_score_as_alone(tiny_llama):
    """Rows with one input and one-token targets run as one model row; each score equals that row
    scored alone (no fast path, no batch neighbours), multi-token rows included."""
    inputs = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13, 14]]
    targets = [[20], [21], [22, 23, 24], [25, 26]]
    rows = [ScoreRow(i, t, None) for i in inputs for t in targets]
    calls: list[int] = []
    together = score_rows(
        rows, _plain_last_logits(tiny_llama, calls), pad_id=0, device="cpu", batch_size=4
    )
    assert (
        sum(calls) == len(inputs) * 3
    )  # one row for the two one-token targets, one per multi-token target
    for row, score in zip(rows, together.tolist(), strict=True):
        with torch.no_grad():
            logprobs = (
                tiny_llama(input_ids=torch.tensor([row.input_ids + row.target_ids]))
                .logits[0]
                .log_softmax(-1)
            )
        n = len(row.input_ids)
        alone = sum(float(logprobs[n - 1 + j, token]) for j, token in enumerate(row.target_ids))
        assert score == pytest.approx(alone, abs=1e-5)


def test_rows_with_different_tasks_never_share_a_forward(tiny_llama):
    seen: list = []

    def last_logits(tasks, ids, mask, keep):
        seen.extend(tasks)
        return tiny_llama(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits

    rows = [ScoreRow([1, 5, 6], [20], task) for task in ("a", "b", "a")]
    score_rows(rows, last_logits, pad_id=0, device="cpu", batch_size=8)
    assert sorted(seen) == ["a", "b"]


def test_a_row_without_target_tokens_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="score row 1 needs input and target tokens"):
        score_rows(
            [ScoreRow([1, 5], [20]), ScoreRow([1, 5], [])],
            _plain_last_logits(tiny_llama, []),
            pad_id=0,
            device="cpu",
            batch_size=4,
        )
