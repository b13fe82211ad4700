"""The continuous batcher: rows join a running batch and leave it at once, outputs equal each
request alone (greedy and seeded sampling; soft, deep and plain rows; prefix cache on and off),
fair turns, cancellation, a bounded queue; on a tiny random Llama with a temporary bank."""

from __future__ import annotations

import asyncio
import threading

import pytest

from softprompt.engine import ClassifyRequest, Engine, GenerationRequest
from softprompt.errors import ConfigError, OverloadedError, UnknownTaskError
from softprompt.scheduler import BatchScheduler, SchedulerConfig

from ..conftest import build_tiny_model
from .test_deep_prompt import _served_bank
from .test_engine import TASKS, TEXTS, VERBALIZER, build_full_tokenizer, fill_bank, greedy, outputs

KINDS = ["deep-task", "soft-task", *TASKS, None]  # a deep prompt, soft prompts and the base model


@pytest.fixture
def engine(tiny_llama, tmp_path, request):
    tokenizer = build_full_tokenizer()
    _, bank = _served_bank(tiny_llama, tokenizer, tmp_path / "bank")
    fill_bank(bank, tiny_llama)
    return Engine((tiny_llama, tokenizer), bank, use_prefix_cache=getattr(request, "param", True))


@pytest.fixture
def make_scheduler(engine):
    """BatchSchedulers over `engine`, closed at teardown even when the test fails."""
    made = []

    def make(**kwargs):
        made.append(BatchScheduler(engine, **kwargs))
        return made[-1]

    yield make
    for scheduler in made:
        scheduler.close()


def mixed_requests(count: int, n=lambda i: 3 + 2 * (i % 4)):
    """Greedy and seeded sampled rows over every prompt kind, of different lengths."""
    return [
        GenerationRequest(
            TEXTS[i % len(TEXTS)],
            task=KINDS[i % len(KINDS)],
            max_new_tokens=n(i),
            temperature=0.0 if i % 2 else 1.1,
            top_p=1.0 if i % 3 else 0.9,
            seed=100 + i,
        )
        for i in range(count)
    ]


def started(request: GenerationRequest) -> threading.Event:
    """An event set when `request` streams its first text (it is running)."""
    event = threading.Event()
    request.on_text = lambda _: event.set()
    return event


# ---------------------------------------------------------------- the engine's steps


@pytest.mark.parametrize(
    "engine", [True, False], indirect=True, ids=["prefix-cache", "no-prefix-cache"]
)
def test_rows_joining_mid_generation_leave_every_row_as_it_is_alone(engine):
    requests = mixed_requests(12)
    alone = [engine.generate([r])[0] for r in requests]
    batch = engine.start_generation(engine.prepare_all(requests[:4]))
    results = {}
    for group in (requests[4:7], requests[7:12]):
        for _ in range(2):  # the running rows are two tokens in (some have ended)
            results.update((id(p.request), r) for p, r in engine.step(batch))
        engine.join(batch, engine.start_generation(engine.prepare_all(group)))
    while batch.rows:
        results.update((id(p.request), r) for p, r in engine.step(batch))
    assert outputs([results[id(r)] for r in requests]) == outputs(alone)
    assert len({tuple(r.token_ids) for r in alone}) >= 8  # the rows really differ


def test_a_finished_row_leaves_at_once_and_unused_columns_go(engine):
    long, short = greedy("the movie was", "t0", n=30), greedy("fun", "t1", n=2)
    batch = engine.start_generation(engine.prepare_all([long, short]))
    width = batch.state.mask.shape[1]
    assert engine.step(batch) == [] and len(batch.rows) == 2
    [(prepared, result)] = engine.step(batch)
    assert prepared.request is short and len(result.token_ids) == 2
    assert len(batch.rows) == 1 and batch.state.mask.shape[0] == 1
    assert bool(batch.state.mask[0, 0])  # the short row's extra prefix columns were trimmed
    assert batch.state.mask.shape[1] <= width + 1


def test_sliding_window_model_never_merges_caches(tmp_path):
    gemma = build_tiny_model("gemma3")
    engine = Engine((gemma, build_full_tokenizer()), tmp_path / "bank")
    assert not engine.can_join
    scheduler = BatchScheduler(engine)
    try:
        assert not scheduler.join_running  # rows wait for the running batch: exact, never merged
        assert scheduler.submit_sync(greedy("fun", None, n=3), timeout=30).token_ids
    finally:
        scheduler.close()


