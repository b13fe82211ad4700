"""The web console: its JSON routes and assets over a real server (uvicorn, tiny model), then the page
itself in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

The browser test serves the tiny model's bank unless SOFTPROMPT_CONSOLE_MODEL and
SOFTPROMPT_CONSOLE_BANK name a real model and bank (how the README's screenshot was made), and
copies its screenshot to $SOFTPROMPT_SCREENSHOT_DIR when that is set.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from softprompt.bank import PNG_SIGNATURE, PromptBank, SavedPrompt
from softprompt.model.loading import fingerprint
from softprompt.prompting.inspection import nearest_tokens, task_similarity
from softprompt.serving.engine import ClassifyRequest, Engine
from softprompt.training.plots import plot_training

from ..conftest import build_tiny_model
from .serving_fixtures import (
    TEMPLATE,
    VERBALIZER,
    build_full_tokenizer,
    fill_bank,
    peft_config,
    random_prompt,
    running,
)
from .serving_fixtures import save_task as save_soft_task

API_KEY = "console-admin-key"
ADMIN = {"Authorization": f"Bearer {API_KEY}"}
METRICS = {"best_validation": 0.75, "best_step": 4}
TRAINING = {
    "learning_rate": 0.03,
    "max_steps": 6,
    "data": "/home/someone/train.jsonl",
    "output_dir": "/runs/x",
}


def _write_metrics(path: Path) -> Path:
    """A small metrics.jsonl in the trainer's format, for real plots drawn by plots.plot_training."""
    records = [
        {
            "step": 0,
            "validation": {
                "metric": 0.5,
                "tasks": {"plotted": {"accuracy": 0.5}},
                "zero_shot": {"tasks": {"plotted": {"accuracy": 0.55}}},
            },
        }
    ]
    for step in range(1, 7):
        record = {
            "step": step,
            "loss": 2.0 / step,
            "prompt_grad_norms": {"plotted": [0.1 * step, 0.2, 0.3]},
        }
        if step % 3 == 0:
            record["validation"] = {
                "metric": 0.5 + step / 24,
                "tasks": {"plotted": {"accuracy": 0.5 + step / 24}},
            }
        records.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _plotted_task(bank: PromptBank, model, run_dir: Path) -> dict[str, bytes]:
    """Task 'plotted' saved with real PNGs drawn from a metrics log, as `softprompt train` saves it."""
    pngs = {
        p.stem: p.read_bytes()
        for p in plot_training(_write_metrics(run_dir / "metrics.jsonl"), run_dir)
    }
    values = random_prompt(3, seed=7)
    meta = {
        "fingerprint": fingerprint(model),
        "verbalizer": VERBALIZER,
        "template": TEMPLATE,
        "base_model": "tiny-llama",
        "metrics": METRICS,
        "training": TRAINING,
    }
    bank.save(SavedPrompt("plotted", values, peft_config(3, values.shape[1]), meta, plots=pngs))
    return pngs


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    from softprompt.api.app import create_app
    from softprompt.prompting.deep import DeepPromptModel

    model, tokenizer = build_tiny_model("llama"), build_full_tokenizer()
    bank = PromptBank(tmp_path_factory.mktemp("bank"))
    fill_bank(bank, model)
    pngs = _plotted_task(bank, model, tmp_path_factory.mktemp("run"))
    save_soft_task(
        bank,
        "pair",
        random_prompt(2, seed=9),
        model,
        template="question : {question} context : {context} answer :",
    )
    deep = DeepPromptModel(model, {"deep": random_prompt(2, seed=11)}, tokenizer=tokenizer)
    deep.save_task("deep", bank, meta={"template": TEMPLATE, "verbalizer": VERBALIZER})
    engine = Engine((model, tokenizer), bank)
    with running(create_app(engine, api_key=API_KEY)) as url:
        yield SimpleNamespace(
            url=url,
            engine=engine,
            bank=bank,
            model=model,
            pngs=pngs,
            http=httpx.Client(base_url=url, timeout=30),
        )


# ---------------------------------------------------------------- assets


@pytest.mark.parametrize(
    "path, content_type, marker",
    [
        ("/", "text/html", b"softprompt console"),
        ("/console/console.js", "text/javascript", b"/v1/classify"),
        ("/console/console.css", "text/css", b".side-by-side"),
    ],
)
def test_console_page_and_assets_are_served_by_the_package(console, path, content_type, marker):
    response = console.http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    assert marker in response.content


