"""lm-evaluation-harness against softprompt, both ways, with the real `lm_eval` package (the dev
extra): over HTTP (`local-completions` on a real `softprompt serve`) and in process (the registered
`softprompt` model), on a tiny model folder, a tmp bank (a random soft and deep prompt) and a task
YAML over a local JSONL file (no hub). The multiple-choice `acc` equals `softprompt eval`'s."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from softprompt.bank import PromptBank
from softprompt.model.loading import load_model
from softprompt.prompting.deep import DeepPromptModel
from softprompt.prompting.prompted import PromptedModel
from softprompt.serving.engine import Engine, GenerationRequest

from ..conftest import NEGATIVE, POSITIVE
from .serving_fixtures import free_port

pytest.importorskip("lm_eval")

TEMPLATE = "review : {text} sentiment :"
META = {
    "template": TEMPLATE,
    "verbalizer": {"labels": ["negative", "positive"], "targets": [" negative", " positive"]},
}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """The tiny model folder, a bank with a soft and a deep prompt, the rows and task YAMLs."""
    root = tmp_path_factory.mktemp("lm-eval")
    loaded = load_model(tiny_model_dir)
    torch.manual_seed(0)
    soft = PromptedModel(loaded.model, {"soft": torch.randn(4, 32) * 2}, tokenizer=loaded.tokenizer)
    soft.save_task("soft", root / "bank", meta=META)
    deep = DeepPromptModel(
        loaded.model, {"deep": torch.randn(3, 32) * 0.5}, tokenizer=loaded.tokenizer
    )
    with torch.no_grad():  # away from its soft init: a real deep prompt
        deep.table.get("deep").add_(0.3 * torch.randn_like(deep.table.get("deep")))
    deep.save_task("deep", root / "bank", meta=META)
    rows = root / "rows.jsonl"
    texts = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
    rows.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in texts))
    tasks = root / "tasks"
    tasks.mkdir()
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {rows}\ntest_split: test\n"
    )
    (tasks / "tiny_sentiment.yaml").write_text(
        "task: tiny_sentiment\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "review : {{text}} sentiment :"\n'
        'doc_to_choice: ["negative", "positive"]\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    (tasks / "tiny_generate.yaml").write_text(
        "task: tiny_generate\n" + common + "output_type: generate_until\n"
        'doc_to_text: "review : {{text}} sentiment :"\n'
        "doc_to_target: \"{{['negative', 'positive'][label]}}\"\n"
        'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return {
        "root": root,
        "model": tiny_model_dir,
        "bank": str(root / "bank"),
        "rows": str(rows),
        "tasks": str(tasks),
        "env": env,
    }


def lm_eval(setup, *args, command: str = "lm_eval") -> dict:
    """Run lm-eval's CLI (`softprompt-lm-eval` is lm-eval's own with our model registered) and
    return its results file, samples included."""
    out = setup["root"] / f"out-{time.monotonic_ns()}"
    command = [
        str(BIN / command),
        *args,
        "--include_path",
        setup["tasks"],
        "--output_path",
        str(out),
        "--log_samples",
    ]
    done = subprocess.run(command, env=setup["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)  # the results table, in the test log
    [results] = glob.glob(f"{out}/**/results_*.json", recursive=True)
    result = json.loads(Path(results).read_text())
    for path in glob.glob(f"{out}/**/samples_*.jsonl", recursive=True):
        task = Path(path).name.split("_", 1)[1].rsplit("_", 1)[0]
        result.setdefault("samples", {})[task] = [json.loads(x) for x in open(path)]
    return result


def softprompt_eval(setup, task: str) -> dict:
    done = subprocess.run(
        [str(BIN / "softprompt"), "eval", "--model", setup["model"], "--bank", setup["bank"]]
        + ["--task", task, "--data", setup["rows"], "--json", "--bf16", "no"],  # as served: fp32
        env=setup["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def serving(setup):
    port = free_port()
    command = [str(BIN / "softprompt"), "serve", "--model", setup["model"], "--bank", setup["bank"]]
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        env=setup["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def engine_view(setup, task):
    """The engine's own label log-likelihoods and greedy generations for the rows."""
    engine = Engine(load_model(setup["model"]), PromptBank(setup["bank"]))
    rows = [json.loads(x) for x in open(setup["rows"])]
    classified = engine.classify(task, [r["text"] for r in rows])
    texts = [TEMPLATE.format(text=r["text"]) for r in rows]
    generated = engine.generate(
        [GenerationRequest(t, task=task, max_new_tokens=4, stop=(".",)) for t in texts]
    )
    return classified, [g.text for g in generated]


