"""Log-probabilities (OpenAI's `logprobs`, `echo`, chat `top_logprobs`): the engine's values equal
the built-in scorer's for the same prompt and task (soft, deep and no prompt in one batch), and the
HTTP routes return them in OpenAI's shapes, streaming included, with strict validation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from softprompt.errors import ConfigError
from softprompt.prompting.scorer import ScoreRow
from softprompt.serving.engine import Engine, GenerationRequest
from softprompt.serving.requests import MAX_TOP_LOGPROBS, PromptLogprobsRequest

from ..conftest import build_tiny_tokenizer
from .serving_fixtures import (
    API_KEY,
    CHAT_TEMPLATE,
    DEEP_TEXTS,
    build_full_tokenizer,
    fill_bank,
    running,
    served_bank,
)

ATOL = 1e-5
TASKS = ["deep-task", "soft-task", None]


@pytest.fixture
def engine(tiny_llama, tmp_path):
    _, bank = served_bank(tiny_llama, build_tiny_tokenizer(), tmp_path / "bank")
    return Engine((tiny_llama, build_tiny_tokenizer()), bank)


def reference(engine, task, ids, token):
    """The scorer's log-probability of `token` after `ids` under `task` (a row of its own)."""
    entry = engine.prepare(GenerationRequest("fun", task=task)).task  # the engine's loaded task
    return engine.score_pairs([ScoreRow(list(ids), [token], entry)])[0]


def test_echo_and_generated_logprobs_equal_the_scorer_soft_deep_and_none_in_one_batch(engine):
    echoes = [PromptLogprobsRequest(t, task, 3) for t, task in zip(DEEP_TEXTS, TASKS, strict=True)]
    gens = [
        GenerationRequest(t, task=task, max_new_tokens=4, logprobs=3)
        for t, task in zip(DEEP_TEXTS, TASKS, strict=True)
    ]
    results = engine.run(engine.prepare_all(echoes + gens))  # one batch of each kind, mixed tasks
    for task, echo, gen in zip(TASKS, results[:3], results[3:], strict=True):
        ids = echo.token_ids
        assert echo.logprobs[0] is None and len(echo.logprobs) == len(ids) > 1
        for j in range(1, len(ids)):
            entry = echo.logprobs[j]
            assert entry.token == ids[j]
            assert entry.logprob == pytest.approx(
                reference(engine, task, ids[:j], ids[j]), abs=ATOL
            )
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
    assert (
        len({tuple(r.token_ids) for r in results[3:]}) > 1
        or len({round(r.logprobs[0].logprob, 4) for r in results[3:]}) == 3
    )  # the prompts really differ


def test_logprobs_do_not_change_the_generated_tokens_and_sampling_keeps_raw_values(engine):
    plain = engine.generate([GenerationRequest(DEEP_TEXTS[0], task="soft-task", max_new_tokens=5)])[
        0
    ]
    with_lp = engine.generate(
        [GenerationRequest(DEEP_TEXTS[0], task="soft-task", max_new_tokens=5, logprobs=0)]
    )[0]
    assert with_lp.token_ids == plain.token_ids and plain.logprobs is None
    assert all(e.top == [] for e in with_lp.logprobs)
    sampled = engine.generate(
        [GenerationRequest(DEEP_TEXTS[0], "soft-task", 5, temperature=1.5, seed=3, logprobs=1)]
    )[0]
    ids = engine.prepare(PromptLogprobsRequest(DEEP_TEXTS[0], "soft-task")).token_ids
    for j, entry in enumerate(sampled.logprobs):  # the model's own log-softmax, not the sampler's
        expected = reference(engine, "soft-task", ids + sampled.token_ids[:j], entry.token)
        assert entry.logprob == pytest.approx(expected, abs=ATOL)


def test_classification_sharing_a_scoring_batch_with_an_echo_keeps_its_scores(engine):
    from softprompt.serving.engine import ClassifyRequest

    alone = engine.classify("soft-task", DEEP_TEXTS)
    mixed = engine.run(
        engine.prepare_all(
            [
                ClassifyRequest("soft-task", DEEP_TEXTS),
                PromptLogprobsRequest(DEEP_TEXTS[0], "deep-task", 4),
            ]
        )
    )[0]
    for a, m in zip(alone, mixed, strict=True):
        assert m.label == a.label
        assert list(m.log_likelihoods.values()) == pytest.approx(
            list(a.log_likelihoods.values()), abs=1e-6
        )