def test_console_assets_ship_in_the_package_data():
    import tomllib
    from importlib import resources

    patterns = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]["package-data"]["softprompt"]
    shipped = resources.files("softprompt") / "api" / "static"
    for name in ("index.html", "console.js", "console.css"):
        assert (shipped / name).is_file()
        assert any(Path("api", "static", name).match(p) for p in patterns), name


def test_bad_input_unknown_console_file_is_a_json_404(console):
    response = console.http.get("/console/secrets.txt")
    assert response.status_code == 404
    assert "no console file" in response.json()["error"]["message"]


# ---------------------------------------------------------------- /v1/tasks


def test_tasks_list_every_served_task_with_kind_length_size_template_labels_and_metrics(console):
    listing = console.http.get("/v1/tasks").json()
    assert listing["model"] == console.engine.base_model_id and listing["backend"] == "builtin"
    tasks = {t["id"]: t for t in listing["data"]}
    assert set(tasks) == set(console.bank.names())
    plotted = tasks["plotted"]
    assert (plotted["kind"], plotted["num_virtual_tokens"], plotted["classify"]) == (
        "soft",
        3,
        True,
    )
    assert plotted["template"] == TEMPLATE and plotted["fields"] == ["text"]
    assert plotted["labels"] == VERBALIZER["labels"] and plotted["targets"] == VERBALIZER["targets"]
    assert plotted["metrics"] == METRICS and plotted["base_model"] == "tiny-llama"
    assert plotted["training"] == {
        "learning_rate": 0.03,
        "max_steps": 6,
    }  # no paths of the training machine
    on_disk = PromptBank(console.bank.root).stored_files("plotted")
    assert plotted["size_bytes"] == sum(on_disk.values()) > 0
    assert plotted["plots"] == sorted(console.pngs) == ["grad_norms", "loss", "validation"]
    assert tasks["deep"]["kind"] == "deep" and tasks["t2"]["num_virtual_tokens"] == 4
    assert tasks["pair"]["fields"] == ["question", "context"] and tasks["t0"]["plots"] == []


def test_task_route_equals_its_row_in_the_listing(console):
    listing = {t["id"]: t for t in console.http.get("/v1/tasks").json()["data"]}
    assert console.http.get("/v1/tasks/pair").json() == listing["pair"]


def test_task_plots_are_the_saved_pngs(console):
    for name, png in console.pngs.items():
        response = console.http.get(f"/v1/tasks/plotted/plots/{name}.png")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content == png and png.startswith(PNG_SIGNATURE)
    missing = console.http.get("/v1/tasks/t0/plots/loss.png")
    assert missing.status_code == 404 and "has no plot 'loss'" in missing.json()["error"]["message"]


def test_bad_input_unknown_task_is_the_same_404_as_classify(console):
    ours = console.http.get("/v1/tasks/nope")
    theirs = console.http.post("/v1/classify", json={"model": "nope", "input": "fun"})
    assert ours.status_code == theirs.status_code == 404
    assert ours.json() == theirs.json()
    assert console.http.get("/v1/tasks/nope/plots/loss.png").json() == theirs.json()
    assert console.http.get("/v1/compare", params={"a": "t0", "b": "nope"}).json() == theirs.json()
    assert console.http.get("/v1/tasks/..%2Fx").status_code in (400, 404)


# ---------------------------------------------------------------- /v1/compare


def test_compare_reports_inspect_similarity_and_nearest_tokens(console):
    report = console.http.get("/v1/compare", params={"a": "t1", "b": "t3", "k": 2}).json()
    values = {name: console.bank.load(name).embeddings for name in ("t1", "t3")}
    assert report["similarity"] == task_similarity(values)["t1"]["t3"]
    tokenizer = console.engine.tokenizer
    for name in ("t1", "t3"):
        near = nearest_tokens(console.model.get_input_embeddings(), tokenizer, values[name], 2)
        assert report["tasks"][name]["nearest_tokens"] == [
            [list(pair) for pair in row] for row in near
        ]
        assert report["tasks"][name]["shape"] == list(values[name].shape)
    assert report["tasks"]["t3"]["norms"] == pytest.approx(
        values["t3"].norm(dim=-1).tolist(), abs=1e-4
    )


def test_compare_a_deep_and_a_soft_prompt_says_why_there_is_no_similarity(console):
    report = console.http.get("/v1/compare", params={"a": "deep", "b": "t0"}).json()
    assert report["similarity"] is None and "different spaces" in report["similarity_note"]
    assert report["tasks"]["deep"]["nearest_tokens"] is None
    assert len(report["tasks"]["t0"]["nearest_tokens"]) == 2


