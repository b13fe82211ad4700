"""Per-tenant keys against a live server over a tiny model: what each tenant sees and may do, 404s
that leak nothing, reloads (mtime and SIGHUP), the audit log, the keys file and its CLI."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime
from types import SimpleNamespace

import httpx
import pytest
import torch

from softprompt.api import tenants
from softprompt.api.app import uvicorn_options
from softprompt.api.tenants import (
    Access,
    AuditLog,
    KeyTable,
    ProxyConfig,
    add_tenant,
    hash_key,
    read_keys,
    reload_on_sighup,
    revoke_tenant,
)
from softprompt.bank import PromptBank
from softprompt.cli import build_parser, main
from softprompt.errors import ConfigError
from softprompt.options import from_args
from softprompt.serving.engine import Engine, GenerationRequest

from ..conftest import build_tiny_model
from .serving_fixtures import (
    API_KEY,
    TEXTS,
    VERBALIZER,
    build_full_tokenizer,
    free_port,
    random_prompt,
    running,
    save_task,
    upload_files,
)

ADMIN = {"Authorization": f"Bearer {API_KEY}"}
TASK_NAMES = {"acme-a": 2, "acme-b": 3, "beta-a": 4}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Tenants acme (acme-*, upload + delete), beta (beta-*, upload + delete) and reader (acme-*,
    no admin rights), plus the admin key; audit log at its default place next to the keys file."""
    from softprompt.api.app import create_app

    folder = tmp_path_factory.mktemp("tenants")
    keys_path = folder / "keys.json"
    keys = {
        "acme": add_tenant(keys_path, "acme", ["acme-*"], upload=True, delete=True),
        "beta": add_tenant(keys_path, "beta", ["beta-*"], upload=True, delete=True),
        "reader": add_tenant(keys_path, "reader", ["acme-*"]),
    }
    model, tokenizer = build_tiny_model("llama"), build_full_tokenizer()
    bank = PromptBank(folder / "bank")
    for seed, (name, n) in enumerate(TASK_NAMES.items()):
        save_task(bank, name, random_prompt(n, seed), model)
    engine = Engine((model, tokenizer), bank)
    app = create_app(engine, api_key=API_KEY, keys=keys_path)
    with running(app) as url:
        yield SimpleNamespace(
            url=url,
            engine=engine,
            bank=bank,
            model=model,
            app=app,
            keys=keys,
            keys_path=keys_path,
            audit_path=folder / "keys.audit.jsonl",
            http=httpx.Client(base_url=url, timeout=30),
        )


def as_(server, tenant: str) -> dict:
    return bearer(server.keys[tenant]) if tenant != "admin" else ADMIN


def completion(server, task: str, who: str, **extra) -> httpx.Response:
    body = {"model": task, "prompt": TEXTS[0], "max_tokens": 4, "temperature": 0, **extra}
    return server.http.post("/v1/completions", json=body, headers=as_(server, who))


def use_routes(server, task: str, who: str) -> list[httpx.Response]:
    """The task used through every inference route (streaming included)."""
    headers = as_(server, who)
    chat = {"model": task, "max_tokens": 4, "messages": [{"role": "user", "content": "fun"}]}
    return [
        completion(server, task, who),
        completion(server, task, who, stream=True),
        server.http.post("/v1/chat/completions", json=chat, headers=headers),
        server.http.post("/v1/classify", json={"model": task, "input": "fun"}, headers=headers),
    ]


def audit_lines(server) -> list[dict]:
    return [json.loads(line) for line in server.audit_path.read_text().splitlines()]


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------- keys needed, tasks filtered


def test_every_v1_route_needs_a_valid_key_health_does_not(server):
    files = upload_files(random_prompt(2, 1))
    for headers, message in [({}, "missing API key"), (bearer("not-a-key"), "invalid API key")]:
        for response in [
            server.http.get("/v1/models", headers=headers),
            *[
                server.http.post(route, json={"model": "acme-a"}, headers=headers)
                for route in ("/v1/completions", "/v1/chat/completions", "/v1/classify")
            ],
            server.http.put("/v1/prompts/acme-x", files=files, headers=headers),
            server.http.delete("/v1/prompts/acme-a", headers=headers),
        ]:
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert message in response.json()["error"]["message"]
    assert server.http.get("/health").status_code == 200
    assert "acme-a" in server.bank.names() and "acme-x" not in server.bank.names()


