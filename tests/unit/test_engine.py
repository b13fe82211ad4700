"""Engine: mixed-task batches, KV prefix cache, stop rules, classification, bank following and
the micro-batcher, on a tiny random Llama (and Gemma 3) with a temporary prompt bank."""

from __future__ import annotations

import json
import re

import pytest
import torch

from softprompt.bank import PromptBank, SavedPrompt
from softprompt.data import encode_example, task_from_meta
from softprompt.errors import ConfigError, IncompatiblePromptError, UnknownTaskError
from softprompt.model.loading import fingerprint
from softprompt.prompting import inject
from softprompt.prompting.prompted import PromptedModel
from softprompt.serving.engine import (
    ClassifyRequest,
    ContextLengthError,
    Engine,
    GenerationRequest,
    NoVerbalizerError,
)
from softprompt.training.evaluation import label_log_likelihoods

from ..conftest import build_tiny_model
from .serving_fixtures import (
    TASKS,
    TEMPLATE,
    TEXTS,
    VERBALIZER,
    D,
    build_full_tokenizer,
    fill_bank,
    greedy,
    outputs,
    peft_config,
    random_prompt,
    save_task,
)


@pytest.fixture
def tokenizer():
    return build_full_tokenizer()


@pytest.fixture
def bank(tmp_path):
    return PromptBank(tmp_path / "bank")


@pytest.fixture
def engine(tiny_llama, tokenizer, bank):
    fill_bank(bank, tiny_llama)
    return Engine((tiny_llama, tokenizer), bank)


# ---------------------------------------------------------------- mixed batches


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_mixed_batch_of_four_tasks_equals_each_alone(kind, tokenizer, bank):
    model = build_tiny_model(kind)
    fill_bank(bank, model)
    engine = Engine((model, tokenizer), bank)
    tasks = [*TASKS, None]  # four tasks and one row on the base model
    requests = [greedy(text, task) for text, task in zip(TEXTS, tasks, strict=True)]
    mixed = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert outputs(mixed) == outputs(alone)
    assert all(len(r.token_ids) == 8 and r.text for r in mixed)
    same_text = engine.generate([greedy(TEXTS[0], t) for t in tasks])
    assert len({tuple(r.token_ids) for r in same_text}) >= 4  # the tasks really differ


def test_base_model_row_equals_plain_generate(engine, tiny_llama, tokenizer):
    result = engine.generate([greedy(TEXTS[1], None)])[0]
    ids = torch.tensor([tokenizer(TEXTS[1])["input_ids"]])
    plain = tiny_llama.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert result.token_ids == plain[0, ids.shape[1] :].tolist()
    assert (
        engine.generate([greedy(TEXTS[1], engine.base_model_id)])[0].token_ids == result.token_ids
    )


# ---------------------------------------------------------------- KV prefix cache


def test_prefix_cache_on_equals_off_for_generation_and_scores(tiny_llama, tokenizer, bank):
    fill_bank(bank, tiny_llama)
    cached = Engine((tiny_llama, tokenizer), bank, use_prefix_cache=True)
    injected = Engine((tiny_llama, tokenizer), bank, use_prefix_cache=False)
    requests = [greedy(text, task) for text, task in zip(TEXTS, [*TASKS, None], strict=True)]
    assert outputs(cached.generate(requests)) == outputs(injected.generate(requests))
    assert cached.prefix_computations == 4 and injected.prefix_computations == 0
    on = cached.classify(["t0", "t3"], TEXTS[:2])
    off = injected.classify(["t0", "t3"], TEXTS[:2])
    for a, b in zip(on, off, strict=True):
        assert a.label == b.label
        for label in a.log_likelihoods:
            assert a.log_likelihoods[label] == pytest.approx(b.log_likelihoods[label], abs=1e-4)


def test_prefix_cache_computed_once_per_task_and_reused(engine):
    for _ in range(2):
        engine.generate(
            [greedy(TEXTS[0], "t0", 4), greedy(TEXTS[1], "t1", 4), greedy(TEXTS[2], "t0", 4)]
        )
        engine.classify("t1", TEXTS[:2])
    assert engine.prefix_computations == 2