def test_bad_input_compare_top_k_out_of_range_is_422(console):
    response = console.http.get("/v1/compare", params={"a": "t0", "b": "t1", "k": 0})
    assert response.status_code == 422 and response.json()["error"]["param"] == "query.k"


# ---------------------------------------------------------------- zero-shot classify (the plain model)


def test_classify_zero_shot_scores_the_template_without_the_prompt(console):
    """The plain model's side of the console: same template and labels, no prompt; the summed
    target log-likelihoods equal scoring the rendered text with no task."""
    text = "a boring plot"
    tuned = console.engine.classify("t1", [text])[0]
    body = console.http.post(
        "/v1/classify", json={"model": "t1", "input": text, "zero_shot": True}
    ).json()
    plain = console.engine.score(None, [TEMPLATE.format(text=text)] * 2, VERBALIZER["targets"])
    expected = dict(zip(VERBALIZER["labels"], plain, strict=True))
    [[result]] = console.engine.run(
        console.engine.prepare_all([ClassifyRequest("t1", [text], zero_shot=True)])
    )
    assert result.log_likelihoods == pytest.approx(expected, abs=1e-4)
    assert body["data"][0]["label"] == result.label
    assert result.log_likelihoods != pytest.approx(
        tuned.log_likelihoods, abs=1e-4
    )  # the prompt matters


# ---------------------------------------------------------------- the page in a real browser


def _chromium():
    """A headless Chromium (Debian's chromium + chromium-driver) driven by selenium."""
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser = None
    if not (browser and driver_path):
        why = (
            "the browser test needs chromium + chromium-driver (apt) and selenium (pip, dev extra)"
        )
        if os.environ.get("SOFTPROMPT_NO_SKIPS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture(scope="module")
def page_server(console):
    """The server the browser opens: the tiny model's console, or a real model and bank (env)."""
    model, bank = (
        os.environ.get("SOFTPROMPT_CONSOLE_MODEL"),
        os.environ.get("SOFTPROMPT_CONSOLE_BANK"),
    )
    if not (model and bank):
        yield console
        return
    from softprompt.api.app import create_app
    from softprompt.model.loading import load_model

    engine = Engine(load_model(model), PromptBank(bank, create=False))
    with running(create_app(engine, api_key=API_KEY)) as url:
        yield SimpleNamespace(url=url, engine=engine, http=httpx.Client(base_url=url, timeout=120))


def _severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_console_in_a_real_browser(page_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server = page_server
    listing = server.http.get("/v1/tasks").json()["data"]
    task = max(
        (t for t in listing if t["classify"] and t["fields"] == ["text"]),
        key=lambda t: bool(t["plots"]),
    )
    driver = _chromium()
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server.url + "/")
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#task-table tbody tr"))
        assert [row.get_attribute("data-task") for row in rows] == [t["id"] for t in listing]
        assert _severe(driver) == []  # the page loaded with no console error

        # try a task: the page shows the label the API gives for the same input
        driver.find_element(By.CSS_SELECTOR, f'#task-table tr[data-task="{task["id"]}"]').click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "detail-title"), task["id"]))
        text = (
            "a wonderful , moving film"
            if os.environ.get("SOFTPROMPT_CONSOLE_BANK")
            else "i love this film"
        )
        driver.find_element(By.ID, "field-text").send_keys(text)
        driver.find_element(By.ID, "try-run").click()
        tuned = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#tuned-result .label"))
        )
        plain = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#plain-result .label"))
        )
        api = server.http.post("/v1/classify", json={"model": task["id"], "input": text}).json()[
            "data"
        ][0]
        zero = server.http.post(
            "/v1/classify", json={"model": task["id"], "input": text, "zero_shot": True}
        )
        assert tuned.text == api["label"] and plain.text == zero.json()["data"][0]["label"]
        for plot in task["plots"]:  # the plots saved with the prompt are shown
            wait.until(
                lambda d, p=plot: d.execute_script(
                    "const i = document.querySelector(`img[data-plot='${arguments[0]}']`);"
                    "return i && i.complete && i.naturalWidth > 0;",
                    p,
                )
            )

        # compare two prompts
        driver.find_element(By.CSS_SELECTOR, "#compare-form button").click()
        wait.until(ec.presence_of_element_located((By.ID, "similarity")))
        assert _severe(driver) == []
        driver.execute_script("window.scrollTo(0, 0)")
        screenshot = tmp_path / "console.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes().startswith(PNG_SIGNATURE)
        if os.environ.get("SOFTPROMPT_SCREENSHOT_DIR"):
            shutil.copy(screenshot, Path(os.environ["SOFTPROMPT_SCREENSHOT_DIR"]) / "console.png")

        # an unauthorised delete (no key given) is refused on the page, and the task stays
        driver.find_element(By.ID, "delete-task").click()
        driver.find_element(By.ID, "delete-task").click()  # the second click confirms
        wait.until(ec.text_to_be_present_in_element((By.ID, "admin-message"), "Delete refused"))
        assert "missing API key" in driver.find_element(By.ID, "admin-message").text
        assert "error" in driver.find_element(By.ID, "admin-message").get_attribute("class")
        assert task["id"] in [t["id"] for t in server.http.get("/v1/tasks").json()["data"]]
        wait.until(
            lambda d: d.find_elements(By.CSS_SELECTOR, f'#task-table tr[data-task="{task["id"]}"]')
        )
        # the only console error now is the browser reporting the refused request itself
        assert all(
            "/v1/prompts/" in e["message"] and "401" in e["message"] for e in _severe(driver)
        )

        # with the admin key: upload a prompt folder through the page, then delete it again
        folder = PromptBank(server.engine.bank.root).export(task["id"], tmp_path / "exported")
        driver.find_element(By.ID, "api-key").send_keys(API_KEY)
        driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "key-state"), "key set"))
        driver.find_element(By.ID, "upload-name").send_keys("uploaded-copy")
        driver.find_element(By.ID, "upload-files").send_keys(
            "\n".join(str(f) for f in sorted(folder.iterdir()))
        )
        driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
        wait.until(
            ec.text_to_be_present_in_element((By.ID, "admin-message"), "Uploaded 'uploaded-copy'")
        )
        wait.until(ec.text_to_be_present_in_element((By.ID, "detail-title"), "uploaded-copy"))
        assert "uploaded-copy" in [t["id"] for t in server.http.get("/v1/tasks").json()["data"]]
        driver.find_element(By.ID, "delete-task").click()
        driver.find_element(By.ID, "delete-task").click()
        wait.until(
            ec.text_to_be_present_in_element((By.ID, "admin-message"), "Deleted 'uploaded-copy'")
        )
        assert "uploaded-copy" not in [t["id"] for t in server.http.get("/v1/tasks").json()["data"]]
        wait.until(
            lambda d: (
                not d.find_elements(By.CSS_SELECTOR, '#task-table tr[data-task="uploaded-copy"]')
            )
        )
    finally:
        driver.quit()


