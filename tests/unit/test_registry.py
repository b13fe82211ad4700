"""Memory tiers of the task registry (issue 27): bounded loaded tasks and KV prefixes (LRU),
pinned tasks, tasks in use never evicted, reloads that give the same results, the counters, the
start-up errors and a bank that loses a task under load; on a tiny random Llama."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from softprompt.bank import PromptBank
from softprompt.cli.main import build_parser, main
from softprompt.errors import ConfigError, UnknownTaskError
from softprompt.options import from_args
from softprompt.serving.engine import ClassifyRequest, Engine
from softprompt.serving.registry import TierConfig

from ..conftest import build_tiny_tokenizer
from .serving_fixtures import (
    DEEP_TEXTS,
    TASKS,
    TEXTS,
    build_full_tokenizer,
    fill_bank,
    greedy,
    outputs,
    running,
    served_bank,
)

NAMES = list(TASKS)  # t0 .. t3


@pytest.fixture
def bank(tmp_path, tiny_llama):
    bank = PromptBank(tmp_path / "bank")
    fill_bank(bank, tiny_llama)
    return bank


@pytest.fixture
def tokenizer():
    return build_full_tokenizer()


def tiered(model, tokenizer, bank, **tiers) -> Engine:
    return Engine((model, tokenizer), bank, tiers=TierConfig(**tiers))


def loaded(engine: Engine) -> list[str]:
    return engine.tasks()


def resident(engine: Engine) -> list[str]:
    return sorted(name for name in engine.tasks() if engine.registry._tasks[name].prefix)


# ---------------------------------------------------------------- LRU order and pins


def test_tiers_default_is_unbounded_like_before(tiny_llama, tokenizer, bank):
    engine = Engine((tiny_llama, tokenizer), bank)
    for name in NAMES:
        engine.classify(name, TEXTS[:1])
    stats = engine.registry.stats()
    assert loaded(engine) == NAMES and resident(engine) == NAMES
    assert stats["max_loaded_tasks"] is None and stats["max_resident_tasks"] is None
    assert stats["evictions"] == stats["prefix_evictions"] == 0


def test_tiers_loaded_tier_evicts_the_least_recently_used(tiny_llama, tokenizer, bank):
    engine = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=2)
    for name in ("t0", "t1", "t0", "t2"):  # t0 used again: t1 is the least recently used
        engine.classify(name, TEXTS[:1])
    assert loaded(engine) == ["t0", "t2"]
    engine.generate([greedy(TEXTS[0], "t3", 2)])
    assert loaded(engine) == ["t2", "t3"]
    stats = engine.registry.stats()
    assert (stats["loaded"], stats["hits"], stats["misses"], stats["evictions"]) == (2, 1, 4, 2)


def test_tiers_resident_tier_drops_the_least_recently_used_prefix(tiny_llama, tokenizer, bank):
    engine = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=4, max_resident_tasks=2)
    for name in ("t0", "t1", "t0", "t2"):
        engine.classify(name, TEXTS[:1])
    assert loaded(engine) == ["t0", "t1", "t2"] and resident(engine) == ["t0", "t2"]
    assert engine.prefix_computations == 3
    engine.classify("t1", TEXTS[:1])  # its prompt is loaded; its prefix is computed again
    assert engine.prefix_computations == 4 and resident(engine) == ["t1", "t2"]
    stats = engine.registry.stats()
    assert (stats["resident"], stats["prefix_evictions"], stats["evictions"]) == (2, 2, 0)


def test_tiers_pinned_tasks_load_at_start_and_are_never_evicted(tiny_llama, tokenizer, bank):
    engine = tiered(
        tiny_llama, tokenizer, bank, max_loaded_tasks=2, max_resident_tasks=1, pin=["t3"]
    )
    assert loaded(engine) == ["t3"] and engine.registry.stats()["loads"] == 1
    engine.classify("t3", TEXTS[:1])
    for name in ("t0", "t1", "t2", "t0"):
        engine.classify(name, TEXTS[:1])
        assert "t3" in loaded(engine) and len(loaded(engine)) <= 2
        assert resident(engine) == ["t3"]  # the one resident slot stays the pinned task's
    assert engine.registry.stats()["pinned"] == 1


def test_tiers_following_the_bank_loads_nothing_and_keeps_the_lru_order(
    tiny_llama, tokenizer, bank
):
    """refresh only follows the tasks in memory (tasks load on first use): it never evicts to
    load more, and touching them in LRU order leaves the next eviction to the least recent."""
    engine = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=2)
    engine.classify("t3", TEXTS[:1])
    engine.classify("t0", TEXTS[:1])
    assert engine.refresh() == {}
    assert loaded(engine) == ["t0", "t3"] and engine.registry.stats()["evictions"] == 0
    engine.classify("t1", TEXTS[:1])  # t3, the least recently used, goes (not t0 by name order)
    assert loaded(engine) == ["t0", "t1"] and engine.registry.stats()["evictions"] == 1


# ---------------------------------------------------------------- in use: never evicted


def test_tiers_task_in_use_by_a_prepared_request_is_not_evicted(tiny_llama, tokenizer, bank):
    expected = Engine((tiny_llama, tokenizer), bank).classify("t0", TEXTS[:3])
    engine = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=1, max_resident_tasks=1)
    waiting = engine.prepare(ClassifyRequest("t0", TEXTS[:3]))
    entry = engine.registry._tasks["t0"]
    for name in ("t1", "t2"):
        engine.classify(name, TEXTS[:1])
        assert engine.registry._tasks.get("t0") is entry  # held over the bound, not evicted
        assert engine.registry.stats()["in_use"] == 1
    assert loaded(engine) == ["t0"]  # t1 and t2 went as soon as their requests ended
    [result] = engine.run([waiting])
    assert [r.probabilities for r in result] == [r.probabilities for r in expected]
    assert resident(engine) == ["t0"]
    del waiting, result  # the request is over: its task is evictable again
    assert engine.registry.stats()["in_use"] == 0
    engine.classify("t1", TEXTS[:1])
    assert loaded(engine) == ["t1"] and resident(engine) == ["t1"]


def test_tiers_task_of_a_running_generation_is_not_evicted(tiny_llama, tokenizer, bank):
    expected = Engine((tiny_llama, tokenizer), bank).generate([greedy(TEXTS[0], "t0", 6)])
    engine = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=1, max_resident_tasks=1)
    batch = engine.start_generation(engine.prepare_all([greedy(TEXTS[0], "t0", 6)]))
    results = []
    for name in ("t1", "t2", "t3"):  # other requests between the running batch's steps
        engine.classify(name, TEXTS[:1])
        assert "t0" in loaded(engine) and "t0" in resident(engine)
        results += [result for _, result in engine.step(batch)]
    while batch.rows:
        results += [result for _, result in engine.step(batch)]
    assert outputs(results) == outputs(expected)
    del batch, results  # its rows are done: nothing holds t0 any more
    assert engine.registry.stats()["in_use"] == 0
    engine.classify("t1", TEXTS[:1])
    assert loaded(engine) == ["t1"]


def test_tiers_a_request_failing_after_prepare_releases_its_tasks(tiny_llama, tokenizer, bank):
    engine = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=1)
    with pytest.raises(UnknownTaskError):  # t0 resolved, then the second row's task is unknown
        engine.classify(["t0", "nope"], TEXTS[:2])
    assert engine.registry.stats()["in_use"] == 0
    engine.classify("t1", TEXTS[:1])
    assert loaded(engine) == ["t1"]


# ---------------------------------------------------------------- reloads: the same results


def test_tiers_reload_after_eviction_gives_the_results_of_an_unbounded_registry(
    tiny_llama, tokenizer, bank
):
    unbounded = Engine((tiny_llama, tokenizer), bank)
    bounded = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=1, max_resident_tasks=1)
    for _ in range(2):  # the second round reads every task from the bank again
        for name in NAMES:
            want, got = unbounded.classify(name, TEXTS), bounded.classify(name, TEXTS)
            for a, b in zip(want, got, strict=True):
                assert a.label == b.label
                for label, p in a.probabilities.items():
                    assert b.probabilities[label] == pytest.approx(p, abs=1e-6)
            requests = [greedy(TEXTS[1], name, 4)]
            assert outputs(bounded.generate(requests)) == outputs(unbounded.generate(requests))
    stats = bounded.registry.stats()
    assert stats["misses"] == stats["loads"] == 8 and stats["evictions"] == 7
    assert stats["hits"] == 8  # each generation right after its classify


def test_tiers_concurrent_requests_over_more_tasks_than_the_bounds(tiny_llama, tokenizer, bank):
    unbounded = Engine((tiny_llama, tokenizer), bank)
    want = {name: unbounded.classify(name, TEXTS[:2]) for name in NAMES}
    bounded = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=2, max_resident_tasks=1)
    order = [NAMES[(i * 7) % 4] for i in range(32)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda name: bounded.classify(name, TEXTS[:2]), order))
    for name, results in zip(order, got, strict=True):
        for a, b in zip(want[name], results, strict=True):
            for label, p in a.probabilities.items():
                assert b.probabilities[label] == pytest.approx(p, abs=1e-6)
    stats = bounded.registry.stats()
    assert stats["loaded"] <= 2 and stats["resident"] <= 1 and stats["in_use"] == 0
    assert stats["hits"] + stats["misses"] == 32 and stats["evictions"] >= 2


def test_tiers_reload_of_deep_and_soft_prompts_gives_the_same_results(tiny_llama, tmp_path):
    tokenizer = build_tiny_tokenizer()
    _, bank = served_bank(tiny_llama, tokenizer, tmp_path / "deep-bank")
    unbounded = Engine((tiny_llama, tokenizer), bank)
    bounded = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=1, max_resident_tasks=1)
    for name in ["deep-task", "soft-task"] * 2:
        want, got = unbounded.classify(name, DEEP_TEXTS), bounded.classify(name, DEEP_TEXTS)
        for a, b in zip(want, got, strict=True):
            for label, p in a.probabilities.items():
                assert b.probabilities[label] == pytest.approx(p, abs=1e-6)
        requests = [greedy(text, name, 5) for text in DEEP_TEXTS]
        assert outputs(bounded.generate(requests)) == outputs(unbounded.generate(requests))
    assert bounded.registry.stats()["evictions"] == 3


def test_tiers_counters_count_loads_and_their_time(tiny_llama, tokenizer, bank):
    engine = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=2, max_resident_tasks=1)
    assert engine.registry.stats()["load_seconds_mean"] is None  # nothing loaded yet
    for name in ("t0", "t1", "t0", "t2", "t0"):
        engine.classify(name, TEXTS[:1])
    stats = engine.registry.stats()
    assert {k: stats[k] for k in ("loaded", "resident", "hits", "misses", "loads")} == {
        "loaded": 2,
        "resident": 1,
        "hits": 2,
        "misses": 3,
        "loads": 3,
    }
    assert (stats["evictions"], stats["prefix_evictions"], stats["in_use"]) == (1, 4, 0)
    assert stats["load_seconds_total"] > 0
    assert stats["load_seconds_mean"] == pytest.approx(stats["load_seconds_total"] / 3, abs=1e-6)
    assert (stats["max_loaded_tasks"], stats["max_resident_tasks"]) == (2, 1)


# ---------------------------------------------------------------- bad input at start-up


@pytest.mark.parametrize(
    "tiers, message",
    [
        (
            {"max_loaded_tasks": 0},
            "--max-loaded-tasks must be an integer >= 1 (or unset: no bound), not 0",
        ),
        (
            {"max_loaded_tasks": -3},
            "--max-loaded-tasks must be an integer >= 1 (or unset: no bound), not -3",
        ),
        (
            {"max_resident_tasks": 0},
            "--max-resident-tasks must be an integer >= 1 (or unset: no bound), not 0",
        ),
        (
            {"max_loaded_tasks": 2, "max_resident_tasks": 3},
            "--max-resident-tasks (3) exceeds --max-loaded-tasks (2)",
        ),
        (
            {"max_loaded_tasks": 2, "pin": ["t0", "t1", "t2"]},
            "--pin names 3 tasks but --max-loaded-tasks is 2",
        ),
        (
            {"max_resident_tasks": 1, "pin": ["t0", "t1"]},
            "--pin names 2 tasks but --max-resident-tasks is 1",
        ),
        ({"pin": ["Bad Name"]}, "--pin: invalid task name 'Bad Name'"),
    ],
)
def test_bad_input_tier_bounds_are_refused_naming_the_flag(tiers, message):
    with pytest.raises(ConfigError) as error:
        TierConfig(**tiers)
    assert message in str(error.value)


def test_bad_input_a_task_pinned_twice_counts_once():
    assert TierConfig(max_loaded_tasks=1, pin=["t0", "t0"]).pin == ["t0"]


def test_bad_input_pinned_task_missing_from_the_bank_fails_at_start(tiny_llama, tokenizer, bank):
    with pytest.raises(ConfigError, match=r"--pin: task 'nope' is not in the bank"):
        tiered(tiny_llama, tokenizer, bank, pin=["t0", "nope"])
    with pytest.raises(ConfigError, match="--pin needs a bank"):
        Engine((tiny_llama, tokenizer), None, tiers=TierConfig(pin=["t0"]))


def test_bad_input_tier_flags_fail_before_the_model_loads(monkeypatch, capsys):
    parse = build_parser().parse_args
    given = parse(["serve", "--bank", "b", "--max-loaded-tasks", "8", "--pin", "t0,t1"])
    assert from_args(TierConfig, given) == TierConfig(max_loaded_tasks=8, pin=["t0", "t1"])
    assert from_args(TierConfig, parse(["serve", "--bank", "b"])) == TierConfig()
    calls = []
    monkeypatch.setattr("softprompt.api.app.serve", lambda *a, **kw: calls.append(kw))
    assert main(["serve", "--bank", "b", "--max-loaded-tasks", "4", "--pin", "t0"]) == 0
    assert calls[0]["tiers"] == TierConfig(max_loaded_tasks=4, pin=["t0"])
    bad = [
        (["--max-loaded-tasks", "0"], "--max-loaded-tasks must be an integer >= 1"),
        (["--max-loaded-tasks", "1", "--pin", "t0,t1"], "--pin names 2 tasks"),
        (
            ["--max-loaded-tasks", "2", "--max-resident-tasks", "5"],
            "--max-resident-tasks (5) exceeds",
        ),
    ]
    for flags, message in bad:
        assert main(["serve", "--bank", "b", *flags]) == 2
        assert f"error: {message}" in capsys.readouterr().err
    assert len(calls) == 1  # the bad values never reached serve()


def test_bad_input_tier_flags_with_the_vllm_backend_are_refused(tmp_path):
    from softprompt.api.app import serve

    with pytest.raises(ConfigError, match="apply to --backend builtin only"):
        serve("default", str(tmp_path), backend="vllm", tiers=TierConfig(max_loaded_tasks=4))


# ---------------------------------------------------------------- a bank that changes under load


def test_bad_input_task_deleted_by_another_replica_is_unknown_for_new_requests_only(
    tiny_llama, tokenizer, bank
):
    expected = Engine((tiny_llama, tokenizer), bank).generate([greedy(TEXTS[0], "t0", 4)])
    engine = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=2)
    waiting = engine.prepare_all([greedy(TEXTS[0], "t0", 4)])
    PromptBank(bank.root).delete("t0")  # another replica
    with pytest.raises(UnknownTaskError, match="unknown task 't0'"):
        engine.generate([greedy(TEXTS[0], "t0", 4)])
    assert outputs(engine.run(waiting)) == outputs(expected)  # the request it had goes on
    assert "t0" not in loaded(engine)


def test_bad_input_task_deleted_between_version_and_read_is_unknown(
    tiny_llama, tokenizer, bank, monkeypatch
):
    engine = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=2)
    read = engine.registry.bank.load

    def deleted_first(name):
        PromptBank(bank.root).delete(name)  # another replica, after the version was read
        return read(name)

    monkeypatch.setattr(engine.registry.bank, "load", deleted_first)
    with pytest.raises(UnknownTaskError, match="unknown task 't1'"):
        engine.classify("t1", TEXTS[:1])
    assert loaded(engine) == [] and engine.registry.stats()["in_use"] == 0


def test_bad_input_tasks_removed_under_http_load_are_404_never_5xx(tiny_llama, tokenizer, bank):
    from softprompt.api.app import create_app

    engine = tiered(tiny_llama, tokenizer, bank, max_loaded_tasks=2, max_resident_tasks=1)
    app = create_app(engine)
    with running(app) as url, ThreadPoolExecutor(4) as pool:

        def classify(i: int) -> httpx.Response:
            body = {"model": NAMES[i % 4], "input": TEXTS[i % 5]}
            return httpx.post(f"{url}/v1/classify", json=body, timeout=60)

        first = list(pool.map(classify, range(8)))
        later = [pool.submit(classify, i) for i in range(8, 40)]
        for name in ("t1", "t3"):
            PromptBank(bank.root).delete(name)  # another replica, while requests run
        statuses = [r.status_code for r in first] + [f.result().status_code for f in later]
        assert set(statuses) <= {200, 404} and statuses[:8] == [200] * 8
        for i in range(4):  # once deleted: 404 for those tasks, the others still serve
            assert classify(i).status_code == (404 if NAMES[i] in ("t1", "t3") else 200)
        health = httpx.get(f"{url}/health").json()
    memory = health["task_memory"]
    assert memory["loaded"] <= 2 and memory["resident"] <= 1 and memory["in_use"] == 0
    assert memory["misses"] >= 4 and memory["evictions"] >= 2 and memory["hits"] >= 1
    assert memory["load_seconds_mean"] > 0