def test_tasks_first_seen_in_one_batch_get_their_prefixes_from_one_forward(
    tiny_llama, tokenizer, bank, monkeypatch
):
    """With many tasks most requests name one not used for a while: the batch's new soft prompts
    get their KV prefixes together (one forward per prompt length), each as it would alone."""
    for i in range(3):
        save_task(bank, f"s{i}", random_prompt(3, seed=10 + i), tiny_llama)
    alone = Engine((tiny_llama, tokenizer), bank)
    expected = [alone.generate([greedy(TEXTS[i], f"s{i}", 4)])[0] for i in range(3)]
    scores = [alone.classify(f"s{i}", TEXTS[3:4])[0] for i in range(3)]
    together = Engine((tiny_llama, tokenizer), bank)

    def one_by_one(*args, **kwargs):
        raise AssertionError("a prefix computed in a forward of its own")

    monkeypatch.setattr(inject, "prompt_prefix", one_by_one)
    got = together.generate([greedy(TEXTS[i], f"s{i}", 4) for i in range(3)])
    assert outputs(got) == outputs(expected) and together.prefix_computations == 3
    fresh = Engine((tiny_llama, tokenizer), bank)
    for got_one, want in zip(
        fresh.classify(["s0", "s1", "s2"], TEXTS[3:4] * 3), scores, strict=True
    ):
        assert got_one.label == want.label
        assert got_one.probabilities == pytest.approx(want.probabilities, abs=1e-6)


def test_prefix_cache_invalidated_when_prompt_changes_in_bank(engine, bank, tiny_llama, tokenizer):
    before = engine.generate([greedy(TEXTS[0], "t0")])[0]
    assert engine.prefix_computations == 1
    save_task(bank, "t0", random_prompt(5, seed=99), tiny_llama)
    after = engine.generate([greedy(TEXTS[0], "t0")])[0]
    assert engine.prefix_computations == 2
    assert engine.task_info("t0").num_virtual_tokens == 5
    fresh = Engine((tiny_llama, tokenizer), bank, use_prefix_cache=False)
    assert outputs([after]) == outputs(fresh.generate([greedy(TEXTS[0], "t0")]))
    assert after.token_ids != before.token_ids


# ---------------------------------------------------------------- stop rules


def test_stop_string_cuts_text_and_ends_row_early(engine):
    full = engine.generate([greedy(TEXTS[0], "t2", n=10)])[0]
    stop = full.text.split(" ")[3]
    cut = engine.generate([GenerationRequest(TEXTS[0], task="t2", max_new_tokens=10, stop=[stop])])[
        0
    ]
    assert cut.finish_reason == "stop" and full.finish_reason == "length"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text
    assert len(cut.token_ids) < 10 and cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_per_row_max_new_tokens_and_finish_reasons(engine):
    limits = [1, 3, 7, 12]
    results = engine.generate(
        [greedy(TEXTS[0], task, n) for task, n in zip(TASKS, limits, strict=True)]
    )
    assert [len(r.token_ids) for r in results] == limits
    assert [r.completion_tokens for r in results] == limits
    assert all(r.finish_reason == "length" for r in results)
    assert results[0].prompt_tokens == 3
    eos = results[3].token_ids[4]  # pretend the 5th token of row 3 is end-of-sequence
    engine.eos_token_ids = (eos,)
    ended = engine.generate([greedy(TEXTS[0], "t3", 12), greedy(TEXTS[0], "t0", 12)])
    assert ended[0].finish_reason == "stop"
    assert ended[0].token_ids[-1] == eos and len(ended[0].token_ids) <= 5


