"""The vLLM gateway against a fake vLLM HTTP server (tests/unit/fake_vllm.py) on 127.0.0.1.

The fake runs the same tiny Llama the reference engine runs, so the gateway's answers must equal
the built-in engine's; it also records each body, to check the request shape and the exact tensor
bytes, and can fail, stall or go down to check error mapping, timeouts, cancellation and recovery.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from safetensors.torch import load_file

from softprompt.bank import PromptBank
from softprompt.errors import BackendTimeoutError, BackendUnavailableError, ModelLoadError
from softprompt.model.loading import load_front_end, load_model
from softprompt.prompting.deep import DeepPromptModel, rows_to_kv
from softprompt.serving.backends import BuiltinBackend
from softprompt.serving.engine import Engine, GenerationRequest
from softprompt.serving.processor import InputProcessor
from softprompt.serving.vllm.backend import VLLMBackend, encode_embeds
from softprompt.serving.vllm.spool import PrefixSpool

from ..conftest import build_tiny_model
from .fake_vllm import FakeVLLM, decode_embeds
from .serving_fixtures import (
    TASKS,
    TEMPLATE,
    TEXTS,
    VERBALIZER,
    build_full_tokenizer,
    fill_bank,
    free_port,
    running,
    seeded_prompt,
)

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder, a bank of 4 tasks, the fake vLLM, the gateway app and a reference engine."""
    from softprompt.api.app import create_app

    folder = tmp_path_factory.mktemp("tiny-model")
    model, tokenizer = build_tiny_model("llama"), build_full_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bank = PromptBank(tmp_path_factory.mktemp("bank"))
    fill_bank(bank, model)
    fake = FakeVLLM(model, tokenizer)
    fake.start(free_port())
    reference = Engine(load_model(str(folder)), bank)
    backend = VLLMBackend(
        InputProcessor.from_front_end(load_front_end(str(folder)), bank),
        fake.url,
        dtype="float32",
        timeout_s=60,
    )
    with running(create_app(backend)) as url:
        yield SimpleNamespace(
            fake=fake,
            url=url,
            bank=bank,
            folder=folder,
            model=model,
            backend=backend,
            reference=reference,
            http=httpx.Client(base_url=url, timeout=30),
            client=openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30),
        )
    fake.stop()


@pytest.fixture(autouse=True)
def clean_fake(setup):
    setup.fake.failures.clear()
    setup.fake.token_delay_s = 0.0
    yield


def greedy_alone(setup, prompt, task, n=8, **kwargs):
    return setup.reference.generate(
        [GenerationRequest(prompt, task=task, max_new_tokens=n, **kwargs)]
    )[0]


async def run_one(backend, request):
    """One request through a backend's seam, as the server's routes call it."""
    [result] = await backend.run(await backend.prepare_all([request]))
    return result


# ---------------------------------------------------------------- the light model


def test_gateway_holds_only_embeddings_with_the_full_models_fingerprint(setup):
    light = load_front_end(str(setup.folder))
    full = load_model(str(setup.folder))
    assert light.fingerprint == full.fingerprint
    assert torch.equal(light.input_embeddings.weight, full.model.get_input_embeddings().weight)
    assert [n for n, _ in light.input_embeddings.named_parameters()] == ["weight"]
    processor = setup.backend.processor
    assert type(processor) is InputProcessor and not hasattr(processor, "model")  # no layers
    assert processor.prefix_shape == Engine(full).prefix_shape  # the config says what a probe finds


def test_front_end_without_a_local_folder_or_an_embedding_tensor_fails_naming_it(setup, tmp_path):
    with pytest.raises(
        ModelLoadError, match="needs a local model folder.*no-such-org/no-such-model"
    ):
        load_front_end("no-such-org/no-such-model")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (setup.folder / name).exists():
            shutil.copy(setup.folder / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match=f"no input-embedding tensor .* of {tmp_path}"):
        load_front_end(str(tmp_path))  # a config but no safetensors files


# ---------------------------------------------------------------- request shape and bytes


