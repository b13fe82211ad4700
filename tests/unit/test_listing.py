"""Listing tasks in a bank of any size: start-up and the listing routes read no prompt tensor, and
/v1/models and /v1/tasks come a page at a time (`limit`, `after`; OpenAI's `has_more`,
`first_id`, `last_id`). How long they take with 10,000 tasks: bench/serve_scale.py."""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import httpx
import pytest
import safetensors.torch
import torch

from softprompt.bank import CONFIG_FILE, WEIGHTS_FILE, PromptBank
from softprompt.errors import IncompatiblePromptError
from softprompt.serving.engine import Engine

from ..conftest import build_tiny_model
from .serving_fixtures import (
    API_KEY,
    assert_error,
    build_full_tokenizer,
    greedy,
    random_prompt,
    running,
    save_task,
)

NAMES = [f"task-{i:02d}" for i in range(23)]
BAD = "task-07x"  # rows of the wrong width: listed as unavailable, between task-07 and task-08


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    """A bank of 23 soft prompts and one that does not fit the model, served over HTTP."""
    from softprompt.api.app import create_app

    model, tokenizer = build_tiny_model("llama"), build_full_tokenizer()
    bank = PromptBank(tmp_path_factory.mktemp("bank"))
    for seed, name in enumerate(NAMES):
        save_task(bank, name, random_prompt(2 + seed % 3, seed), model)
    save_task(bank, BAD, torch.randn(2, 16), model)
    engine = Engine((model, tokenizer), bank)
    with running(create_app(engine, api_key=API_KEY)) as url:
        yield SimpleNamespace(engine=engine, bank=bank, http=httpx.Client(base_url=url, timeout=30))


@pytest.fixture
def file_reads(monkeypatch):
    """The names of the prompt files read from disk while the test runs (config, weights, ...)."""
    reads = []
    read_bytes = pathlib.Path.read_bytes

    def recording(path):
        reads.append(path.name)
        return read_bytes(path)

    monkeypatch.setattr(pathlib.Path, "read_bytes", recording)
    return reads