def check_against_engine(result, classified, generated, task):
    """lm-eval's per-row choice log-likelihoods and generations are the engine's."""
    mc = sorted(result["samples"]["tiny_sentiment"], key=lambda s: s["doc_id"])
    for sample, expected in zip(mc, classified, strict=True):
        got = [float(resp[0][0]) for resp in sample["resps"]]
        want = [expected.log_likelihoods[label] for label in ("negative", "positive")]
        assert got == pytest.approx(want, abs=1e-4), (task, sample["doc_id"])
    gen = sorted(result["samples"]["tiny_generate"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in gen] == generated


def test_info_source_prints_the_model_folder_lm_eval_reads_the_tokenizer_from(setup):
    done = subprocess.run(
        [str(BIN / "softprompt"), "info", "--model", setup["model"], "--source"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == setup["model"], done.stderr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(done.stdout.strip())
    assert (
        tokenizer("review : fun")["input_ids"]
        == load_model(setup["model"]).tokenizer("review : fun")["input_ids"]
    )


@pytest.mark.parametrize("task", ["soft", "deep"])
def test_lm_eval_local_completions_over_http_equals_softprompt_eval(setup, task):
    expected = softprompt_eval(setup, task)
    with serving(setup) as url:
        args = (
            f"model={task},base_url={url}/v1/completions,tokenizer={setup['model']},"
            "tokenized_requests=False,max_length=256"
        )
        result = lm_eval(
            setup,
            "--model",
            "local-completions",
            "--model_args",
            args,
            "--batch_size",
            "4",
            "--tasks",
            "tiny_sentiment,tiny_generate",
        )
        chat = None
        if task == "soft":  # generation through /v1/chat/completions too
            args = f"model={task},base_url={url}/v1/chat/completions"
            chat = lm_eval(
                setup,
                "--model",
                "local-chat-completions",
                "--model_args",
                args,
                "--apply_chat_template",
                "--tasks",
                "tiny_generate",
            )
    acc = result["results"]["tiny_sentiment"]["acc,none"]
    assert acc == expected["accuracy"] and expected["n"] == len(POSITIVE + NEGATIVE)
    check_against_engine(result, *engine_view(setup, task), task)
    if chat is not None:
        engine = Engine(load_model(setup["model"]), PromptBank(setup["bank"]))
        rows = [json.loads(x) for x in open(setup["rows"])]
        messages = [[{"role": "user", "content": TEMPLATE.format(text=r["text"])}] for r in rows]
        expected_chat = engine.generate(
            [
                GenerationRequest(engine.chat_prompt(m), task, max_new_tokens=4, stop=(".",))
                for m in messages
            ]
        )
        gen = sorted(chat["samples"]["tiny_generate"], key=lambda s: s["doc_id"])
        assert [s["resps"][0][0] for s in gen] == [g.text for g in expected_chat]


@pytest.mark.parametrize("task", ["soft", "deep", "plain"])
def test_lm_eval_in_process_softprompt_model_equals_softprompt_eval(setup, task):
    task = "" if task == "plain" else task  # task= (empty): the plain model
    args = f"bank={setup['bank']},task={task},model={setup['model']}"
    result = lm_eval(
        setup,
        "--model",
        "softprompt",
        "--model_args",
        args,
        "--batch_size",
        "8",
        "--tasks",
        "tiny_sentiment,tiny_generate",
        command="softprompt-lm-eval",
    )
    acc = result["results"]["tiny_sentiment"]["acc,none"]
    if task:
        assert acc == softprompt_eval(setup, task)["accuracy"]
        check_against_engine(result, *engine_view(setup, task), task)
    else:  # the plain model: the engine's rows without a prompt
        engine = Engine(load_model(setup["model"]), PromptBank(setup["bank"]))
        rows = [json.loads(x) for x in open(setup["rows"])]
        texts = [TEMPLATE.format(text=r["text"]) for r in rows]
        plain = engine.generate(
            [GenerationRequest(t, max_new_tokens=4, stop=(".",)) for t in texts]
        )
        gen = sorted(result["samples"]["tiny_generate"], key=lambda s: s["doc_id"])
        assert [s["resps"][0][0] for s in gen] == [p.text for p in plain]
        mc = sorted(result["samples"]["tiny_sentiment"], key=lambda s: s["doc_id"])
        target = engine.tokenizer(" positive", add_special_tokens=False)["input_ids"]
        expected = engine.score_tokens(
            None, [(engine.tokenizer(t)["input_ids"], target) for t in texts]
        )
        got = [float(sample["resps"][1][0][0]) for sample in mc]
        assert got == pytest.approx(expected, abs=1e-4)