def test_request_shape_and_base64_tensor_bytes_are_prompt_then_token_embeddings(setup):
    before = len(setup.fake.bodies)
    setup.client.completions.create(
        model="t2", prompt=TEXTS[0], max_tokens=3, temperature=0, stop=["xyz"]
    )
    body = setup.fake.bodies[before]
    assert "prompt" not in body and body["model"] == "tiny"  # never `prompt: ""` next to embeddings
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "stop", "ignore_eos")} == {
        "max_tokens": 3,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": ["xyz"],
        "ignore_eos": False,
    }
    setup.client.completions.create(
        model="t2", prompt=TEXTS[0], max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert setup.fake.bodies[-1]["ignore_eos"] is True  # vLLM's own option, passed on
    sent = decode_embeds(body)
    ids = setup.reference.tokenizer(TEXTS[0])["input_ids"]
    prompt = setup.bank.load("t2").embeddings
    expected = torch.cat(
        [prompt, setup.model.get_input_embeddings().weight[ids].detach()]
    )  # (n + L, d)
    assert sent.dtype == torch.float32 and sent.shape == (TASKS["t2"] + len(ids), 32)
    assert torch.equal(sent, expected)


def test_a_tasks_prompt_rows_reach_vllm_as_the_same_bytes_every_time(setup):
    """vLLM's prefix cache hashes the bytes of each full block of prompt embeddings: a task's
    rows must be byte-identical in every request, whatever follows them."""
    before = len(setup.fake.bodies)
    for text in (TEXTS[0], TEXTS[3], TEXTS[0]):
        setup.http.post("/v1/completions", json={"model": "t3", "prompt": text, "max_tokens": 1})
    sent = [decode_embeds(body)[: TASKS["t3"]] for body in setup.fake.bodies[before:]]
    assert len(sent) == 3
    assert len({rows.numpy().tobytes() for rows in sent}) == 1


def test_encoded_embeddings_carry_only_their_rows_not_the_whole_matrix():
    table = torch.randn(5000, 32)
    view = table[10:12]  # a view: torch.save would write all 5000 rows of its storage
    encoded = encode_embeds(view)
    assert len(encoded) < 4000  # 2 x 32 float32 plus torch.save's zip framing, in base64
    assert torch.equal(decode_embeds({"prompt_embeds": encoded}), view)


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1e-300},
        {"temperature": 5e-324, "top_p": 0.5},
        {"temperature": -0.0},
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 1.0, "top_p": 1e-45},
    ],
)
def test_tiny_sampling_values_reach_vllm_as_greedy_and_equal_the_engine(setup, sampling):
    """The gateway sends the engine's normalised settings (inject.Sampling), so vLLM never sees
    a value it would read differently, and the text is the built-in engine's greedy text."""
    body = {"model": "t1", "prompt": TEXTS[0], "max_tokens": 4, **sampling}
    before = len(setup.fake.bodies)
    whole = setup.http.post("/v1/completions", json=body)
    streamed = setup.http.post("/v1/completions", json={**body, "stream": True})
    assert whole.status_code == streamed.status_code == 200, (whole.text, streamed.text)
    assert '"error"' not in streamed.text, streamed.text
    sent = setup.fake.bodies[before:]
    assert [(b["temperature"], b["top_p"]) for b in sent] == [(0.0, 1.0)] * 2
    assert whole.json()["choices"][0]["text"] == greedy_alone(setup, TEXTS[0], "t1", n=4).text


def test_plain_rows_are_sent_as_token_ids(setup):
    before = len(setup.fake.bodies)
    setup.client.completions.create(
        model=setup.reference.base_model_id, prompt=TEXTS[1], max_tokens=2, temperature=0
    )
    body = setup.fake.bodies[before]
    assert (
        "prompt_embeds" not in body
        and body["prompt"] == setup.reference.tokenizer(TEXTS[1])["input_ids"]
    )


def test_bf16_gateway_sends_bf16_rows(setup):
    backend = VLLMBackend(setup.backend.processor, setup.fake.url, dtype="bfloat16", timeout_s=5)

    async def one():
        try:
            return await run_one(backend, GenerationRequest("fun", task="t1", max_new_tokens=1))
        finally:
            await backend.close()

    before = len(setup.fake.bodies)
    asyncio.run(one())
    sent = decode_embeds(setup.fake.bodies[-1])
    assert (
        len(setup.fake.bodies) > before
        and sent.dtype == torch.bfloat16
        and sent.shape == (TASKS["t1"] + 1, 32)
    )


# ---------------------------------------------------------------- answers equal the built-in engine