def test_ignore_eos_generates_to_max_new_tokens_and_reports_length(engine):
    first = engine.generate([greedy(TEXTS[0], "t1", 6)])[0]
    engine.eos_token_ids = (first.token_ids[1],)  # pretend the 2nd token ends the sequence
    stopped = engine.generate([greedy(TEXTS[0], "t1", 6)])[0]
    assert (len(stopped.token_ids), stopped.finish_reason) == (2, "stop")
    kept = engine.generate(
        [GenerationRequest(TEXTS[0], task="t1", max_new_tokens=6, ignore_eos=True)]
    )[0]
    assert kept.token_ids == first.token_ids and kept.finish_reason == "length"


def test_streamed_pieces_join_to_final_text_and_never_leak_the_stop_string(engine):
    full = engine.generate([greedy(TEXTS[2], "t1", n=12)])[0]
    stop = " ".join(full.text.split(" ")[5:7])
    pieces: list[str] = []
    result = engine.generate(
        [
            GenerationRequest(
                TEXTS[2], task="t1", max_new_tokens=12, stop=[stop], on_text=pieces.append
            )
        ]
    )[0]
    assert "".join(pieces) == result.text == full.text[: full.text.find(stop)]
    assert len(pieces) > 1 and all(stop not in p for p in pieces)


def test_seeded_sampling_reproducible_alone_and_in_mixed_batch(engine):
    def sampled(seed):
        return GenerationRequest(
            TEXTS[3], task="t2", max_new_tokens=10, temperature=1.5, top_p=0.95, seed=seed
        )

    alone = engine.generate([sampled(7)])[0]
    mixed = engine.generate(
        [greedy(TEXTS[0], "t0"), sampled(7), sampled(8), greedy(TEXTS[1], None)]
    )
    assert mixed[1].token_ids == alone.token_ids
    assert mixed[2].token_ids != alone.token_ids
    assert engine.generate([greedy(TEXTS[3], "t2", 10)])[0].token_ids != alone.token_ids


def test_input_longer_than_context_is_refused(engine):
    long_text = " ".join(["the"] * 300)  # the tiny model's context is 256
    with pytest.raises(ContextLengthError, match="maximum context length is 256"):
        engine.generate([greedy(long_text, "t0")])
    with pytest.raises(ContextLengthError):
        engine.generate([greedy(" ".join(["the"] * 240), "t0", n=20)])  # 240 + 2 + 20 > 256


# ---------------------------------------------------------------- classification and scoring


def by_hand_log_likelihood(model, tokenizer, prompt, text, target):
    """Sum of target log-probs from one full forward of [prompt | input | target]."""
    ids = tokenizer(text)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids + target_ids])
    batch = inject.inject(
        model, tokens, torch.ones_like(tokens), prompt[None], torch.tensor([len(prompt)])
    )
    with torch.no_grad():
        logprobs = inject.forward(model, batch).logits[0].log_softmax(-1)  # (C, V)
    start = len(prompt) + len(ids) - 1  # column that predicts the first target token
    return sum(float(logprobs[start + j, t]) for j, t in enumerate(target_ids))


def test_classify_probabilities_sum_to_one_and_match_scoring_by_hand(engine, tiny_llama, tokenizer):
    results = engine.classify("t1", TEXTS[:3])
    prompt = random_prompt(TASKS["t1"], seed=1)
    for text, result in zip(TEXTS[:3], results, strict=True):
        assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        hand = [
            by_hand_log_likelihood(tiny_llama, tokenizer, prompt, TEMPLATE.format(text=text), t)
            for t in VERBALIZER["targets"]
        ]
        assert [result.log_likelihoods[label] for label in VERBALIZER["labels"]] == pytest.approx(
            hand, abs=1e-4
        )
        expected = torch.tensor(hand).softmax(0).tolist()
        assert list(result.probabilities.values()) == pytest.approx(expected, abs=1e-5)
        assert result.label == VERBALIZER["labels"][int(torch.tensor(hand).argmax())]
    scores = engine.score(["t1", "t3"], TEXTS[:2], [" good", " bad film"])
    assert scores[0] == pytest.approx(
        by_hand_log_likelihood(tiny_llama, tokenizer, prompt, TEXTS[0], " good"), abs=1e-4
    )