def test_tenant_lists_only_its_tasks_plus_the_base_model(server):
    def listed(who):
        return [
            m["id"] for m in server.http.get("/v1/models", headers=as_(server, who)).json()["data"]
        ]

    base = server.engine.base_model_id
    assert listed("acme") == [base, "acme-a", "acme-b"]
    assert listed("beta") == [base, "beta-a"]
    assert listed("reader") == [base, "acme-a", "acme-b"]
    assert set(listed("admin")) >= {base, *TASK_NAMES}


def test_tenant_pages_hold_only_its_tasks_and_the_cursor_reveals_no_other(server):
    """Pages are filled from the tenant's own tasks; a cursor naming another tenant's task is only
    a place in name order (the same page as for a name that does not exist)."""
    acme = as_(server, "acme")
    first = server.http.get("/v1/models", params={"limit": 2}, headers=acme).json()
    assert [m["id"] for m in first["data"]] == [server.engine.base_model_id, "acme-a"]
    assert first["has_more"] and first["last_id"] == "acme-a"
    rest = server.http.get("/v1/models", params={"limit": 2, "after": "acme-a"}, headers=acme)
    assert [m["id"] for m in rest.json()["data"]] == ["acme-b"] and not rest.json()["has_more"]
    hidden, missing = (
        server.http.get("/v1/tasks", params={"after": after}, headers=acme).json()
        for after in ("beta-a", "beta-0")
    )
    assert hidden["data"] == missing["data"] == [] and hidden["unavailable"] == []


def test_tenant_uses_its_own_tasks_and_the_base_model(server):
    for task in ("acme-a", server.engine.base_model_id):
        response = completion(server, task, "reader")
        assert response.status_code == 200, response.text
        expected = server.engine.generate(
            [GenerationRequest(TEXTS[0], task=task, max_new_tokens=4)]
        )[0]
        assert response.json()["choices"][0]["text"] == expected.text
    assert all(r.status_code == 200 for r in use_routes(server, "acme-b", "acme"))