def test_16_concurrent_requests_over_4_tasks_and_plain_rows_equal_the_engine(setup):
    tasks = [*TASKS, None]
    jobs = [(TEXTS[i % len(TEXTS)], tasks[i % len(tasks)]) for i in range(16)]

    def call(job):
        text, task = job
        return (
            setup.client.completions.create(
                model=task or setup.reference.base_model_id,
                prompt=text,
                max_tokens=6,
                temperature=0,
            )
            .choices[0]
            .text
        )

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, jobs))
    assert got == [greedy_alone(setup, text, task, 6).text for text, task in jobs]
    assert len(set(got)) > 3  # the tasks really differ


def test_chat_with_stop_and_usage_equals_the_engine(setup):
    messages = [{"role": "user", "content": "the movie was"}]
    out = setup.client.chat.completions.create(
        model="t1", messages=messages, max_tokens=6, temperature=0
    )
    ids = setup.reference.chat_prompt(messages)
    expected = greedy_alone(setup, ids, "t1", 6)
    assert out.choices[0].message.content == expected.text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(
        expected.token_ids
    )


def test_streaming_passes_pieces_through_and_joins_to_the_engines_text(setup):
    stream = setup.client.completions.create(
        model="t3",
        prompt=TEXTS[2],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy_alone(setup, TEXTS[2], "t3", 6).text
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # really streamed
    assert chunks[-1].usage.completion_tokens == 6


def test_classify_equals_the_engine_with_single_and_multi_token_targets(setup):
    """VERBALIZER's targets are ' good' (1 token) and ' bad film' (2 tokens)."""
    before = len(setup.fake.bodies)
    got = setup.http.post("/v1/classify", json={"model": "t0", "input": TEXTS[:3]}).json()["data"]
    expected = setup.reference.classify("t0", TEXTS[:3])
    assert [row["label"] for row in got] == [c.label for c in expected]
    for row, ref in zip(got, expected, strict=True):
        assert row["probabilities"] == pytest.approx(ref.probabilities, abs=1e-5)
    asked = setup.fake.bodies[before:]
    assert len(asked) == 3 * 2  # per row: 1 request for the first tokens of both, 1 for 'film'
    assert all(
        b["max_tokens"] == 1 and b["logprob_token_ids"] and b["return_tokens_as_token_ids"]
        for b in asked
    )


# ---------------------------------------------------------------- errors


def test_unknown_task_is_404_and_nothing_reaches_vllm(setup):
    before = len(setup.fake.bodies)
    r = setup.http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(setup.fake.bodies) == before


def test_context_longer_than_vllms_is_the_engines_400(setup):
    r = setup.http.post(
        "/v1/completions", json={"model": "t0", "prompt": "fun " * 150, "max_tokens": 100}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "200 tokens" in r.json()["error"]["message"]  # the fake vLLM's max_model_len, learned


@pytest.mark.parametrize(
    ("status", "message", "http", "code"),
    [
        (
            400,
            "This model's maximum context length is 200 tokens. However...",
            400,
            "context_length_exceeded",
        ),
        (400, "temperature must be >= 0", 422, "invalid_value"),
        (500, "engine core died", 503, "backend_unavailable"),
    ],
)
def test_vllm_errors_map_to_the_engines_errors(setup, status, message, http, code):
    setup.fake.failures.append(
        (status, {"error": {"message": message, "type": "X", "code": status}})
    )
    r = setup.http.post("/v1/completions", json={"model": "t0", "prompt": "fun", "max_tokens": 2})
    assert r.status_code == http and r.json()["error"]["code"] == code
    assert message[:20] in r.json()["error"]["message"]


def test_deep_prompt_is_refused_clearly_by_the_gateway_never_sent_and_served_by_the_builtin_engine(
    setup,
):
    """A gateway before a vLLM it knows nothing of (--vllm-url, no --vllm-prefix-dir) cannot serve
    a deep prompt: it gets a 422 naming the task and why, reaches no vLLM, and is not listed; the
    built-in engine serves the same task."""
    from softprompt.api.app import create_app

    DeepPromptModel(setup.model, {"deep": torch.zeros(2, 32)}).save_task("deep", setup.bank)
    try:
        before = len(setup.fake.bodies)
        body = {"model": "deep", "prompt": "fun", "max_tokens": 2}
        gateway = setup.http.post("/v1/completions", json=body)
        classify = setup.http.post("/v1/classify", json={"model": "deep", "input": "fun"})
        with running(create_app(Engine(load_model(str(setup.folder)), setup.bank))) as url:
            builtin = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert len(setup.fake.bodies) == before
        for r in (gateway, classify):
            error = r.json()["error"]
            assert r.status_code == 422 and (error["type"], error["code"]) == (
                "invalid_request_error",
                "invalid_prompt",
            )
            assert error["message"].startswith(
                "task 'deep' is a deep prompt, which the vLLM backend cannot serve"
            )
        assert builtin.status_code == 200, builtin.text
        listed = {m["id"]: m for m in setup.http.get("/v1/models").json()["data"]}
        assert (
            "deep" not in listed and listed["t0"]["kind"] == "soft"
        )  # /v1/models lists what is served
    finally:
        setup.bank.delete("deep")


# ---------------------------------------------------------------- deep prompts through the connector


@pytest.fixture(scope="module")
def deep(setup, tmp_path_factory):
    """A gateway with a prefix folder, before a fake vLLM playing the deep-prompt connector over
    it, over a bank with soft tasks and a deep one (trained away from its soft init)."""
    from softprompt.api.app import create_app

    bank = PromptBank(tmp_path_factory.mktemp("deep-bank"))
    fill_bank(bank, setup.model)
    deep_model = DeepPromptModel(setup.model, {"deep": seeded_prompt(3, seed=4)})
    with torch.no_grad():
        rows = deep_model.table.get("deep")
        rows.add_(0.3 * torch.randn_like(rows))
    deep_model.save_task("deep", bank, meta={"template": TEMPLATE, "verbalizer": VERBALIZER})
    spool = PrefixSpool(tmp_path_factory.mktemp("prefixes"))
    fake = FakeVLLM(setup.model, build_full_tokenizer(), prefix_dir=spool.folder)
    fake.start(free_port())
    processor = InputProcessor.from_front_end(load_front_end(str(setup.folder)), bank)
    backend = VLLMBackend(processor, fake.url, dtype="float32", timeout_s=60, spool=spool)
    with running(create_app(backend)) as url:
        yield SimpleNamespace(
            fake=fake,
            spool=spool,
            bank=bank,
            backend=backend,
            reference=Engine(load_model(str(setup.folder)), bank),
            http=httpx.Client(base_url=url, timeout=30),
        )
    fake.stop()


def test_deep_prompt_rides_placeholders_and_its_published_prefix_and_equals_the_engine(deep):
    before = len(deep.fake.bodies)
    body = {"model": "deep", "prompt": TEXTS[0], "max_tokens": 6, "temperature": 0}
    answer = deep.http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    [expected] = deep.reference.generate(
        [GenerationRequest(TEXTS[0], task="deep", max_new_tokens=6)]
    )
    assert answer.json()["choices"][0]["text"] == expected.text
    assert answer.json()["usage"]["prompt_tokens"] == expected.prompt_tokens  # no placeholders
    [sent] = deep.fake.bodies[before:]
    [published] = list(deep.spool.folder.glob("*.safetensors"))
    sha = published.stem
    ids = deep.reference.tokenizer(TEXTS[0])["input_ids"]
    assert sent["prompt"] == [0, 0, 0, *ids] and "prompt_embeds" not in sent
    assert sent["kv_transfer_params"] == {"softprompt_deep": {"sha": sha, "task": "deep"}}
    assert sent["cache_salt"] == f"softprompt-deep-{sha}"
    kv = load_file(str(published))["kv"]  # [layers, 2, kv_heads, N, head_dim]
    rows = deep.bank.load("deep").embeddings
    assert torch.equal(kv, rows_to_kv(rows, deep.backend.prefix_shape))
    assert deep.backend.prefix_shape == deep.reference.prefix_shape  # config == probed geometry


def test_deep_soft_and_plain_rows_mixed_concurrently_each_equal_the_engine_alone(deep):
    jobs = [(TEXTS[i % len(TEXTS)], ("deep", "t1", None)[i % 3]) for i in range(9)]

    def call(job):
        text, task = job
        body = {"model": task or deep.reference.base_model_id, "prompt": text, "max_tokens": 5}
        return deep.http.post("/v1/completions", json={**body, "temperature": 0}).json()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(9) as pool:
        got = [a["choices"][0]["text"] for a in pool.map(call, jobs)]
    alone = [
        deep.reference.generate([GenerationRequest(t, task=task, max_new_tokens=5)])[0].text
        for t, task in jobs
    ]
    assert got == alone


def test_deep_prompt_classifies_and_streams_like_the_engine_and_echo_is_refused(deep):
    got = deep.http.post("/v1/classify", json={"model": "deep", "input": TEXTS[:3]}).json()["data"]
    expected = deep.reference.classify("deep", TEXTS[:3])
    for row, ref in zip(got, expected, strict=True):
        assert row["label"] == ref.label
        assert row["probabilities"] == pytest.approx(ref.probabilities, abs=1e-5)
    body = {"model": "deep", "prompt": TEXTS[2], "max_tokens": 5, "temperature": 0}
    with deep.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines)
    [alone] = deep.reference.generate([GenerationRequest(TEXTS[2], task="deep", max_new_tokens=5)])
    assert streamed == alone.text
    sent = len(deep.fake.bodies)
    echo = deep.http.post("/v1/completions", json={**body, "echo": True, "logprobs": 1})
    assert echo.status_code == 422 and echo.json()["error"]["param"] == "echo"
    assert len(deep.fake.bodies) == sent


def test_a_new_deep_version_is_published_as_a_new_file_and_served_at_once(deep):
    body = {"model": "deep2", "prompt": TEXTS[1], "max_tokens": 4, "temperature": 0}
    for seed in (7, 8):
        model = DeepPromptModel(deep.reference.model, {"deep2": seeded_prompt(2, seed=seed)})
        model.save_task("deep2", deep.bank)
        answer = deep.http.post("/v1/completions", json=body)
        [alone] = deep.reference.generate(
            [GenerationRequest(TEXTS[1], task="deep2", max_new_tokens=4)]
        )
        assert answer.json()["choices"][0]["text"] == alone.text
    names = {p.stem for p in deep.spool.folder.glob("*.safetensors")}
    assert len(names) >= 3 and not list(deep.spool.folder.glob(".*tmp*"))  # deep + 2 versions
    deep.bank.delete("deep2")


def test_a_vllm_without_the_connector_is_refused_at_discovery_naming_the_fix(setup, tmp_path):
    """A fake vLLM with no connector answers a request naming a missing prefix: the gateway
    must not serve deep prompts through it (they would run their placeholders as text)."""
    spool = PrefixSpool(tmp_path)
    backend = VLLMBackend(
        setup.backend.processor, setup.fake.url, dtype="float32", timeout_s=5, spool=spool
    )
    with pytest.raises(BackendUnavailableError, match="does not run softprompt's deep-prompt"):
        asyncio.run(backend._ensure_served())


def test_a_prefix_folder_that_cannot_be_written_is_a_backend_error_naming_it(deep, tmp_path):
    folder = tmp_path / "prefixes"
    folder.mkdir()
    spool = PrefixSpool(folder)
    [prepared] = deep.backend.processor.prepare_all([GenerationRequest(TEXTS[0], task="deep")])
    folder.rmdir()  # e.g. an unmounted share: this request fails (503), nothing else does
    with pytest.raises(BackendUnavailableError, match=f"deep prompt for vLLM into {folder}"):
        spool.publish(prepared.task, deep.backend.prefix_shape)


def test_prefix_spool_and_connector_agree_on_the_protocol():
    """The connector runs in vLLM's environment and cannot import softprompt: its constants are
    read from its source and must equal the gateway's."""
    import ast

    from softprompt.serving.vllm import spool

    source = (spool.PLUGIN_DIR / f"{spool.CONNECTOR_MODULE}.py").read_text()
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }
    assert (constants["PARAMS_KEY"], constants["SALT_PREFIX"]) == (
        spool.PARAMS_KEY,
        spool.SALT_PREFIX,
    )
    assert f"class {spool.CONNECTOR}(" in source
    config = spool.kv_transfer_config("/some/dir")
    assert config["kv_connector_extra_config"] == {
        "prefix_dir": "/some/dir",
        "placeholder_id": spool.PLACEHOLDER_ID,
    }