def test_classify_mixed_tasks_in_one_batch_equals_each_alone(engine):
    mixed = engine.classify(["t0", "t1", "t2", "t3"], TEXTS[:4])
    for task, text, result in zip(TASKS, TEXTS[:4], mixed, strict=True):
        alone = engine.classify(task, [text])[0]
        assert alone.label == result.label
        assert alone.probabilities == pytest.approx(result.probabilities, abs=1e-5)


def test_classify_task_without_verbalizer_raises(engine, bank, tiny_llama):
    bank.save(
        SavedPrompt(
            "plain", random_prompt(2, 5), peft_config(2), {"fingerprint": fingerprint(tiny_llama)}
        )
    )
    with pytest.raises(NoVerbalizerError, match="no verbalizer"):
        engine.classify("plain", ["the movie"])
    with pytest.raises(NoVerbalizerError):
        engine.classify(None, ["the movie"])


def test_sampled_generation_with_a_seed_equals_prompted_model_generate(
    engine, bank, tiny_llama, tokenizer
):
    """`softprompt generate --seed` (PromptedModel.generate) and a server request with the same
    seed sample the same continuation, row for row."""
    prompted = PromptedModel(tiny_llama, {"t1": bank.load("t1")}, tokenizer=tokenizer)
    texts = TEXTS[:3]
    local = prompted.generate(texts, "t1", max_new_tokens=6, temperature=1.5, seed=11)
    served = engine.generate(
        [GenerationRequest(t, task="t1", max_new_tokens=6, temperature=1.5, seed=11) for t in texts]
    )
    assert local == [r.text for r in served]
    assert local != prompted.generate(texts, "t1", max_new_tokens=6, temperature=1.5, seed=12)


MULTI_FIELD_TEMPLATE = "title : {title} review : {text} sentiment :"


def test_classify_multi_field_template_equals_softprompt_eval(engine, bank, tiny_llama, tokenizer):
    """The engine reads a saved task as `softprompt eval` does (data.task_from_meta) and scores
    the same tokens: a multi-field template is served, and labels and scores agree row by row."""
    save_task(bank, "titled", random_prompt(3, 7), tiny_llama, template=MULTI_FIELD_TEMPLATE)
    rows = [
        {"title": title, "text": text}
        for title, text in zip(["fun", "plot", "the actor", "i"], TEXTS[:4], strict=True)
    ]
    served = engine.classify("titled", rows)
    saved = bank.load("titled")
    task = task_from_meta("titled", saved.meta)
    prompted = PromptedModel(tiny_llama, {"titled": saved}, tokenizer=tokenizer)
    examples = [encode_example(tokenizer, task, row, 0, require_target=False) for row in rows]
    scores = label_log_likelihoods(
        prompted, examples, task.verbalizer.target_token_ids(tokenizer), 0
    )
    for row_scores, result in zip(scores, served, strict=True):
        assert [result.log_likelihoods[label] for label in task.verbalizer.labels] == pytest.approx(
            row_scores.tolist(), abs=1e-4
        )
        assert result.label == task.verbalizer.labels[int(row_scores.argmax())]
    assert len({tuple(r.log_likelihoods.values()) for r in served}) == len(
        rows
    )  # every field reached the model


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("just a text", "has fields ['title', 'text']; send an object"),
        ({"title": "fun"}, "input 0: missing field 'text'"),
        ({"title": "fun", "text": "  "}, "input 0: empty field 'text'"),
        ({"title": "fun", "text": "plot", "txet": "plot"}, "input 0: unknown field 'txet'"),
        ({"title": "fun", "text": 3}, "input 0: every field value must be a string"),
    ],
)
def test_classify_multi_field_bad_input_names_the_field(engine, bank, tiny_llama, value, fragment):
    save_task(bank, "titled", random_prompt(3, 7), tiny_llama, template=MULTI_FIELD_TEMPLATE)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        engine.classify("titled", [value])


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("temperature", True, "temperature must be >= 0"),
        ("top_p", True, "top_p must be in (0, 1]"),
        ("seed", False, "seed must be an integer"),
        ("max_new_tokens", True, "max_new_tokens must be a positive integer"),
    ],
)
def test_bad_input_a_bool_is_not_a_sampling_number(engine, field, value, fragment):
    fields = {"max_new_tokens": 1, field: value}
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        engine.generate([GenerationRequest("fun", task="t0", **fields)])


