"""Log-probabilities (OpenAI's `logprobs`, `echo`, chat `top_logprobs`): the engine's values equal
the built-in scorer's for the same prompt and task (soft, deep and no prompt in one batch), and the
HTTP routes return them in OpenAI's shapes, streaming included, with strict validation."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.engine import Engine, GenerationRequest
from softprompt.engine_requests import MAX_TOP_LOGPROBS, PromptLogprobsRequest
from softprompt.errors import ConfigError
from softprompt.scorer import ScoreRow

from ..conftest import build_tiny_tokenizer
from .test_deep_prompt import TEXTS, _served_bank

ATOL = 1e-5
TASKS = ["deep-task", "soft-task", None]


@pytest.fixture
def engine(tiny_llama, tmp_path):
    _, bank = _served_bank(tiny_llama, build_tiny_tokenizer(), tmp_path / "bank")
    return Engine((tiny_llama, build_tiny_tokenizer()), bank)


def reference(engine, task, ids, token):
    """The scorer's log-probability of `token` after `ids` under `task` (a row of its own)."""
    entry = engine.prepare(GenerationRequest("fun", task=task)).task  # the engine's loaded task
    return engine.score_pairs([ScoreRow(list(ids), [token], entry)])[0]


def test_echo_and_generated_logprobs_equal_the_scorer_soft_deep_and_none_in_one_batch(engine):
    echoes = [PromptLogprobsRequest(t, task, 3) for t, task in zip(TEXTS, TASKS, strict=True)]
    gens = [
        GenerationRequest(t, task=task, max_new_tokens=4, logprobs=3)
        for t, task in zip(TEXTS, TASKS, strict=True)
    ]
    results = engine.run(engine.prepare_all(echoes + gens))  # one batch of each kind, mixed tasks
    for task, echo, gen in zip(TASKS, results[:3], results[3:], strict=True):
        ids = echo.token_ids
        assert echo.logprobs[0] is None and len(echo.logprobs) == len(ids) > 1
        for j in range(1, len(ids)):
            entry = echo.logprobs[j]
            assert entry.token == ids[j]
            assert entry.logprob == pytest.approx(reference(engine, task, ids[:j], ids[j]), abs=ATOL)
            assert len(entry.top) == 3
            for alt, value in entry.top:
                assert value == pytest.approx(reference(engine, task, ids[:j], alt), abs=ATOL)
        assert [e.token for e in gen.logprobs] == gen.token_ids and len(gen.token_ids) == 4
        for j, entry in enumerate(gen.logprobs):
            prefix = ids + gen.token_ids[:j]
            assert entry.logprob == pytest.approx(
                reference(engine, task, prefix, entry.token), abs=ATOL
            )
            values = [v for _, v in entry.top]
            assert values == sorted(values, reverse=True) and entry.top[0][1] >= entry.logprob
            assert entry.top[0][1] == pytest.approx(entry.logprob, abs=ATOL)  # greedy: the best
    assert len({tuple(r.token_ids) for r in results[3:]}) > 1 or len(
        {round(r.logprobs[0].logprob, 4) for r in results[3:]}
    ) == 3  # the prompts really differ


def test_logprobs_do_not_change_the_generated_tokens_and_sampling_keeps_raw_values(engine):
    plain = engine.generate([GenerationRequest(TEXTS[0], task="soft-task", max_new_tokens=5)])[0]
    with_lp = engine.generate(
        [GenerationRequest(TEXTS[0], task="soft-task", max_new_tokens=5, logprobs=0)]
    )[0]
    assert with_lp.token_ids == plain.token_ids and plain.logprobs is None
    assert all(e.top == [] for e in with_lp.logprobs)
    sampled = engine.generate(
        [GenerationRequest(TEXTS[0], "soft-task", 5, temperature=1.5, seed=3, logprobs=1)]
    )[0]
    ids = engine.prepare(PromptLogprobsRequest(TEXTS[0], "soft-task")).token_ids
    for j, entry in enumerate(sampled.logprobs):  # the model's own log-softmax, not the sampler's
        expected = reference(engine, "soft-task", ids + sampled.token_ids[:j], entry.token)
        assert entry.logprob == pytest.approx(expected, abs=ATOL)


def test_one_token_prompt_echo_has_one_null_entry(engine):
    [echo] = engine.run(engine.prepare_all([PromptLogprobsRequest([5], "soft-task", 2)]))
    assert echo.token_ids == [5] and echo.logprobs == [None]


@pytest.mark.parametrize("bad", [-1, MAX_TOP_LOGPROBS + 1, True, "3", 2.0])
def test_engine_refuses_a_bad_number_of_alternatives(engine, bad):
    with pytest.raises(ConfigError, match="logprobs must be an integer in 0..20"):
        engine.prepare(GenerationRequest(TEXTS[0], logprobs=bad))
    with pytest.raises(ConfigError, match="logprobs must be an integer in 0..20"):
        engine.prepare(PromptLogprobsRequest(TEXTS[0], None, bad))


def test_alternatives_count_in_the_token_budget(engine):
    plain = engine.prepare(GenerationRequest(TEXTS[0], max_new_tokens=4))
    top = engine.prepare(GenerationRequest(TEXTS[0], max_new_tokens=4, logprobs=5))
    assert top.tokens == plain.tokens + 4 * 5
    echo = engine.prepare(PromptLogprobsRequest(TEXTS[0], None, 5))
    n = len(echo.token_ids)
    assert echo.tokens == 1 + (n - 1) * 6


def test_pieces_of_text_add_up_to_the_decoded_text(engine):
    ids = engine.prepare(PromptLogprobsRequest("the movie was great fun", None)).token_ids
    pieces = engine.text_pieces(ids)
    assert "".join(pieces) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert engine.text_pieces(ids, 2) == pieces[2:]
    assert torch.tensor(0).item() == 0