def pages(http, path: str, limit: int, **params) -> list[dict]:
    """Every page of a listing route, following `last_id` while `has_more`."""
    found, after = [], None
    while True:
        query = {"limit": limit, **params} | ({"after": after} if after else {})
        response = http.get(path, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        ids = [entry["id"] for entry in page["data"]]
        assert len(ids) <= limit and (page["first_id"], page["last_id"]) == (
            (ids[0], ids[-1]) if ids else (None, None)
        )
        found.append(page)
        if not page["has_more"]:
            return found
        assert len(ids) == limit  # a page is short only at the end
        after = page["last_id"]


def test_start_up_and_listing_read_no_prompt_tensor_and_the_first_request_reads_one(
    tmp_path, file_reads
):
    from softprompt.api.app import create_app

    model, tokenizer = build_tiny_model("llama"), build_full_tokenizer()
    bank = PromptBank(tmp_path / "bank")
    for seed, name in enumerate(NAMES[:6]):
        save_task(bank, name, random_prompt(2, seed), model)
    engine = Engine((model, tokenizer), bank)
    with running(create_app(engine)) as url:
        http = httpx.Client(base_url=url, timeout=30)
        assert http.get("/health").json()["tasks"] == 6
        for path in ("/v1/models", "/v1/tasks"):
            pages(http, path, limit=2)
        assert WEIGHTS_FILE not in file_reads and engine.tasks() == []
        assert CONFIG_FILE in file_reads  # the listing did read the metadata
        file_reads.clear()
        response = http.post("/v1/classify", json={"model": NAMES[3], "input": "fun"})
        assert response.status_code == 200, response.text
    assert file_reads.count(WEIGHTS_FILE) == 1 and engine.tasks() == [NAMES[3]]


@pytest.mark.parametrize("limit", [1, 2, 5, 23, 24, 100])
def test_task_pages_cover_every_servable_task_once_in_name_order(listed, limit):
    found = pages(listed.http, "/v1/tasks", limit)
    assert [t["id"] for page in found for t in page["data"]] == NAMES
    unavailable = [u["id"] for page in found for u in page["unavailable"]]
    assert unavailable == [BAD]  # on the one page that passes it, never twice
    assert all(page["model"] == listed.engine.base_model_id for page in found)


@pytest.mark.parametrize("limit", [1, 2, 7, 24, 1000])
def test_model_pages_start_with_the_base_model_and_cover_every_task_once(listed, limit):
    found = pages(listed.http, "/v1/models", limit)
    ids = [m["id"] for page in found for m in page["data"]]
    assert ids == [listed.engine.base_model_id, *NAMES]
    assert len(found) == -(-(len(NAMES) + 1) // limit)  # no empty last page


def test_listing_without_parameters_is_the_first_page_as_before(listed):
    models = listed.http.get("/v1/models").json()
    assert models["object"] == "list" and models["has_more"] is False
    entry = {m["id"]: m for m in models["data"]}["task-04"]
    assert (entry["num_virtual_tokens"], entry["kind"], entry["classify"]) == (3, "soft", True)
    assert entry["created"] == int(listed.bank.read_header("task-04").saved_at) > 0
    tasks = listed.http.get("/v1/tasks").json()
    assert [t["id"] for t in tasks["data"]] == NAMES and tasks["has_more"] is False
    assert listed.http.get("/v1/tasks/task-04").json() == tasks["data"][4]


def test_after_is_a_position_in_name_order_not_a_lookup(listed):
    """A cursor naming a task deleted since (or never there) still marks its place."""
    page = listed.http.get("/v1/tasks", params={"after": "task-05a", "limit": 2}).json()
    assert [t["id"] for t in page["data"]] == ["task-06", "task-07"] and page["has_more"]
    last = listed.http.get("/v1/models", params={"after": "zzz"}).json()
    assert last["data"] == [] and last["has_more"] is False and last["last_id"] is None
    base = listed.engine.base_model_id  # the first page of /v1/models ends on it with limit 1
    page = listed.http.get("/v1/models", params={"after": base, "limit": 1}).json()
    assert [m["id"] for m in page["data"]] == [NAMES[0]]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/tasks"])
@pytest.mark.parametrize(
    "params, param",
    [
        ({"limit": 0}, "query.limit"),
        ({"limit": 1001}, "query.limit"),
        ({"limit": "ten"}, "query.limit"),
        ({"limit": "2.5"}, "query.limit"),
        ({"after": "../etc"}, "after"),
        ({"after": "Task-01"}, "after"),
    ],
)
def test_bad_input_limit_or_after_is_422_naming_it(listed, path, params, param):
    response = listed.http.get(path, params=params)
    assert_error(response, 422, param.split(".")[-1], "invalid_value")
    assert response.json()["error"]["param"] == param


def test_listing_reads_each_task_metadata_once_per_version(listed, file_reads):
    listed.engine.listing(100)  # whatever an earlier test left, all is cached now
    file_reads.clear()
    assert [i.name for i in listed.engine.listing(100).infos] == NAMES
    assert file_reads == []  # one readlink per task, no file read
    model = build_tiny_model("llama")
    save_task(listed.bank, "task-03", random_prompt(5, 99), model)  # a new version
    try:
        file_reads.clear()
        infos = {i.name: i for i in listed.engine.listing(100).infos}
        assert infos["task-03"].num_virtual_tokens == 5
        assert sorted(file_reads) == sorted(["adapter_config.json", "softprompt.json"])
    finally:
        save_task(listed.bank, "task-03", random_prompt(2, 3), model)


def test_listing_filters_before_paging_so_each_page_is_full(listed):
    visible = {"task-01", "task-05", "task-09", "task-13", "task-17", "task-21"}
    page = listed.engine.listing(4, None, visible.__contains__)
    assert [i.name for i in page.infos] == ["task-01", "task-05", "task-09", "task-13"]
    assert page.has_more and page.unavailable == {}  # task-07x is not this caller's to see
    rest = listed.engine.listing(4, "task-13", visible.__contains__)
    assert [i.name for i in rest.infos] == ["task-17", "task-21"] and not rest.has_more


def test_a_task_refused_when_read_is_listed_unavailable_until_it_changes(listed, tmp_path):
    engine = Engine((build_tiny_model("llama"), build_full_tokenizer()), listed.bank)
    bad = torch.full((2, 32), float("nan"))
    folder = pathlib.Path(listed.bank.root) / "task-07"
    weights = (folder / WEIGHTS_FILE).read_bytes()
    safetensors.torch.save_file({"prompt_embeddings": bad}, str(tmp_path / "nan.safetensors"))
    (folder / WEIGHTS_FILE).write_bytes((tmp_path / "nan.safetensors").read_bytes())
    try:
        assert "task-07" in [i.name for i in engine.listing(100).infos]  # its metadata is fine
        with pytest.raises(IncompatiblePromptError, match="NaN"):  # found once the tensor is read
            engine.generate([greedy("fun", "task-07")])
        page = engine.listing(100)
        assert (
            "task-07" not in [i.name for i in page.infos] and "NaN" in page.unavailable["task-07"]
        )
    finally:
        (folder / WEIGHTS_FILE).write_bytes(weights)