def test_classify_string_input_fills_the_one_field_of_any_name(engine, bank, tiny_llama):
    save_task(bank, "question", random_prompt(3, 8), tiny_llama, template="q : {question} a :")
    by_string, by_object = engine.classify(
        "question", ["the movie was", {"question": "the movie was"}]
    )
    assert by_string.log_likelihoods == by_object.log_likelihoods


# ---------------------------------------------------------------- following the bank


def write_plain_folder(root, name, values, model):
    """A PEFT-style folder written by hand (bypasses the bank's own checks, e.g. for NaN)."""
    import safetensors.torch

    folder = root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps(peft_config(values.shape[0], values.shape[1]))
    )
    safetensors.torch.save_file(
        {"prompt_embeddings": values}, str(folder / "adapter_model.safetensors")
    )
    (folder / "softprompt.json").write_text(json.dumps({"fingerprint": fingerprint(model)}))


def test_bad_bank_entries_skipped_while_others_serve(engine, bank, tiny_llama):
    save_task(bank, "wrong-dim", torch.randn(3, 16), tiny_llama)
    other = {**fingerprint(tiny_llama), "embedding_sha256": "0" * 16}
    save_task(bank, "other-model", random_prompt(3, 1), tiny_llama, fingerprint=other)
    write_plain_folder(bank.root, "has-nan", torch.full((2, D), float("nan")), tiny_llama)
    page = engine.listing(100)  # from the metadata: a NaN tensor is not seen before it is read
    assert [i.name for i in page.infos] == ["has-nan", *sorted(TASKS)]
    assert set(page.unavailable) == {"wrong-dim", "other-model"}
    assert "hidden size 16" in page.unavailable["wrong-dim"]
    assert "another base model" in page.unavailable["other-model"]
    with pytest.raises(IncompatiblePromptError, match="NaN"):
        engine.activate("has-nan")
    page = engine.listing(100)  # refused once read: unavailable from now on
    assert [i.name for i in page.infos] == sorted(TASKS) and "NaN" in page.unavailable["has-nan"]
    with pytest.raises(IncompatiblePromptError, match="hidden size 16"):
        engine.activate("wrong-dim")
    assert len(engine.generate([greedy(TEXTS[0], t) for t in TASKS])) == 4
    assert engine.tasks() == sorted(TASKS)


def test_refresh_follows_bank_for_tasks_in_memory_and_reads_no_other(engine, bank, tiny_llama):
    assert engine.refresh() == {} and engine.tasks() == []  # nothing is read before it is used
    engine.activate("t1")
    engine.activate("t2")
    old_version = engine.task_info("t1").version
    save_task(bank, "new-task", random_prompt(2, 11), tiny_llama)
    save_task(bank, "t1", random_prompt(4, 12), tiny_llama)
    bank.delete("t2")
    engine.refresh()
    assert engine.tasks() == ["t1"]  # changed: reloaded; deleted: dropped; new: not read yet
    assert (
        engine.task_info("t1").version != old_version
        and engine.task_info("t1").num_virtual_tokens == 4
    )
    assert "new-task" in [i.name for i in engine.listing(100).infos]
    engine.activate("t3")
    bank.delete("t3")  # gone on the very next request, even before a refresh
    with pytest.raises(UnknownTaskError):
        engine.generate([greedy(TEXTS[0], "t3")])
    assert "t3" not in engine.tasks()