def test_request_limits_hold_on_the_gateway_before_vllm_is_asked(setup):
    """The limits live in the HTTP layer, so the vLLM backend gets them like the built-in one."""
    from softprompt.api.app import RequestLimits, create_app

    backend = VLLMBackend(setup.backend.processor, setup.fake.url, dtype="float32", timeout_s=30)
    with running(
        create_app(
            backend, limits=RequestLimits(max_prompts_per_request=2, max_tokens_per_request=40)
        )
    ) as url:
        before = len(setup.fake.bodies)
        prompts = httpx.post(
            f"{url}/v1/completions", json={"model": "t0", "prompt": ["fun"] * 3}, timeout=30
        )
        tokens = httpx.post(
            f"{url}/v1/completions",
            json={"model": "t0", "prompt": "fun", "max_tokens": 50},
            timeout=30,
        )
        assert len(setup.fake.bodies) == before
        within = httpx.post(
            f"{url}/v1/completions",
            json={"model": "t0", "prompt": ["fun"] * 2, "max_tokens": 2},
            timeout=30,
        )
    assert (
        prompts.status_code == 413
        and "--max-prompts-per-request" in prompts.json()["error"]["message"]
    )
    assert (
        tokens.status_code == 413
        and "--max-tokens-per-request" in tokens.json()["error"]["message"]
    )
    assert within.status_code == 200 and len(setup.fake.bodies) == before + 2