# ---------------------------------------------------------------- the scheduler


def test_short_request_arriving_during_a_long_generation_finishes_first(engine, make_scheduler):
    long, short = (
        greedy("the movie was", "t0", n=200),
        GenerationRequest("fun", task="t1", max_new_tokens=8),
    )
    long_alone, short_alone = engine.generate([long])[0], engine.generate([short])[0]
    assert len(long_alone.token_ids) == 200  # no early end-of-sequence: it really is long
    scheduler = make_scheduler(max_wait_ms=0)
    running = started(long)
    long_future = scheduler.enqueue(engine.prepare(long))
    assert running.wait(30)
    short_future = scheduler.enqueue(engine.prepare(short))
    assert outputs([short_future.result(30)]) == outputs([short_alone])
    assert not long_future.done()  # the short one did not wait for the long one
    assert outputs([long_future.result(60)]) == outputs([long_alone])
    assert scheduler.step_sizes[2] >= 1  # they shared decode steps


def test_static_setting_makes_a_short_request_wait_for_the_running_batch(engine, make_scheduler):
    long, short = greedy("the movie was", "t0", n=40), greedy("fun", "t1", n=2)
    scheduler = make_scheduler(max_wait_ms=0, join_running=False)
    running = started(long)
    long_future = scheduler.enqueue(engine.prepare(long))
    assert running.wait(30)
    short_future = scheduler.enqueue(engine.prepare(short))
    short_future.result(30)
    assert long_future.done()  # static: the running batch ended first
    assert scheduler.largest_batch == 1


@pytest.mark.parametrize(
    "engine", [True, False], indirect=True, ids=["prefix-cache", "no-prefix-cache"]
)
def test_requests_arriving_in_waves_equal_each_alone(engine, make_scheduler):
    requests = mixed_requests(18)
    alone = [engine.generate([r])[0] for r in requests]
    scheduler = make_scheduler(max_batch_size=8, max_wait_ms=0)
    futures = []
    for wave in (requests[:6], requests[6:12], requests[12:]):
        running = started(wave[-1])
        futures += [scheduler.enqueue(p) for p in engine.prepare_all(wave)]
        running.wait(30)  # the next wave arrives while this one generates
    assert outputs([f.result(60) for f in futures]) == outputs(alone)
    assert scheduler.largest_batch > 6  # a wave joined a running batch


def test_classify_runs_between_decode_steps_of_a_long_generation(engine, make_scheduler):
    long = greedy("the movie was", "t0", n=200)
    expected = engine.classify("t1", TEXTS[:2])
    scheduler = make_scheduler(max_wait_ms=0)
    running = started(long)
    long_future = scheduler.enqueue(engine.prepare(long))
    assert running.wait(30)
    result = scheduler.enqueue(engine.prepare(ClassifyRequest("t1", TEXTS[:2]))).result(30)
    assert not long_future.done()
    assert [r.label for r in result] == [r.label for r in expected]
    assert [r.probabilities for r in result] == [
        pytest.approx(r.probabilities, abs=1e-5) for r in expected
    ]
    long_future.result(60)


def test_a_cancelled_row_leaves_mid_batch_and_the_others_are_untouched(engine, make_scheduler):
    gone, staying = greedy("the movie was", "t0", n=200), greedy("fun", "t1", n=60)
    staying_alone = engine.generate([staying])[0]
    scheduler = make_scheduler(max_wait_ms=50)
    running = started(gone)
    prepared = engine.prepare_all([gone, staying])
    futures = [scheduler.enqueue(p) for p in prepared]
    assert running.wait(30)
    prepared[0].cancelled = True  # what the server does when the client goes away
    assert len(futures[0].result(30).token_ids) < 200
    assert outputs([futures[1].result(30)]) == outputs([staying_alone])


