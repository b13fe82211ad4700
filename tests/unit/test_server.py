"""HTTP server: uvicorn on 127.0.0.1 (a free port, a background thread) over a tiny model, driven by
the official `openai` client unchanged and by plain httpx. Loopback only."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch

from softprompt.bank import PromptBank
from softprompt.serving.engine import Engine, GenerationRequest
from softprompt.serving.scheduler import SchedulerConfig

from ..conftest import build_tiny_model
from .serving_fixtures import (
    ADMIN,
    API_KEY,
    CHAT_TEMPLATE,
    TASKS,
    TEMPLATE,
    TEXTS,
    VERBALIZER,
    assert_error,
    build_full_tokenizer,
    fill_bank,
    random_prompt,
    running,
    save_task,
    upload_files,
)

openai = pytest.importorskip("openai")

MAX_BODY = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):

    from softprompt.api.app import RequestLimits, create_app

    model, tokenizer = build_tiny_model("llama"), build_full_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    bank = PromptBank(tmp_path_factory.mktemp("bank"))
    fill_bank(bank, model)
    engine = Engine((model, tokenizer), bank)
    app = create_app(
        engine,
        api_key=API_KEY,
        scheduling=SchedulerConfig(max_batch_size=16, max_wait_ms=5),
        limits=RequestLimits(max_body_bytes=MAX_BODY),
    )
    with running(app) as url:
        yield SimpleNamespace(
            url=url,
            engine=engine,
            bank=bank,
            model=model,
            app=app,
            client=openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=30),
            http=httpx.Client(base_url=url, timeout=30),
        )


def alone(server, prompt, task, n=8, **kwargs):
    """What the engine returns for this request on its own (greedy unless told otherwise)."""
    return server.engine.generate(
        [GenerationRequest(prompt, task=task, max_new_tokens=n, **kwargs)]
    )[0]


# ---------------------------------------------------------------- the official client


def test_openai_client_lists_base_model_and_every_task(server):
    ids = [m.id for m in server.client.models.list().data]
    assert ids[0] == server.engine.base_model_id
    assert set(TASKS) <= set(ids[1:])
    assert server.http.get("/health").json()["status"] == "ok"


def test_openai_client_completion_equals_engine_greedy(server):
    response = server.client.completions.create(
        model="t1", prompt=TEXTS[0], max_tokens=8, temperature=0
    )
    expected = alone(server, TEXTS[0], "t1")
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (3, 8)
    assert response.usage.total_tokens == 11
    other = server.client.completions.create(
        model="t3", prompt=TEXTS[0], max_tokens=8, temperature=0
    )
    assert other.choices[0].text != response.choices[0].text


def test_openai_client_chat_applies_chat_template_and_task_prompt(server):
    messages = [{"role": "user", "content": "the movie was fun"}]
    response = server.client.chat.completions.create(
        model="t2", messages=messages, max_tokens=6, temperature=0
    )
    ids = server.engine.chat_prompt(messages)
    assert (
        ids
        == server.engine.tokenizer("user : the movie was fun . review :", add_special_tokens=False)[
            "input_ids"
        ]
    )
    expected = alone(server, ids, "t2", n=6)
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == 6


def test_openai_client_streaming_completion_joins_to_the_full_text(server):
    stream = server.client.completions.create(
        model="t0", prompt=TEXTS[2], max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    expected = alone(server, TEXTS[2], "t0", n=10)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_streaming_chat_with_stop_and_usage(server):
    messages = [
        {"role": "system", "content": "classify"},
        {"role": "user", "content": "a boring plot"},
    ]
    ids = server.engine.chat_prompt(messages)
    full = alone(server, ids, "t3", n=12)
    stop = full.text.split(" ")[4]
    stream = server.client.chat.completions.create(
        model="t3",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stop=[stop],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.text[: full.text.find(stop)]
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["stop"]
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_seeded_sampling_over_http_is_reproducible(server):
    def sample():
        return (
            server.client.completions.create(
                model="t1", prompt=TEXTS[3], max_tokens=10, temperature=1.3, seed=123
            )
            .choices[0]
            .text
        )

    assert (
        sample() == sample() == alone(server, TEXTS[3], "t1", n=10, temperature=1.3, seed=123).text
    )


# ---------------------------------------------------------------- concurrency and load


def test_32_concurrent_requests_over_4_tasks_equal_each_alone_and_are_batched(server):
    jobs = [(TEXTS[i % 5], list(TASKS)[i % 4], 4 + i % 5) for i in range(32)]
    expected = [alone(server, text, task, n).text for text, task, n in jobs]
    steps_before = server.app.state.scheduler.step_sizes.copy()

    def call(job):
        text, task, n = job
        return (
            server.client.completions.create(model=task, prompt=text, max_tokens=n, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(call, jobs))
    assert got == expected
    steps = (
        server.app.state.scheduler.step_sizes - steps_before
    )  # decode steps run, by rows in them
    assert max(steps) >= 4, steps  # requests really generated together, not one after another
    assert (
        sum(n * k for n, k in steps.items() if n > 1) > sum(n * k for n, k in steps.items()) / 2
    ), steps


def test_bad_requests_never_disturb_concurrent_good_ones(server):
    good = [(TEXTS[i % 5], list(TASKS)[i % 4]) for i in range(12)]
    expected = [alone(server, text, task).text for text, task in good]
    bad = [
        {"model": "no-such-task", "prompt": "the"},
        {"model": "t0", "prompt": " ".join(["the"] * 300)},
        {"model": "t0", "prompt": "the", "n": 3},
        {"model": "Bad/Name", "prompt": "the"},
    ]

    def call(body):
        return server.http.post("/v1/completions", json={"max_tokens": 8, "temperature": 0, **body})

    bodies = [{"model": t, "prompt": p} for p, t in good] + bad
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, bodies))
    assert [r.json()["choices"][0]["text"] for r in responses[:12]] == expected
    assert [r.status_code for r in responses[12:]] == [404, 400, 422, 400]


def test_bounded_load_200_requests_8_threads_zero_failures(server):
    count, threads, cap_s = 200, 8, 60.0
    deadline = time.monotonic() + cap_s
    tasks = [*TASKS, server.engine.base_model_id]

    def worker(k):
        failures, done = 0, 0
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in range(k, count, threads):
                if time.monotonic() > deadline:
                    break
                body = {
                    "model": tasks[i % 5],
                    "prompt": TEXTS[i % 5],
                    "max_tokens": 4,
                    "temperature": 0,
                }
                if i % 4 == 3:
                    r = client.post(
                        "/v1/classify", json={"model": tasks[i % 4], "input": [TEXTS[i % 5]]}
                    )
                else:
                    r = client.post("/v1/completions", json=body)
                failures += r.status_code != 200
                done += 1
        return failures, done

    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, range(threads)))
    elapsed = time.monotonic() - start
    assert sum(f for f, _ in results) == 0
    assert sum(d for _, d in results) == count, (
        f"only {sum(d for _, d in results)} done in {elapsed:.1f}s"
    )


# ---------------------------------------------------------------- classification


def test_classify_route_returns_labels_and_probabilities(server):
    response = server.http.post("/v1/classify", json={"model": "t2", "input": TEXTS[:3]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    expected = server.engine.classify("t2", TEXTS[:3])
    for row, result in zip(body["data"], expected, strict=True):
        assert row["label"] == result.label
        assert set(row["probabilities"]) == set(VERBALIZER["labels"])
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)


# ---------------------------------------------------------------- admin: upload and delete


def test_upload_then_immediate_use_then_delete_then_404(server):
    values = random_prompt(3, seed=42)
    files = upload_files(
        values, meta={"verbalizer": VERBALIZER, "template": "{text} :"}, model=server.model
    )
    response = server.http.put("/v1/prompts/uploaded", files=files, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["num_virtual_tokens"] == 3
    assert torch.equal(
        server.bank.load("uploaded").embeddings, values
    )  # byte-exact through multipart
    body = {"model": "uploaded", "prompt": TEXTS[1], "max_tokens": 8, "temperature": 0}
    served = server.http.post("/v1/completions", json=body)
    assert served.status_code == 200
    reference = Engine((server.model, server.engine.tokenizer), None)
    reference.add_task("uploaded", values)
    expected = reference.generate([GenerationRequest(TEXTS[1], task="uploaded", max_new_tokens=8)])[
        0
    ]
    assert served.json()["choices"][0]["text"] == expected.text
    assert (
        server.http.post("/v1/classify", json={"model": "uploaded", "input": "fun"}).status_code
        == 200
    )
    assert "uploaded" in server.bank.names()
    deleted = server.http.delete("/v1/prompts/uploaded", headers=ADMIN)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert_error(
        server.http.post("/v1/completions", json=body),
        404,
        "unknown task 'uploaded'",
        "model_not_found",
    )
    assert_error(server.http.delete("/v1/prompts/uploaded", headers=ADMIN), 404, "unknown task")


def test_upload_of_a_generation_task_as_softprompt_train_saves_it_serves(server):
    meta = {
        "verbalizer": None,
        "template": "q : {question} a :",
    }  # what `train --target-column` writes
    files = upload_files(random_prompt(3, seed=43), meta=meta, model=server.model)
    response = server.http.put("/v1/prompts/free-form", files=files, headers=ADMIN)
    try:
        assert response.status_code == 200, response.text
        served = server.http.post(
            "/v1/completions", json={"model": "free-form", "prompt": "fun", "max_tokens": 3}
        )
        assert served.status_code == 200, served.text
        assert_error(
            server.http.post("/v1/classify", json={"model": "free-form", "input": "fun"}),
            400,
            "no verbalizer",
            "no_verbalizer",
        )
    finally:
        server.http.delete("/v1/prompts/free-form", headers=ADMIN)


def test_upload_of_a_peft_folder_without_our_metadata_serves(server):
    files = upload_files(random_prompt(2, seed=43))  # what PEFT's save_pretrained writes
    assert server.http.put("/v1/prompts/from-peft", files=files, headers=ADMIN).status_code == 200
    assert (
        server.client.completions.create(model="from-peft", prompt="fun", max_tokens=3)
        .choices[0]
        .text
        is not None
    )
    server.http.delete("/v1/prompts/from-peft", headers=ADMIN)


def test_another_replica_saving_to_the_bank_is_served_on_the_next_request(server):
    save_task(server.bank, "replica-made", random_prompt(4, seed=44), server.model)
    assert "replica-made" in [m.id for m in server.client.models.list().data]
    response = server.client.completions.create(
        model="replica-made", prompt="fun", max_tokens=4, temperature=0
    )
    assert response.choices[0].text == alone(server, "fun", "replica-made", n=4).text
    server.bank.delete("replica-made")
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="replica-made", prompt="fun", max_tokens=4)


# ---------------------------------------------------------------- errors, each in OpenAI's shape


def test_error_unknown_task_is_404(server):
    response = server.http.post(
        "/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "fun"}]},
    )
    assert_error(response, 404, "unknown task 'nope'", "model_not_found")
    assert response.json()["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="the")


def test_error_bad_body_is_422_in_openai_shape(server):
    assert_error(
        server.http.post("/v1/completions", json={"model": "t0"}), 422, "prompt: Field required"
    )
    assert_error(
        server.http.post("/v1/completions", json={"model": "t0", "prompt": "a", "n": 2}),
        422,
        "only n=1 is supported",
    )
    assert_error(
        server.http.post("/v1/completions", json={"model": "t0", "prompt": "a", "temperature": 9}),
        422,
        "temperature",
    )
    assert_error(
        server.http.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        ),
        422,
        "JSON decode error",
    )
    assert_error(
        server.http.post("/v1/classify", json={"model": "t0", "input": [1, 2]}), 422, "input"
    )


def test_error_uploaded_prompt_of_wrong_shape_or_non_finite_is_422(server):
    wrong_rows = server.http.put(
        "/v1/prompts/shape", files=upload_files(random_prompt(4, 1), n=3), headers=ADMIN
    )
    assert_error(wrong_rows, 422, "has 4 rows but num_virtual_tokens", "invalid_prompt")
    wrong_dim = server.http.put(
        "/v1/prompts/dim", files=upload_files(torch.randn(3, 16)), headers=ADMIN
    )
    assert_error(wrong_dim, 422, "hidden size 16 but the model has 32", "invalid_prompt")
    nan = server.http.put(
        "/v1/prompts/nan", files=upload_files(torch.full((2, 32), float("nan"))), headers=ADMIN
    )
    assert_error(nan, 422, "NaN", "invalid_prompt")
    missing = server.http.put(
        "/v1/prompts/half",
        files={"adapter_config.json": ("adapter_config.json", b"{}")},
        headers=ADMIN,
    )
    assert_error(missing, 422, "lacks adapter_model.safetensors")
    assert not {"shape", "dim", "nan", "half"} & set(server.bank.names())


def test_error_body_too_large_is_413_by_header_and_by_bytes(server):
    big = {"model": "t0", "prompt": "the " * (MAX_BODY // 3)}
    assert_error(
        server.http.post("/v1/completions", json=big),
        413,
        f"limit of {MAX_BODY} bytes",
        "request_too_large",
    )
    chunked = server.http.post(
        "/v1/completions",
        content=iter([json.dumps(big).encode()]),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in chunked.request.headers
    assert_error(chunked, 413, "larger than the server's limit")


def test_error_input_longer_than_context_is_400(server):
    response = server.http.post(
        "/v1/completions", json={"model": "t0", "prompt": " ".join(["the"] * 300)}
    )
    assert_error(response, 400, "maximum context length is 256", "context_length_exceeded")


def test_error_missing_or_wrong_key_is_401(server):
    files = upload_files(random_prompt(2, 1))
    assert_error(
        server.http.put("/v1/prompts/sneaky", files=files),
        401,
        "missing API key",
        "invalid_api_key",
    )
    wrong = {"Authorization": "Bearer not-the-key"}
    assert_error(
        server.http.put("/v1/prompts/sneaky", files=files, headers=wrong), 401, "invalid API key"
    )
    assert_error(server.http.delete("/v1/prompts/t0", headers=wrong), 401, "invalid API key")
    assert "sneaky" not in server.bank.names() and "t0" in server.bank.names()


def test_error_invalid_task_name_is_400(server):
    files = upload_files(random_prompt(2, 1))
    for name in ("..%2Fescape", "Upper", ".hidden"):
        assert_error(
            server.http.put(f"/v1/prompts/{name}", files=files, headers=ADMIN),
            400,
            "invalid task name",
            "invalid_task_name",
        )
    assert_error(server.http.delete("/v1/prompts/a%2Fb", headers=ADMIN), 400, "invalid task name")


def test_classify_object_input_serves_a_multi_field_template(server):
    template = "title : {title} review : {text} sentiment :"
    save_task(server.bank, "titled", random_prompt(3, seed=45), server.model, template=template)
    try:
        rows = [{"title": "fun", "text": TEXTS[0]}, {"title": "plot", "text": TEXTS[1]}]
        response = server.http.post("/v1/classify", json={"model": "titled", "input": rows})
        assert response.status_code == 200, response.text
        expected = server.engine.classify("titled", rows)
        assert [d["label"] for d in response.json()["data"]] == [r.label for r in expected]
        one = server.http.post("/v1/classify", json={"model": "titled", "input": rows[0]})
        assert one.json()["data"][0]["probabilities"] == pytest.approx(expected[0].probabilities)
        assert_error(
            server.http.post("/v1/classify", json={"model": "titled", "input": TEXTS[0]}),
            422,
            "has fields ['title', 'text']; send an object",
            "invalid_value",
        )
        assert_error(
            server.http.post("/v1/classify", json={"model": "titled", "input": [{"title": "fun"}]}),
            422,
            "input 0: missing field 'text'",
            "invalid_value",
        )
    finally:
        server.bank.delete("titled")


def test_deep_prompt_upload_is_served_over_http_and_listed_with_its_kind(server, tmp_path):
    from softprompt.prompting.deep import DeepPromptModel

    deep = DeepPromptModel(
        server.model, {"deep": random_prompt(3, seed=46)}, tokenizer=server.engine.tokenizer
    )
    folder = deep.save_task(
        "deep", tmp_path / "made", meta={"template": TEMPLATE, "verbalizer": VERBALIZER}
    )
    files = [(f.name, (f.name, f.read_bytes())) for f in sorted(folder.iterdir()) if f.is_file()]
    response = server.http.put("/v1/prompts/deep-up", files=files, headers=ADMIN)
    assert response.status_code == 200, response.text
    try:
        listed = {m["id"]: m for m in server.http.get("/v1/models").json()["data"]}
        assert listed["deep-up"]["kind"] == "deep" and listed["t0"]["kind"] == "soft"
        body = server.http.post(
            "/v1/completions",
            json={"model": "deep-up", "prompt": "fun", "max_tokens": 4, "temperature": 0},
        ).json()
        assert body["choices"][0]["text"] == deep.generate(["fun"], "deep", max_new_tokens=4)[0]
        classify = server.http.post(
            "/v1/classify", json={"model": "deep-up", "input": ["fun", "the plot"]}
        )
        assert classify.status_code == 200, classify.text
    finally:
        server.http.delete("/v1/prompts/deep-up", headers=ADMIN)


def test_error_classify_task_without_verbalizer_is_400(server):
    response = server.http.post(
        "/v1/classify", json={"model": server.engine.base_model_id, "input": ["fun"]}
    )
    assert_error(response, 400, "no verbalizer", "no_verbalizer")


def test_error_unknown_route_and_upload_not_multipart(server):
    assert_error(server.http.get("/v1/nothing"), 404, "Not Found")
    assert_error(
        server.http.put("/v1/prompts/plain", content=b"x", headers=ADMIN),
        422,
        "multipart/form-data",
    )


def test_error_upload_over_the_body_limit_is_413_by_header_and_by_bytes(server):
    files = upload_files(random_prompt(2, 1))
    files["padding.bin"] = ("padding.bin", io.BytesIO(b"x" * MAX_BODY))
    assert_error(
        server.http.put("/v1/prompts/huge", files=files, headers=ADMIN),
        413,
        f"limit of {MAX_BODY} bytes",
        "request_too_large",
    )
    request = httpx.Request("PUT", "http://x", files=files)  # the same multipart body, sent chunked
    chunked = server.http.put(
        "/v1/prompts/huge",
        content=iter([request.read()]),
        headers={**ADMIN, "content-type": request.headers["content-type"]},
    )
    assert "content-length" not in chunked.request.headers
    assert_error(chunked, 413, "larger than the server's limit")
    assert "huge" not in server.bank.names()


def test_error_upload_of_a_form_field_instead_of_a_file_or_malformed_multipart_is_422(server):
    files = upload_files(random_prompt(2, 1))
    del files["adapter_config.json"]
    as_field = server.http.put(
        "/v1/prompts/fields", files=files, data={"adapter_config.json": "{}"}, headers=ADMIN
    )
    assert_error(
        as_field, 422, "send adapter_config.json as a file part (with a filename)", "invalid_upload"
    )
    truncated = (
        b'--b\r\nContent-Disposition: form-data; name="adapter_config.json"; filename="a"\r\n\r\n{}'
    )
    for content_type, message in [
        ("multipart/form-data", "malformed multipart/form-data body: Missing boundary"),
        ("multipart/form-data; boundary=b", "upload of task 'fields' lacks"),
    ]:
        response = server.http.put(
            "/v1/prompts/fields", content=truncated, headers={**ADMIN, "content-type": content_type}
        )
        assert_error(
            response, 422, message
        )  # a part cut off before its closing boundary is not read
    assert "fields" not in server.bank.names()