def test_console_pages_the_task_list_in_a_real_browser(console):
    """With two tasks a page the table starts with the first two, "Load more tasks" appends the
    next page until the bank is shown whole, in the listing's order, each task once."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    everything = [t["id"] for t in console.http.get("/v1/tasks").json()["data"]]
    assert len(everything) > 4
    driver = _chromium()
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(console.url + "/?page_size=2")

        def shown(d) -> list[str]:  # read in one script: the table is re-rendered per page
            return d.execute_script(
                "return [...document.querySelectorAll('#task-table tbody tr')]"
                ".map((row) => row.dataset.task);"
            )

        wait.until(lambda d: len(shown(d)) == 2)
        assert shown(driver) == everything[:2]
        assert "shown, more in the bank" in driver.find_element(By.ID, "served").text
        more = driver.find_element(By.ID, "more-tasks")
        for pages in range(2, 10):
            if not more.is_displayed():
                break
            expected = everything[: 2 * pages]
            more.click()
            wait.until(lambda d, expected=expected: shown(d) == expected)
        assert shown(driver) == everything and not more.is_displayed()
        assert driver.find_element(By.ID, "served").text.endswith(f"{len(everything)} task(s)")
        options = driver.find_elements(By.CSS_SELECTOR, "#compare-a option")
        assert [o.get_attribute("value") for o in options] == everything
        assert _severe(driver) == []
    finally:
        driver.quit()


# ---------------------------------------------------------------- the same routes through the vLLM gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The console's routes on the vLLM gateway (a fake vLLM doing the model work) next to the
    built-in engine on the same bank, with a deep prompt the gateway cannot serve."""
    from softprompt.api.app import create_app
    from softprompt.model.loading import load_front_end, load_model
    from softprompt.prompting.deep import DeepPromptModel
    from softprompt.serving.processor import InputProcessor
    from softprompt.serving.vllm.backend import VLLMBackend

    from .fake_vllm import FakeVLLM
    from .serving_fixtures import free_port

    folder = tmp_path_factory.mktemp("tiny-model")
    model, tokenizer = build_tiny_model("llama"), build_full_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bank = PromptBank(tmp_path_factory.mktemp("bank"))
    fill_bank(bank, model)
    DeepPromptModel(model, {"deep": random_prompt(2, seed=11)}, tokenizer=tokenizer).save_task(
        "deep", bank
    )
    fake = FakeVLLM(model, tokenizer)
    fake.start(free_port())
    backend = VLLMBackend(
        InputProcessor.from_front_end(load_front_end(str(folder)), bank),
        fake.url,
        dtype="float32",
        timeout_s=60,
    )
    builtin = create_app(Engine(load_model(str(folder)), bank))
    try:
        with running(create_app(backend)) as url, running(builtin) as builtin_url:
            yield SimpleNamespace(
                vllm=httpx.Client(base_url=url, timeout=60),
                builtin=httpx.Client(base_url=builtin_url, timeout=60),
            )
    finally:
        fake.stop()