def test_another_tenants_task_answers_404_byte_identical_to_a_missing_one(server):
    save_task(server.bank, "beta-gone", random_prompt(2, 9), server.model)
    assert completion(server, "beta-gone", "beta").status_code == 200  # it exists, for beta
    exists_not_yours = use_routes(server, "beta-gone", "acme")
    server.bank.delete("beta-gone")
    missing_for_acme = use_routes(server, "beta-gone", "acme")
    missing_for_admin = use_routes(server, "beta-gone", "admin")  # the engine's own 404
    for hidden, missing, engine_404 in zip(
        exists_not_yours, missing_for_acme, missing_for_admin, strict=True
    ):
        assert hidden.status_code == missing.status_code == engine_404.status_code == 404
        assert hidden.content == missing.content == engine_404.content
        assert hidden.headers["content-type"] == engine_404.headers["content-type"]
    assert exists_not_yours[0].json()["error"] == {
        "message": "unknown task 'beta-gone'",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


# ---------------------------------------------------------------- admin actions


def test_upload_over_or_delete_outside_its_patterns_is_refused_alike_whether_or_not_it_exists(
    server,
):
    save_task(server.bank, "beta-kept", random_prompt(2, 10), server.model)
    before = server.bank.load("beta-kept").embeddings
    files = upload_files(random_prompt(2, 11), meta={"verbalizer": VERBALIZER}, model=server.model)
    over = server.http.put("/v1/prompts/beta-kept", files=files, headers=as_(server, "acme"))
    delete = server.http.delete("/v1/prompts/beta-kept", headers=as_(server, "acme"))
    assert torch.equal(server.bank.load("beta-kept").embeddings, before)  # untouched
    server.bank.delete("beta-kept")
    over_missing = server.http.put(
        "/v1/prompts/beta-kept", files=files, headers=as_(server, "acme")
    )
    delete_missing = server.http.delete("/v1/prompts/beta-kept", headers=as_(server, "acme"))
    assert (
        over.status_code == over_missing.status_code == 403 and over.content == over_missing.content
    )
    assert (
        delete.status_code == delete_missing.status_code == 403
        and delete.content == delete_missing.content
    )
    assert over.json()["error"]["code"] == "permission_denied"
    assert over.json()["error"]["message"] == "this key may not upload task 'beta-kept'"
    assert "beta-kept" not in server.bank.names()


def test_a_tenant_without_rights_may_not_upload_or_delete_even_its_own_tasks(server):
    files = upload_files(random_prompt(2, 12))
    assert (
        server.http.put(
            "/v1/prompts/acme-new", files=files, headers=as_(server, "reader")
        ).status_code
        == 403
    )
    assert (
        server.http.delete("/v1/prompts/acme-a", headers=as_(server, "reader")).status_code == 403
    )
    assert "acme-a" in server.bank.names() and "acme-new" not in server.bank.names()


def test_each_admin_action_is_audited_with_who_what_when_and_from_refusals_too(server):
    start = len(audit_lines(server)) if server.audit_path.exists() else 0
    files = upload_files(random_prompt(2, 13), meta={"verbalizer": VERBALIZER}, model=server.model)
    uploaded = server.http.put("/v1/prompts/acme-up", files=files, headers=as_(server, "acme"))
    assert uploaded.status_code == 200, uploaded.text
    assert completion(server, "acme-up", "acme").status_code == 200
    refused = server.http.put("/v1/prompts/acme-up", files=files, headers=as_(server, "beta"))
    anonymous = server.http.delete("/v1/prompts/acme-up", headers=bearer("wrong"))
    bad = server.http.put(
        "/v1/prompts/acme-bad", files=upload_files(random_prompt(4, 1), n=3), headers=ADMIN
    )
    deleted = server.http.delete("/v1/prompts/acme-up", headers=as_(server, "acme"))
    assert (refused.status_code, anonymous.status_code, bad.status_code, deleted.status_code) == (
        403,
        401,
        422,
        200,
    )
    lines = audit_lines(server)[start:]
    assert [(r["who"], r["action"], r["task"], r["outcome"], r["status"]) for r in lines] == [
        ("acme", "upload", "acme-up", "ok", 200),
        ("beta", "upload", "acme-up", "refused", 403),
        (None, "delete", "acme-up", "refused", 401),
        ("admin", "upload", "acme-bad", "failed", 422),
        ("acme", "delete", "acme-up", "ok", 200),
    ]
    assert lines[0]["version"] == uploaded.json()["version"]
    assert lines[1]["error"] == "this key may not upload task 'acme-up'"
    assert "has 4 rows" in lines[3]["error"]
    for record in lines:
        assert record["from"] == "127.0.0.1"
        when = datetime.fromisoformat(record["time"])
        assert when.utcoffset().total_seconds() == 0 and abs(time.time() - when.timestamp()) < 120
    text = server.audit_path.read_text()
    assert not any(key in text for key in [*server.keys.values(), API_KEY])


def test_the_admin_key_still_sees_uploads_and_deletes_everything(server):
    files = upload_files(random_prompt(2, 14))
    assert server.http.put("/v1/prompts/zeta-x", files=files, headers=ADMIN).status_code == 200
    assert completion(server, "zeta-x", "admin").status_code == 200
    assert completion(server, "zeta-x", "acme").status_code == 404
    assert server.http.delete("/v1/prompts/zeta-x", headers=ADMIN).status_code == 200


# ---------------------------------------------------------------- reloads


def test_revoked_key_stops_working_after_the_mtime_reload(server):
    key = add_tenant(server.keys_path, "temp-mtime", ["acme-*"])
    wait_for(
        lambda: server.http.get("/v1/models", headers=bearer(key)).status_code == 200, timeout=5
    )
    revoke_tenant(server.keys_path, "temp-mtime")
    wait_for(
        lambda: server.http.get("/v1/models", headers=bearer(key)).status_code == 401, timeout=5
    )


def test_revoked_key_stops_working_after_sighup(server, monkeypatch):
    monkeypatch.setattr(tenants, "RELOAD_CHECK_SECONDS", 3600.0)  # only the signal reloads now
    table = server.app.state.access.keys
    table.request_reload()
    key = add_tenant(server.keys_path, "temp-hup", ["acme-*"])
    assert (
        server.http.get("/v1/models", headers=bearer(key)).status_code == 200
    )  # forced reload above
    revoke_tenant(server.keys_path, "temp-hup")
    time.sleep(0.05)
    assert server.http.get("/v1/models", headers=bearer(key)).status_code == 200  # no reload yet
    previous = signal.getsignal(signal.SIGHUP)
    try:
        reload_on_sighup(table)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)  # the handler runs in this (the main) thread
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert server.http.get("/v1/models", headers=bearer(key)).status_code == 401
    assert server.http.get("/v1/models", headers=as_(server, "acme")).status_code == 200