def test_one_token_prompt_echo_has_one_null_entry(engine):
    [echo] = engine.run(engine.prepare_all([PromptLogprobsRequest([5], "soft-task", 2)]))
    assert echo.token_ids == [5] and echo.logprobs == [None]


@pytest.mark.parametrize("bad", [-1, MAX_TOP_LOGPROBS + 1, True, "3", 2.0])
def test_engine_refuses_a_bad_number_of_alternatives(engine, bad):
    with pytest.raises(ConfigError, match="logprobs must be an integer in 0..20"):
        engine.prepare(GenerationRequest(DEEP_TEXTS[0], logprobs=bad))
    with pytest.raises(ConfigError, match="logprobs must be an integer in 0..20"):
        engine.prepare(PromptLogprobsRequest(DEEP_TEXTS[0], None, bad))


def test_alternatives_count_in_the_token_budget(engine):
    plain = engine.prepare(GenerationRequest(DEEP_TEXTS[0], max_new_tokens=4))
    top = engine.prepare(GenerationRequest(DEEP_TEXTS[0], max_new_tokens=4, logprobs=5))
    assert top.tokens == plain.tokens + 4 * 5
    echo = engine.prepare(PromptLogprobsRequest(DEEP_TEXTS[0], None, 5))
    n = len(echo.token_ids)
    assert echo.tokens == 1 + (n - 1) * 6


def test_pieces_of_text_add_up_to_the_decoded_text(engine):
    ids = engine.prepare(PromptLogprobsRequest("the movie was great fun", None)).token_ids
    pieces = engine.text_pieces(ids)
    assert "".join(pieces) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert engine.text_pieces(ids, 2) == pieces[2:]
    assert torch.tensor(0).item() == 0


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The built-in server over a tiny Llama and four soft-prompt tasks (t0..t3), as test_server's."""
    import httpx
    import openai

    from softprompt.api.app import create_app
    from softprompt.bank import PromptBank

    from ..conftest import build_tiny_model

    model, tokenizer = build_tiny_model("llama"), build_full_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    bank = PromptBank(tmp_path_factory.mktemp("bank"))
    fill_bank(bank, model)
    engine = Engine((model, tokenizer), bank)
    app = create_app(engine, api_key=API_KEY)
    with running(app) as url:
        yield SimpleNamespace(
            engine=engine,
            app=app,
            client=openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=30),
            http=httpx.Client(base_url=url, timeout=30),
        )