def test_console_routes_answer_alike_on_the_vllm_gateway_and_the_builtin_engine(gateway):
    ours, theirs = gateway.vllm.get("/v1/tasks").json(), gateway.builtin.get("/v1/tasks").json()
    assert ours["backend"] == "vllm" and theirs["backend"] == "builtin"
    assert [t["id"] for t in ours["data"]] == sorted(
        set(t["id"] for t in theirs["data"]) - {"deep"}
    )
    [unavailable] = ours["unavailable"]
    assert unavailable["id"] == "deep" and "deep" in unavailable["reason"]
    assert ours["data"] == [
        t for t in theirs["data"] if t["id"] != "deep"
    ]  # one bank, the same rows
    assert gateway.vllm.get("/").status_code == 200
    query = {"a": "t0", "b": "t3", "k": 3}
    assert (
        gateway.vllm.get("/v1/compare", params=query).json()
        == gateway.builtin.get("/v1/compare", params=query).json()
    )
    body = {"model": "t2", "input": "a boring plot", "zero_shot": True}
    via_vllm, via_builtin = (
        c.post("/v1/classify", json=body).json()["data"][0] for c in (gateway.vllm, gateway.builtin)
    )
    assert via_vllm["label"] == via_builtin["label"]
    assert via_vllm["probabilities"] == pytest.approx(via_builtin["probabilities"], abs=1e-4)


# ---------------------------------------------------------------- per-tenant keys


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    """Tenants acme (acme-*) and beta (beta-*) on one bank, plus the admin key."""
    from softprompt.api.app import create_app
    from softprompt.api.tenants import add_tenant

    folder = tmp_path_factory.mktemp("tenants")
    keys_path = folder / "keys.json"
    keys = {name: add_tenant(keys_path, name, [f"{name}-*"]) for name in ("acme", "beta")}
    model = build_tiny_model("llama")
    bank = PromptBank(folder / "bank")
    for seed, name in enumerate(("acme-a", "beta-a")):
        save_soft_task(bank, name, random_prompt(2, seed), model)
    with running(
        create_app(Engine((model, build_full_tokenizer()), bank), api_key=API_KEY, keys=keys_path)
    ) as url:
        yield SimpleNamespace(
            http=httpx.Client(base_url=url, timeout=30),
            keys={name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()},
        )


def test_tenant_sees_only_its_tasks_and_anothers_answers_like_a_missing_one(tenants):
    acme = tenants.keys["acme"]
    assert [t["id"] for t in tenants.http.get("/v1/tasks", headers=acme).json()["data"]] == [
        "acme-a"
    ]
    assert [t["id"] for t in tenants.http.get("/v1/tasks", headers=ADMIN).json()["data"]] == [
        "acme-a",
        "beta-a",
    ]
    missing = tenants.http.get("/v1/tasks/nope", headers=acme)
    for path, params in [
        ("/v1/tasks/beta-a", None),
        ("/v1/tasks/beta-a/plots/loss.png", None),
        ("/v1/compare", {"a": "acme-a", "b": "beta-a"}),
    ]:
        response = tenants.http.get(path, params=params, headers=acme)
        assert (response.status_code, response.json()) == (
            404,
            missing.json()
            | {"error": missing.json()["error"] | {"message": "unknown task 'beta-a'"}},
        )
    assert (
        tenants.http.get("/v1/tasks").status_code == 401
    )  # a keys file: every /v1 route needs a key
    assert (
        tenants.http.get("/").status_code == 200
    )  # the page itself is public; it asks for the key