def test_a_full_queue_refuses_with_overloaded_and_frees_up(engine, make_scheduler, monkeypatch):
    release, real_start = threading.Event(), engine.start_generation

    def held(rows):
        release.wait(30)  # the worker is busy: later arrivals wait in the queue
        return real_start(rows)

    monkeypatch.setattr(engine, "start_generation", held)
    scheduler = make_scheduler(max_queue=2, max_wait_ms=0)
    first = scheduler.enqueue(engine.prepare(greedy("fun", "t0", n=2)))
    while scheduler.queued:  # the first one started (and is held)
        pass
    waiting = scheduler.enqueue_all(engine.prepare_all([greedy("fun", "t1", n=2)] * 2))
    with pytest.raises(OverloadedError, match="at most 2"):
        scheduler.enqueue(engine.prepare(greedy("fun", "t2", n=2)))
    release.set()
    assert all(f.result(30).token_ids for f in [first, *waiting])
    assert scheduler.queued == 0
    assert scheduler.submit_sync(greedy("fun", "t2", n=2), timeout=30).token_ids


def test_scheduler_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="--max-queue"):
        SchedulerConfig(max_queue=0)
    with pytest.raises(ConfigError, match="--max-wait-ms"):
        SchedulerConfig(max_wait_ms=-1)


# ---------------------------------------------------------------- fairness and failures


def test_scheduler_gathers_concurrent_requests_and_a_bad_one_fails_alone(engine, make_scheduler):
    requests = [greedy(TEXTS[i % 5], [*TASKS, None][i % 5]) for i in range(10)]
    alone = [engine.generate([r])[0] for r in requests]
    scheduler = make_scheduler(max_batch_size=16, max_wait_ms=50)
    results: dict = {}

    def call(i, request):
        try:
            results[i] = scheduler.submit_sync(request, timeout=30)
        except Exception as exc:
            results[i] = exc

    bad = GenerationRequest("the", task="no-such-task")
    threads = [threading.Thread(target=call, args=(i, r)) for i, r in enumerate([*requests, bad])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outputs([results[i] for i in range(10)]) == outputs(alone)
    assert isinstance(results[10], UnknownTaskError)
    assert scheduler.largest_batch > 1


def test_scheduler_retries_rows_one_by_one_when_a_prefill_raises(
    engine, make_scheduler, monkeypatch
):
    real_start = engine.start_generation

    def fragile_start(prepared):
        if any(p.request.prompt == "boom" for p in prepared):
            raise RuntimeError("boom")
        return real_start(prepared)

    monkeypatch.setattr(engine, "start_generation", fragile_start)
    scheduler = make_scheduler(max_batch_size=8, max_wait_ms=200)
    futures = [
        scheduler.enqueue(engine.prepare(greedy(p, "t0"))) for p in ("fun", "boom", "the movie")
    ]
    futures.append(scheduler.enqueue(engine.prepare(ClassifyRequest("t1", ["fun"]))))
    assert futures[0].result(30).token_ids and futures[2].result(30).token_ids
    assert futures[3].result(30)[0].label in VERBALIZER["labels"]
    with pytest.raises(RuntimeError, match="boom"):
        futures[1].result(30)


def test_scheduler_submit_is_awaitable(engine, make_scheduler):
    scheduler = make_scheduler(max_wait_ms=20)

    async def main():
        return await asyncio.gather(
            *(scheduler.submit(greedy(t, "t0")) for t in TEXTS), return_exceptions=True
        )

    results = asyncio.run(main())
    assert outputs(results) == outputs(engine.generate([greedy(t, "t0") for t in TEXTS]))


def test_a_later_request_gets_a_turn_before_a_large_one_ends(engine, make_scheduler, monkeypatch):
    batches, first_running, release = [], threading.Event(), threading.Event()
    real_start = engine.start_generation

    def recording_start(prepared):
        batches.append([p.request.prompt for p in prepared])
        first_running.set()
        release.wait(10)  # hold the first prefill until the small request has arrived
        return real_start(prepared)

    monkeypatch.setattr(engine, "start_generation", recording_start)
    scheduler = make_scheduler(max_batch_size=2, max_wait_ms=0)
    large = object()  # one client request of 6 prompts
    futures = scheduler.enqueue_all(
        engine.prepare_all([greedy("the movie was", "t0", n=2)] * 6), large
    )
    assert first_running.wait(10)
    small = scheduler.enqueue(engine.prepare(greedy("fun", "t1", n=2)))
    release.set()
    assert small.result(30).token_ids and all(f.result(30).token_ids for f in futures)
    assert set(batches[0]) == {"the movie was"} and "fun" in batches[1], (
        batches
    )  # not after all of them
    assert sum(len(b) for b in batches) == 7