def test_a_bad_keys_file_on_reload_keeps_the_old_table_and_logs_it(server, caplog):
    good = server.keys_path.read_text()
    try:
        with caplog.at_level("ERROR", logger="softprompt.api.tenants"):
            tmp = server.keys_path.with_name("bad.tmp")
            tmp.write_text(good.replace('"upload"', '"uplaod"', 1))
            os.replace(tmp, server.keys_path)
            server.app.state.access.keys.request_reload()
            assert server.http.get("/v1/models", headers=as_(server, "acme")).status_code == 200
        assert any(
            "unknown field 'uplaod'" in r.getMessage()
            and "keeping the previous keys" in r.getMessage()
            for r in caplog.records
        )
    finally:
        tmp = server.keys_path.with_name("good.tmp")
        tmp.write_text(good)
        os.replace(tmp, server.keys_path)
        server.app.state.access.keys.request_reload()
    assert server.http.get("/v1/models", headers=as_(server, "beta")).status_code == 200


# ---------------------------------------------------------------- the keys file and the CLI


def test_keys_add_prints_a_key_that_works_and_the_file_holds_only_its_hash(server, capsys):
    assert (
        main(
            [
                "keys",
                "add",
                str(server.keys_path),
                "--tenant",
                "cli",
                "--tasks",
                "beta-*",
                "--upload",
            ]
        )
        == 0
    )
    key = capsys.readouterr().out.strip()
    assert len(key) >= 43 and "\n" not in key
    text = server.keys_path.read_text()
    assert key not in text and hash_key(key) in text
    assert oct(server.keys_path.stat().st_mode & 0o777) == "0o600"
    wait_for(lambda: server.http.get("/v1/models", headers=bearer(key)).status_code == 200)
    ids = [m["id"] for m in server.http.get("/v1/models", headers=bearer(key)).json()["data"]]
    assert ids == [server.engine.base_model_id, "beta-a"]
    assert main(["keys", "list", str(server.keys_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"name": "cli", "tasks": ["beta-*"], "upload": True, "delete": False} == {
        k: v for k, v in listed[-1].items() if k != "created"
    }
    assert all("key_sha256" not in t for t in listed)
    assert main(["keys", "revoke", str(server.keys_path), "--tenant", "cli"]) == 0
    assert "cli" not in [t.name for t in read_keys(server.keys_path)]
    assert main(["keys", "add", str(server.keys_path), "--tenant", "acme", "--tasks", "x"]) == 2
    assert "already in" in capsys.readouterr().err


BAD_FILES = [
    ("{not json", "is not valid JSON"),
    ('{"tenants": {}}', "must hold a JSON object with a 'tenants' list"),
    ('{"version": 2, "tenants": []}', "version 2 is not supported"),
    (
        '{"tenants": [{"name": "acme", "key_sha256": "%s", "tasks": ["a*"], "uplaod": true}]}',
        "tenant #1 ('acme'): unknown field 'uplaod'",
    ),
    (
        '{"tenants": [{"name": "acme", "key_sha256": "abc", "tasks": ["a*"]}]}',
        "tenant #1 ('acme'): field 'key_sha256' must be 64 lowercase hex",
    ),
    (
        '{"tenants": [{"name": "acme", "key_sha256": "%s", "tasks": []}]}',
        "field 'tasks' must be a non-empty",
    ),
    (
        '{"tenants": [{"name": "acme", "key_sha256": "%s", "tasks": ["../x"]}]}',
        "'../x' is not a task name pattern",
    ),
    (
        '{"tenants": [{"name": "acme", "key_sha256": "%s", "tasks": ["a"], "delete": "yes"}]}',
        "field 'delete' must be true or false",
    ),
    (
        '{"tenants": [{"name": "Acme!", "key_sha256": "%s", "tasks": ["a"]}]}',
        "tenant #1: field 'name' must match",
    ),
    (
        '{"tenants": [{"name": "admin", "key_sha256": "%s", "tasks": ["a"]}]}',
        "tenant name 'admin' is reserved",
    ),
    (
        '{"tenants": [{"name": "a", "key_sha256": "%s", "tasks": ["a"]}, {"name": "a", "key_sha256": "%s", '
        '"tasks": ["b"]}]}',
        "tenant #2 ('a'): name is the same as an earlier tenant's",
    ),
]


@pytest.mark.parametrize("content, fragment", BAD_FILES)
def test_a_bad_keys_file_is_refused_at_start_naming_the_file_and_the_entry(
    tmp_path, capsys, content, fragment
):
    from softprompt.api.app import create_app

    path = tmp_path / "keys.json"
    path.write_text(content.replace("%s", hash_key("k1"), 1).replace("%s", hash_key("k2")))
    with pytest.raises(ConfigError) as caught:
        create_app(Engine((build_tiny_model("llama"), build_full_tokenizer())), keys=path)
    assert str(path) in str(caught.value) and fragment in str(caught.value)
    # the CLI says so before loading any model (there is none at this path)
    assert (
        main(
            [
                "serve",
                "--model",
                str(tmp_path / "no-model"),
                "--bank",
                str(tmp_path),
                "--keys",
                str(path),
            ]
        )
        == 2
    )
    assert fragment in capsys.readouterr().err


def test_a_missing_keys_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="does not exist .*softprompt keys add"):
        KeyTable(tmp_path / "nope.json")


# ---------------------------------------------------------------- the parts alone


def test_the_key_check_compares_every_stored_hash_with_no_early_exit(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    first = add_tenant(path, "first", ["a*"])
    for i in range(5):
        add_tenant(path, f"t{i}", ["b*"])
    access = Access(api_key="admin-key", keys=KeyTable(path))
    calls, compare = [], hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return compare(a, b)

    monkeypatch.setattr(tenants.hmac, "compare_digest", counting)
    for key, owner in [("admin-key", "admin"), (first, "first"), ("nobody", None)]:
        calls.clear()
        found = access._match(key)
        assert (found.name if found else None) == owner
        assert len(calls) == 7  # the admin key and all 6 tenants, whoever matched


def test_concurrent_audit_writers_never_interleave_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    logs = [AuditLog(path), AuditLog(path)]  # two writers on one file, as two replicas would be

    def write(i):
        for j in range(40):
            logs[i % 2].write({"writer": i, "n": j, "pad": "x" * 8000})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 240 and {(r["writer"], r["n"]) for r in records} == {
        (i, j) for i in range(6) for j in range(40)
    }


def test_without_a_keys_file_nothing_changes_for_inference_or_the_admin_key():
    access = Access(api_key="k")
    assert access.keys is None and access.audit is None and access._match("k").name == "admin"
    assert tenants.READER.may_use("any") and not tenants.READER.may("upload", "any")


# ---------------------------------------------------------------- where a request comes from


@contextlib.contextmanager
def served(app):
    """`app` run the way `softprompt serve` runs it (`uvicorn_options`) on a free loopback port;
    yields an httpx client for it."""
    import uvicorn

    uv = uvicorn.Server(uvicorn.Config(app, **uvicorn_options("127.0.0.1", free_port(), "warning")))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_for(lambda: uv.started, timeout=30)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{uv.config.port}", timeout=30) as http:
            yield http
    finally:
        uv.should_exit = True
        thread.join(10)


def audited_delete(server, tmp_path, forwarded_allow_ips: str, forwarded_for: str) -> dict:
    """The audit record of a DELETE (of a missing task: nothing changes) sent from 127.0.0.1 with
    the given X-Forwarded-For, by a server trusting `forwarded_allow_ips`."""
    from softprompt.api.app import create_app

    audit_path = tmp_path / f"audit-{len(list(tmp_path.iterdir()))}.jsonl"
    app = create_app(
        server.engine,
        api_key=API_KEY,
        keys=server.keys_path,
        audit_log=audit_path,
        proxies=ProxyConfig(forwarded_allow_ips=forwarded_allow_ips),
    )
    with served(app) as http:
        headers = {**as_(server, "acme"), "X-Forwarded-For": forwarded_for}
        assert http.delete("/v1/prompts/acme-nothing", headers=headers).status_code == 404
    [record] = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert (record["who"], record["action"], record["status"]) == ("acme", "delete", 404)
    return record


def test_a_forged_x_forwarded_for_from_loopback_is_logged_as_the_socket_peer(server, tmp_path):
    record = audited_delete(server, tmp_path, "", "6.6.6.6")
    assert record["from"] == "127.0.0.1" and "forwarded_for" not in record
    # A proxy that is trusted is still not a peer that is: 10.0.0.1 may not speak for 127.0.0.1.
    record = audited_delete(server, tmp_path, "10.0.0.1", "6.6.6.6")
    assert record["from"] == "127.0.0.1" and "forwarded_for" not in record


def test_a_trusted_proxys_client_is_logged_as_forwarded_for_beside_the_peer(server, tmp_path):
    record = audited_delete(server, tmp_path, "127.0.0.1", "6.6.6.6")
    assert (record["from"], record["forwarded_for"]) == ("127.0.0.1", "6.6.6.6")
    # Through a chain of trusted proxies the client is the last hop that is not one of them: an
    # address the client wrote itself (1.1.1.1) is ignored.
    record = audited_delete(
        server, tmp_path, "127.0.0.0/8, 10.0.0.0/8", "1.1.1.1, 6.6.6.6, 10.0.0.7"
    )
    assert (record["from"], record["forwarded_for"]) == ("127.0.0.1", "6.6.6.6")


def test_forwarded_for_walks_hops_from_the_right_and_strips_ports():
    proxies = ProxyConfig(forwarded_allow_ips="10.0.0.0/8,::1")
    assert proxies.forwarded_for("10.1.2.3", ["7.7.7.7", "6.6.6.6:5000, 10.0.0.2"]) == "6.6.6.6"
    assert proxies.forwarded_for("::ffff:10.0.0.1", ["[2001:db8::1]:443"]) == "2001:db8::1"
    assert proxies.forwarded_for("::1", ["10.0.0.2, 10.0.0.3"]) == "10.0.0.2"  # all proxies
    assert proxies.forwarded_for("::1", []) is None
    assert proxies.forwarded_for("127.0.0.1", ["6.6.6.6"]) is None  # not a trusted peer
    assert ProxyConfig().forwarded_for("127.0.0.1", ["6.6.6.6"]) is None  # the default trusts none
    assert ProxyConfig(forwarded_allow_ips="*").forwarded_for("8.8.8.8", ["1.1.1.1, 2.2.2.2"]) == (
        "1.1.1.1"
    )


def test_forwarded_allow_ips_is_a_serve_flag_refusing_a_bad_value_before_the_model_loads(
    monkeypatch, capsys
):
    parse = build_parser().parse_args
    assert from_args(ProxyConfig, parse(["serve", "--bank", "b"])).forwarded_allow_ips == ""
    given = parse(["serve", "--bank", "b", "--forwarded-allow-ips", "10.0.0.1,192.168.0.0/16"])
    assert from_args(ProxyConfig, given).trusts("192.168.4.5")
    calls = []
    monkeypatch.setattr("softprompt.api.app.serve", lambda *a, **kw: calls.append(kw))
    assert main(["serve", "--bank", "b", "--forwarded-allow-ips", "127.0.0.1"]) == 0
    assert calls[0]["proxies"].trusts("127.0.0.1") and not calls[0]["proxies"].trusts("6.6.6.6")
    for bad in ("10.0.0.300", "localhost", "10.0.0.0/33"):
        assert main(["serve", "--bank", "b", "--forwarded-allow-ips", f"10.0.0.1,{bad}"]) == 2
        err = capsys.readouterr().err
        assert f"error: --forwarded-allow-ips: '{bad}' is not an IP address or CIDR network" in err
    assert len(calls) == 1  # the bad values never reached serve()


def test_serve_runs_uvicorn_with_proxy_headers_off():
    assert uvicorn_options("0.0.0.0", 8000, "info")["proxy_headers"] is False


# ---------------------------------------------------------------- /health


def test_health_under_keys_shows_only_the_status_without_a_valid_key(server):
    for headers in ({}, bearer("not-a-key")):
        health = server.http.get("/health", headers=headers)
        assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_health_with_a_key_shows_the_details_counting_only_the_tasks_the_key_may_use(server):
    everything = server.http.get("/health", headers=ADMIN).json()
    assert everything["status"] == "ok" and everything["backend"]["status"] == "up"
    assert everything["model"] == server.engine.base_model_id
    assert everything["tasks"] == len(server.engine.task_names()) >= len(TASK_NAMES)
    acme = [t for t in server.engine.task_names() if t.startswith("acme-")]
    beta = [t for t in server.engine.task_names() if t.startswith("beta-")]
    assert server.http.get("/health", headers=as_(server, "acme")).json() == {
        **everything,
        "tasks": len(acme),
    }
    assert server.http.get("/health", headers=as_(server, "beta")).json()["tasks"] == len(beta)


def test_health_without_keys_is_unchanged_open_and_complete(server):
    from softprompt.api.app import create_app

    with served(create_app(server.engine, api_key=API_KEY)) as http:
        health = http.get("/health")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "model": server.engine.base_model_id,
        "tasks": len(server.engine.task_names()),
        "task_memory": server.engine.registry.stats(),
        "backend": health.json()["backend"],
    }
    assert health.json()["backend"]["status"] == "up"
    assert health.json()["task_memory"]["loaded"] == len(server.engine.tasks())


# ---------------------------------------------------------------- a client gone mid-upload


def bank_files(bank) -> dict[str, bytes]:
    root = bank.root
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def cut_upload(server, task: str, files: dict) -> None:
    """Send a PUT of `files` that declares its whole length, then close after half the body."""
    url = f"{server.url}/v1/prompts/{task}"
    request = httpx.Request("PUT", url, files=files, headers=as_(server, "acme"))
    body = request.read()
    head = [f"PUT /v1/prompts/{task} HTTP/1.1", "Host: 127.0.0.1"]
    head += [f"{k}: {request.headers[k]}" for k in ("authorization", "content-type")]
    head += [f"Content-Length: {len(body)}", "", ""]
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall("\r\n".join(head).encode() + body[: len(body) // 2])
        time.sleep(0.3)  # the server is reading the form now, waiting for the rest


def test_a_client_gone_mid_upload_is_audited_499_without_a_traceback_and_the_bank_unchanged(
    server, caplog
):
    before = bank_files(server.bank)
    start = len(audit_lines(server)) if server.audit_path.exists() else 0
    uvicorn_log = logging.getLogger("uvicorn")  # uvicorn's loggers do not propagate to caplog's
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            for task in ("acme-cut", "acme-a"):  # a new task, and one whose old version must stay
                files = upload_files(random_prompt(TASK_NAMES.get(task, 2), 21), model=server.model)
                cut_upload(server, task, files)
            wait_for(lambda: len(audit_lines(server)) >= start + 2)
            time.sleep(0.2)  # anything the server logs after the record
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    records = audit_lines(server)[start:]
    assert sorted((r["who"], r["task"], r["outcome"], r["status"]) for r in records) == [
        ("acme", "acme-a", "client_closed", 499),
        ("acme", "acme-cut", "client_closed", 499),
    ]
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []
    assert bank_files(server.bank) == before and "acme-cut" not in server.bank.names()
    assert completion(server, "acme-a", "acme").status_code == 200
