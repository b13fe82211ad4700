"""The continuous batcher: rows join a running batch and leave it at once, outputs equal each
request alone (greedy and seeded sampling; soft, deep and plain rows; prefix cache on and off),
fair turns, cancellation, a bounded queue; on a tiny random Llama with a temporary bank."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from softprompt.api.tenants import add_tenant
from softprompt.errors import ConfigError, OverloadedError, UnknownTaskError
from softprompt.prompting import inject
from softprompt.serving.engine import ClassifyRequest, Engine, GenerationRequest
from softprompt.serving.scheduler import BatchScheduler, SchedulerConfig

from ..conftest import build_tiny_model
from .serving_fixtures import (
    TASKS,
    TEXTS,
    VERBALIZER,
    build_full_tokenizer,
    fill_bank,
    greedy,
    outputs,
    served_bank,
)

KINDS = ["deep-task", "soft-task", *TASKS, None]  # a deep prompt, soft prompts and the base model


@pytest.fixture
def engine(tiny_llama, tmp_path, request):
    tokenizer = build_full_tokenizer()
    _, bank = served_bank(tiny_llama, tokenizer, tmp_path / "bank")
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


def fail_picks_of(monkeypatch, failing, after: int = 0) -> None:
    """From its pick number `after` on, picking fails for the row whose sampling settings are
    `failing(settings)` (as a sampler raises on a value it mishandles): the rows before it in its
    batch sample first, so their generators have moved; batches without it pick as before."""
    real, picks = inject.TokenPicker.__call__, []

    def picking(picker, logits):
        at = next((i for i, s in enumerate(picker.sampling) if failing(s)), None)
        if at is not None:
            picks.append(at)
            if len(picks) > after:
                if at:
                    real(picker.select(list(range(at))), logits[:at])
                raise RuntimeError("this row's sampling failed")
        return real(picker, logits)

    monkeypatch.setattr(inject.TokenPicker, "__call__", picking)


def fail_forwards_from(model, position: int) -> list[bool]:
    """Arm (set `[0] = True`) a failure of every one-token forward over a row at `position` or
    beyond, in the model's second layer: the first layer has already grown the cache."""
    armed = [False]

    def check(_, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
        if armed[0] and hidden.shape[1] == 1 and bool((kwargs["position_ids"] >= position).any()):
            raise RuntimeError("this row's forward failed")

    model.model.layers[1].register_forward_pre_hook(check, with_kwargs=True)
    return armed


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


# ---------------------------------------------------------------- a failing row fails alone


def test_a_row_failing_in_a_step_fails_alone_and_the_running_rows_finish_as_alone(
    engine, make_scheduler, monkeypatch
):
    """Issue 23, item 2: client B runs two greedy generations (8 tokens, ignore_eos); client A's
    request on its own task joins them and its sampling fails: A alone gets the error."""
    tenant_b = [
        GenerationRequest(text, task="t0", max_new_tokens=8, ignore_eos=True) for text in TEXTS[:2]
    ]
    alone = [engine.generate([r])[0] for r in tenant_b]
    bad = engine.prepare(GenerationRequest("fun", task="t1", max_new_tokens=8, temperature=0.7))
    fail_picks_of(monkeypatch, lambda s: s is bad.sampling)
    b_running, a_queued = threading.Event(), threading.Event()

    def hold(_):  # B's first step waits until A's request is queued: A joins B's rows
        b_running.set()
        a_queued.wait(30)

    tenant_b[0].on_text = hold
    scheduler = make_scheduler(max_wait_ms=0)
    b_futures = scheduler.enqueue_all(engine.prepare_all(tenant_b), "tenant B")
    assert b_running.wait(30)
    a_future = scheduler.enqueue(bad, "tenant A")
    a_queued.set()
    with pytest.raises(RuntimeError, match="this row's sampling failed"):
        a_future.result(30)
    assert outputs([f.result(30) for f in b_futures]) == outputs(alone)
    assert scheduler.step_sizes[3] == 1  # A's row really shared (and failed) a step with B's


def test_one_failing_row_of_a_4_row_step_fails_alone_and_the_scheduler_serves_on(
    engine, make_scheduler, monkeypatch
):
    requests = mixed_requests(4)  # rows 0 and 2 sample with their own seeds, before row 3
    alone = [engine.generate([r])[0] for r in requests]
    prepared = engine.prepare_all(requests)
    fail_picks_of(monkeypatch, lambda s: s is prepared[3].sampling, after=2)  # its 3rd token
    scheduler = make_scheduler(max_batch_size=4, max_wait_ms=200)
    futures = scheduler.enqueue_all(prepared, "one client")
    with pytest.raises(RuntimeError, match="this row's sampling failed"):
        futures[3].result(30)
    assert outputs([f.result(30) for f in futures[:3]]) == outputs(alone[:3])
    assert scheduler.step_sizes[4] == 3  # the failing step had all four rows
    later = scheduler.submit_sync(requests[2], timeout=30)
    assert outputs([later]) == outputs([alone[2]])


def test_over_http_a_tenant_whose_request_fails_never_fails_another_tenants_requests(
    engine, tmp_path, monkeypatch
):
    """Issue 23, item 2 against a server with two tenants: B's completion of two prompts (8
    tokens, ignore_eos) runs; A's request on its own task joins and its sampling fails: A gets
    the 500, B gets its texts as each alone."""
    from softprompt.api.app import create_app

    from .serving_fixtures import running

    tenants = {"a": "t1", "b": "t0"}  # each tenant's own task
    keys = {name: add_tenant(tmp_path / "keys.json", name, [t]) for name, t in tenants.items()}
    prompts = TEXTS[:2]
    alone = [
        engine.generate([GenerationRequest(p, task="t0", max_new_tokens=8, ignore_eos=True)])[0]
        for p in prompts
    ]
    fail_picks_of(monkeypatch, lambda s: s.seed == 4242)
    app = create_app(engine, keys=tmp_path / "keys.json")
    real_pick, b_running = inject.TokenPicker.__call__, threading.Event()

    def held(picker, logits):  # B's first step waits until A's request is queued: A joins it
        if not b_running.is_set():
            b_running.set()
            deadline = time.monotonic() + 30
            while app.state.scheduler.queued < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
        return real_pick(picker, logits)

    monkeypatch.setattr(inject.TokenPicker, "__call__", held)
    b_body = {
        "model": "t0",
        "prompt": prompts,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    a_body = {"model": "t1", "prompt": "fun", "max_tokens": 8, "temperature": 0.7, "seed": 4242}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as http:

        def post(body, tenant):
            auth = {"Authorization": f"Bearer {keys[tenant]}"}
            return http.post("/v1/completions", json=body, headers=auth)

        with ThreadPoolExecutor(1) as pool:
            b_response = pool.submit(post, b_body, "b")
            assert b_running.wait(30)
            a_response = post(a_body, "a")
            b_response = b_response.result(30)
    assert a_response.status_code == 500
    assert b_response.status_code == 200
    assert [c["text"] for c in b_response.json()["choices"]] == [r.text for r in alone]
    assert app.state.scheduler.step_sizes[3] == 1  # A's row failed in a step with B's two


@pytest.mark.parametrize("where", ["step", "join"])
def test_a_row_whose_forward_fails_leaves_alone_the_cache_as_it_was(engine, where):
    """The failing forward has grown the first layer's cache before it raised: the rows left
    go on from the cache as it was before (inject.decode cuts it back), each as alone."""
    long_text = " ".join(TEXTS * 3)  # its positions are beyond every other row's
    requests = [greedy("fun", "t0"), greedy(long_text, "t3"), greedy("i love this film", None)]
    joining = [greedy("a boring plot and", "t1", n=6), greedy("the actor is not", "deep-task")]
    alone = [engine.generate([r])[0] for r in [*requests, *joining]]
    armed = fail_forwards_from(engine.model, position=len(engine.prepare(requests[1]).input_ids))
    prepared, later = engine.prepare_all(requests), engine.prepare_all(joining)
    batch = engine.start_generation(prepared)
    results = dict(engine.step(batch))  # the first tokens: read from the prefill, no forward
    armed[0] = True
    new = engine.start_generation(later)
    if where == "join":
        engine.join(batch, new)  # the running rows' forward fails there
    else:
        results.update(engine.step(batch))  # the failing row leaves here
        engine.join(batch, new)
    while batch.rows:
        results.update(engine.step(batch))
    error = results.pop(prepared[1])
    assert isinstance(error, RuntimeError) and "forward failed" in str(error)
    others = [prepared[0], prepared[2], *later]
    assert outputs([results[p] for p in others]) == outputs([alone[0], *alone[2:]])


def test_sliding_window_model_a_row_whose_sampling_fails_leaves_alone(tmp_path, monkeypatch):
    gemma = build_tiny_model("gemma3")
    engine = Engine((gemma, build_full_tokenizer()), tmp_path / "bank")
    requests = [
        GenerationRequest(t, max_new_tokens=6, temperature=0.9, seed=i)
        for i, t in enumerate(TEXTS[:3])
    ]
    alone = [engine.generate([r])[0] for r in requests]
    prepared = engine.prepare_all(requests)
    fail_picks_of(monkeypatch, lambda s: s is prepared[2].sampling, after=1)
    batch, results = engine.start_generation(prepared), {}
    while batch.rows:
        results.update(engine.step(batch))
    assert isinstance(results.pop(prepared[2]), RuntimeError)
    assert outputs([results[p] for p in prepared[:2]]) == outputs(alone[:2])


def test_a_batch_failing_as_a_whole_fails_its_rows_and_the_scheduler_serves_on(
    engine, make_scheduler
):
    """Every row passes alone but not together (as when memory runs out for the batch): the
    failure is the batch's, so every row of it fails; a later request runs."""

    def check(_, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
        if hidden.shape[0] > 1 and hidden.shape[1] == 1:
            raise RuntimeError("out of memory")

    engine.model.model.layers[1].register_forward_pre_hook(check, with_kwargs=True)
    scheduler = make_scheduler(max_wait_ms=200)
    futures = scheduler.enqueue_all(engine.prepare_all([greedy(t, "t0") for t in TEXTS[:3]]))
    for future in futures:
        with pytest.raises(RuntimeError, match="out of memory"):
            future.result(30)
    assert scheduler.step_sizes == {3: 1}  # the first step reads the prefill's logits
    assert scheduler.submit_sync(greedy("fun", "t1", n=2), timeout=30).token_ids