def completion(server, **body):
    response = server.http.post("/v1/completions", json={"model": "t1", **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_http_echo_with_logprobs_returns_prompt_and_completion_tokens(server):
    prompts = [[1, 5, 6, 7], [8, 9]]
    body = completion(server, prompt=prompts, max_tokens=3, logprobs=2, echo=True, temperature=0)
    for prompt, choice in zip(prompts, body["choices"], strict=True):
        lp = choice["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert len(lp["tokens"]) == len(prompt) + 3 == len(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(isinstance(v, float) for v in lp["token_logprobs"][1:])
        assert all(len(top) in (2, 3) for top in lp["top_logprobs"][1:])
        offsets = lp["text_offset"]
        assert offsets == sorted(offsets) and offsets[0] == 0
        head = server.engine.tokenizer.decode(prompt, skip_special_tokens=True)
        assert choice["text"].startswith(head) and offsets[len(prompt)] == len(head)
        [echo] = server.engine.run(
            server.engine.prepare_all([PromptLogprobsRequest(prompt, "t1", 2)])
        )
        assert lp["token_logprobs"][1 : len(prompt)] == pytest.approx(
            [e.logprob for e in echo.logprobs[1:]], abs=ATOL
        )
        alone = server.engine.generate(
            [GenerationRequest(prompt, task="t1", max_new_tokens=3, logprobs=2)]
        )[0]
        assert lp["token_logprobs"][len(prompt) :] == pytest.approx(
            [e.logprob for e in alone.logprobs], abs=ATOL
        )
    assert body["usage"]["completion_tokens"] == 6


def test_http_max_tokens_zero_with_echo_scores_the_prompt_alone(server):
    body = completion(server, prompt="the movie was fun", max_tokens=0, echo=True, logprobs=0)
    [choice] = body["choices"]
    assert choice["text"] == "the movie was fun" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["the", "movie", "was", "fun"]
    assert lp["text_offset"] == [0, 3, 9, 13]  # where each token's text starts (its space first)
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}
    without = completion(server, prompt="the movie was fun", max_tokens=0, echo=True)
    assert without["choices"][0]["logprobs"] is None
    assert without["choices"][0]["text"] == "the movie was fun"


def test_openai_client_echo_logprobs_as_lm_eval_reads_them(server):
    out = server.client.completions.create(
        model="t2", prompt=[[5, 6, 7, 8]], max_tokens=1, logprobs=1, echo=True, temperature=0
    )
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and lp.token_logprobs[0] is None
    continuation = lp.token_logprobs[2:-1]  # what lm-eval sums for a context of 2 tokens
    assert all(
        v <= max(top.values()) + 1e-9
        for v, top in zip(continuation, lp.top_logprobs[2:-1], strict=True)
    )


def test_http_streamed_logprobs_join_to_the_whole_answer(server):
    body = {"prompt": "the movie was", "max_tokens": 5, "logprobs": 2, "echo": True}
    whole = completion(server, **body, temperature=0)["choices"][0]
    chunks = []
    with server.http.stream(
        "POST", "/v1/completions", json={"model": "t1", **body, "temperature": 0, "stream": True}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0])
    joined = {key: [] for key in whole["logprobs"]}
    for choice in chunks:
        for key, values in (choice["logprobs"] or {}).items():
            joined[key] += values
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert joined["tokens"] == whole["logprobs"]["tokens"]
    assert joined["text_offset"] == whole["logprobs"]["text_offset"]
    assert joined["token_logprobs"][1:] == pytest.approx(
        whole["logprobs"]["token_logprobs"][1:], abs=ATOL
    )


def test_openai_client_chat_logprobs_and_top_logprobs(server):
    messages = [{"role": "user", "content": "a great film"}]
    out = server.client.chat.completions.create(
        model="t0", messages=messages, max_tokens=4, logprobs=True, top_logprobs=3, temperature=0
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 4
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=ATOL) for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    plain = server.client.chat.completions.create(
        model="t0", messages=messages, max_tokens=4, temperature=0
    )
    assert plain.choices[0].logprobs is None
    stream = server.client.chat.completions.create(
        model="t0",
        messages=messages,
        max_tokens=4,
        logprobs=True,
        top_logprobs=1,
        stream=True,
        temperature=0,
    )
    streamed = [
        c
        for chunk in stream
        for choice in chunk.choices
        for c in (choice.logprobs.content if choice.logprobs else [])
    ]
    assert [c.token for c in streamed] == [c.token for c in content]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"logprobs": "2"}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"logprobs": 2.0}, "logprobs"),
        ("/v1/completions", {"logprobs": MAX_TOP_LOGPROBS + 1}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"echo": "true"}, "echo"),
        ("/v1/completions", {"echo": 1}, "echo"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"logprobs": "true"}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": "2"}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_http_bad_logprobs_fields_are_422_naming_the_field(server, route, body, param):
    base = (
        {"prompt": "the movie"}
        if route == "/v1/completions"
        else {"messages": [{"role": "user", "content": "fun"}]}
    )
    response = server.http.post(route, json={"model": "t0", **base, **body})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param
    assert param in response.json()["error"]["message"]


def test_http_alternatives_count_in_the_request_token_budget(server):
    limits = server.app.state.limits
    room = limits.max_tokens_per_request
    response = server.http.post(
        "/v1/completions",
        json={
            "model": "t0",
            "prompt": "fun",
            "max_tokens": 100,
            "logprobs": 20,
            "ignore_eos": True,
        },
    )
    assert room < 100 * 21 or response.status_code == 200
    limits.max_tokens_per_request, saved = 1000, room
    try:
        response = server.http.post(
            "/v1/completions",
            json={"model": "t0", "prompt": "fun", "max_tokens": 100, "logprobs": 20},
        )
        assert response.status_code == 413, response.text
        ok = server.http.post(
            "/v1/completions", json={"model": "t0", "prompt": "fun", "max_tokens": 100}
        )
        assert ok.status_code == 200
    finally:
        limits.max_tokens_per_request = saved