def test_activation_in_memory_reads_no_prompt_files_and_from_disk_reads_them_once(
    engine, monkeypatch
):
    """An active task is served from memory (one version check, no prompt read); after
    `deactivate` it is read from the bank once. (How long each takes: bench/serve_latency.py.)"""
    reads = []
    load = engine.bank.load
    monkeypatch.setattr(engine.bank, "load", lambda name: reads.append(name) or load(name))
    engine.activate("t3")  # in memory from here on
    reads.clear()
    for _ in range(5):
        engine.activate("t3")
    assert reads == []
    engine.deactivate("t3")
    engine.activate("t3")
    engine.activate("t3")
    assert reads == ["t3"]


def test_in_memory_task_without_bank(tiny_llama, tokenizer):
    engine = Engine((tiny_llama, tokenizer), None)
    engine.add_task("mem", random_prompt(3, 4), meta={"verbalizer": VERBALIZER})
    assert engine.tasks() == ["mem"]
    assert len(engine.classify("mem", ["fun"])[0].probabilities) == 2
    with pytest.raises(IncompatiblePromptError, match="NaN"):
        engine.add_task("bad", torch.full((2, D), float("inf")))
    with pytest.raises(UnknownTaskError):
        engine.generate([greedy("fun", "absent")])


def test_chat_prompt_uses_template_or_falls_back_to_role_lines(engine, tokenizer):
    messages = [{"role": "user", "content": "the movie"}]
    assert engine.tokenizer.chat_template is None
    assert engine.chat_prompt(messages) == tokenizer("user : the movie\nassistant :")["input_ids"]
    engine.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} . {% endfor %}review :"
    )
    assert engine.chat_prompt(messages) == tokenizer("the movie . review :")["input_ids"]


def test_bad_input_prompt_saved_mid_request_never_mixes_versions(
    engine, bank, tiny_llama, monkeypatch
):
    old = engine.activate("t0").version
    calls = []

    def save_on_second_row(encode):  # tokenising each row is where a request spends its time
        def wrapped(*args):
            calls.append(args)
            if len(calls) == 2:  # a PUT /v1/prompts/t0 landing while the request is prepared
                save_task(bank, "t0", random_prompt(5, 99), tiny_llama)
            return encode(*args)

        return wrapped

    monkeypatch.setattr(
        engine, "_classify_input_ids", save_on_second_row(engine._classify_input_ids)
    )
    monkeypatch.setattr(engine, "_input_ids", save_on_second_row(engine._input_ids))
    classify = engine.prepare(ClassifyRequest("t0", TEXTS[:4]))
    assert len(calls) == 4
    assert {pair.task.version for pair in classify.pairs} == {old}
    calls.clear()
    generations = engine.prepare_all([greedy(text, "t0") for text in TEXTS[:4]])
    versions = {row.task.version for row in generations}
    assert len(versions) == 1 and versions != {
        old
    }  # the first save is seen, the second is not mixed in
    assert engine.activate("t0").version not in versions | {old}  # the next request sees the newest


@pytest.mark.parametrize(
    "values, message",
    [
        (torch.full((2, D), float("nan")), "prompt 'bad' contains NaN/inf"),
        (torch.zeros(0, D), "prompt 'bad' has no rows (virtual tokens)"),
        (torch.zeros(3), "prompt 'bad' must be a 2-D tensor [num_virtual_tokens, width], got [3]"),
        (torch.zeros(2, D + 1), f"prompt 'bad' has hidden size {D + 1} but the model has {D}"),
    ],
)
def test_bad_input_prompt_tensor_gets_one_message_in_the_engine_and_the_prompt_table(
    engine, values, message
):
    from softprompt.prompting.soft import PromptTable

    with pytest.raises(IncompatiblePromptError) as in_engine:
        engine.add_task("bad", values)
    table = PromptTable()
    table.add("good", torch.zeros(2, D))
    with pytest.raises(IncompatiblePromptError) as in_table:
        table.add("bad", values)
    assert str(in_engine.value) == str(in_table.value) == message