def test_request_timeout_is_504_backend_timeout(setup):
    from softprompt.api.app import classify_error

    backend = VLLMBackend(setup.backend.processor, setup.fake.url, dtype="float32", timeout_s=1)
    setup.fake.token_delay_s = 0.5  # 8 tokens take 4 s: longer than the 1 s timeout

    async def slow():
        try:
            return await run_one(
                backend, GenerationRequest("fun", task="t0", max_new_tokens=8, ignore_eos=True)
            )
        finally:
            await backend.close()

    with pytest.raises(BackendTimeoutError) as caught:
        asyncio.run(slow())
    status, body = classify_error(caught.value)
    assert status == 504 and body["error"]["code"] == "backend_timeout"


# ---------------------------------------------------------------- cancellation


def _cancelled_after(fake, before: int, timeout=10.0) -> list[dict]:
    """Bodies of requests sent after `before` whose client (the gateway) went away."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not [i for i in fake.cancelled if i >= before]:
        time.sleep(0.05)
    return [fake.bodies[i] for i in fake.cancelled if i >= before]


def test_client_disconnect_mid_stream_cancels_the_vllm_request(setup):
    setup.fake.token_delay_s = 0.3
    before = len(setup.fake.bodies)
    with httpx.Client(base_url=setup.url, timeout=30) as client:
        with client.stream(
            "POST",
            "/v1/completions",
            json={
                "model": "t1",
                "prompt": "fun",
                "max_tokens": 30,
                "stream": True,
                "ignore_eos": True,
            },
        ) as r:
            next(r.iter_lines())  # the stream began; now hang up
    cancelled = _cancelled_after(setup.fake, before)
    assert [(b["stream"], b["max_tokens"]) for b in cancelled] == [(True, 30)]


def test_client_disconnect_without_streaming_cancels_the_vllm_request(setup):
    setup.fake.token_delay_s = 0.3
    before = len(setup.fake.bodies)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{setup.url}/v1/completions",
            json={
                "model": "t2",
                "prompt": "fun",
                "max_tokens": 30,
                "ignore_eos": True,
            },  # 30 tokens x 0.3 s, whatever is sampled
            timeout=1.0,
        )
    cancelled = _cancelled_after(setup.fake, before)
    assert [(b.get("stream"), b["max_tokens"]) for b in cancelled] == [(None, 30)]


# ---------------------------------------------------------------- faults and recovery


def test_vllm_down_is_503_health_says_so_and_service_recovers(setup):
    setup.fake.stop()
    try:
        r = setup.http.post(
            "/v1/completions", json={"model": "t0", "prompt": "fun", "max_tokens": 2}
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
        assert "not reachable" in r.json()["error"]["message"]
        health = setup.http.get("/health")
        assert health.status_code == 503 and health.json()["backend"]["status"] == "down"
        assert setup.http.get("/v1/models").status_code == 200  # the gateway itself keeps serving
    finally:
        setup.fake.start(setup.fake.port)
    health = setup.http.get("/health")
    assert health.status_code == 200 and health.json()["backend"] == {
        "name": "vllm",
        "status": "up",
        "url": setup.fake.url,
        "prompt_kinds": ["soft"],
        "prefix_dir": None,
    }
    r = setup.http.post(
        "/v1/completions", json={"model": "t0", "prompt": "fun", "max_tokens": 2, "temperature": 0}
    )
    assert (
        r.status_code == 200
        and r.json()["choices"][0]["text"] == greedy_alone(setup, "fun", "t0", 2).text
    )


def test_a_vllm_serving_another_model_is_refused(setup):
    other = FakeVLLM(build_tiny_model("llama", seed=1), build_full_tokenizer())
    other.start(free_port())
    try:
        backend = VLLMBackend(setup.backend.processor, other.url, dtype="float32", timeout_s=5)
        with pytest.raises(Exception, match="does not serve the gateway's model"):
            asyncio.run(backend.prepare_all([GenerationRequest("fun", task="t0")]))
    finally:
        other.stop()


def test_builtin_backend_reports_its_prompt_kinds(setup):
    backend = BuiltinBackend(setup.reference)
    try:
        assert asyncio.run(backend.health())["prompt_kinds"] == ["soft", "deep"]
    finally:
        backend.scheduler.close()


# ---------------------------------------------------------------- tenants


def test_tenant_keys_are_checked_before_vllm_sees_a_request(setup, tmp_path):
    from softprompt.api.app import create_app
    from softprompt.api.tenants import add_tenant

    keys = tmp_path / "keys.json"
    key = add_tenant(keys, "one", ["t1"])
    backend = VLLMBackend(
        InputProcessor.from_front_end(load_front_end(str(setup.folder)), setup.bank),
        setup.fake.url,
        dtype="float32",
        timeout_s=60,
    )
    with running(create_app(backend, keys=keys)) as url:
        http = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"})
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert ids == [backend.processor.base_model_id, "t1"]
        body = {"model": "t1", "prompt": TEXTS[0], "max_tokens": 4, "temperature": 0}
        mine = http.post("/v1/completions", json=body)
        assert mine.json()["choices"][0]["text"] == greedy_alone(setup, TEXTS[0], "t1", n=4).text
        sent = len(setup.fake.bodies)
        hidden = http.post("/v1/completions", json={**body, "model": "t2"})
        assert (
            hidden.status_code == 404 and hidden.json()["error"]["message"] == "unknown task 't2'"
        )
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        assert len(setup.fake.bodies) == sent  # neither reached vLLM


# ---------------------------------------------------------------- log-probabilities


def test_logprobs_pass_through_vllm_and_equal_the_engines(setup):
    for model in ("t1", setup.reference.base_model_id):
        body = {"model": model, "prompt": TEXTS[0], "max_tokens": 4, "temperature": 0}
        got = setup.http.post("/v1/completions", json={**body, "logprobs": 2}).json()
        lp = got["choices"][0]["logprobs"]
        task = None if model == setup.reference.base_model_id else model
        alone = greedy_alone(setup, TEXTS[0], task, 4, logprobs=2)
        assert lp["token_logprobs"] == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-4)
        assert lp["tokens"] == setup.reference.token_texts(alone.token_ids)
        assert all(len(top) in (2, 3) for top in lp["top_logprobs"])
    assert setup.fake.bodies[-1]["logprobs"] == 2
    assert "prompt_embeds" in setup.fake.bodies[-2]  # the task's row rode prompt embeddings
    stream = setup.client.completions.create(
        model="t1", prompt=TEXTS[0], max_tokens=4, temperature=0, logprobs=2, stream=True
    )
    streamed = [
        v for c in stream for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs
    ]
    alone = greedy_alone(setup, TEXTS[0], "t1", 4, logprobs=2)
    assert streamed == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-4)


def test_echo_of_a_task_is_refused_naming_the_field_and_backend_and_plain_rows_echo(setup):
    sent = len(setup.fake.bodies)
    body = {"prompt": TEXTS[1], "max_tokens": 0, "echo": True, "logprobs": 1}
    refused = setup.http.post("/v1/completions", json={"model": "t2", **body})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "echo"
    assert "vllm backend" in refused.json()["error"]["message"]
    assert len(setup.fake.bodies) == sent  # never reached vLLM
    text_only = setup.http.post("/v1/completions", json={"model": "t2", **body, "logprobs": None})
    assert text_only.status_code == 200 and text_only.json()["choices"][0]["text"] == TEXTS[1]
    base = setup.reference.base_model_id
    answer = setup.http.post("/v1/completions", json={"model": base, **body})
    assert answer.status_code == 200, answer.text
    lp = answer.json()["choices"][0]["logprobs"]
    from softprompt.serving.requests import PromptLogprobsRequest

    [echo] = setup.reference.run(
        setup.reference.prepare_all([PromptLogprobsRequest(TEXTS[1], None, 1)])
    )
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(
        [e.logprob for e in echo.logprobs[1:]], abs=1e-4
    )
    assert answer.json()["choices"][0]["text"] == TEXTS[1]
