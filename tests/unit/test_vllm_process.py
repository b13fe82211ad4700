"""`softprompt serve --backend vllm` starting its own vLLM, and stopping it on exit.

The "vLLM environment" here is a Python whose `vllm.entrypoints.openai.api_server` module is the
fake vLLM server (tests/unit/fake_vllm.py) on the tiny model: the gateway runs the same command
line it runs for the real one, so process start, readiness, serving and shutdown are exercised.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from softprompt.bank import PromptBank
from softprompt.errors import ConfigError
from softprompt.prompting.deep import DeepPromptModel
from softprompt.serving.vllm.process import find_vllm_python, free_port

from ..conftest import build_tiny_model
from .serving_fixtures import build_full_tokenizer, fill_bank, seeded_prompt

REPO = Path(__file__).resolve().parents[2]
FAKE_API_SERVER = """
import argparse, json, pathlib, threading
from transformers import AutoModelForCausalLM, AutoTokenizer
from tests.unit.fake_vllm import FakeVLLM

p = argparse.ArgumentParser()
for flag in ("--model", "--served-model-name", "--max-model-len", "--dtype", "--host", "--port"):
    p.add_argument(flag)
p.add_argument("--enable-prompt-embeds", action="store_true")
p.add_argument("--kv-transfer-config")
p.add_argument("--block-size")
args = p.parse_args()
assert args.enable_prompt_embeds and args.host == "127.0.0.1" and args.block_size == "32"
connector = json.loads(args.kv_transfer_config)
assert connector["kv_connector_module_path"] in {
    path.stem for folder in __import__("os").environ["PYTHONPATH"].split(":") if folder
    for path in pathlib.Path(folder).glob("*.py")
}  # the connector's module is importable by its name
prefix_dir = pathlib.Path(connector["kv_connector_extra_config"]["prefix_dir"])
model = AutoModelForCausalLM.from_pretrained(args.model).eval()
FakeVLLM(
    model, AutoTokenizer.from_pretrained(args.model), served=args.served_model_name,
    prefix_dir=prefix_dir,
).start(int(args.port))
threading.Event().wait()
"""


@pytest.fixture
def fake_vllm_python(tmp_path) -> Path:
    package = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(FAKE_API_SERVER)
    python = tmp_path / "python"
    path = os.pathsep.join([str(tmp_path / "fake"), str(REPO), str(REPO / "src")])
    python.write_text(f'#!/bin/sh\nPYTHONPATH="$PYTHONPATH:{path}" exec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


def test_serve_starts_vllm_serves_through_it_and_stops_it_on_exit(fake_vllm_python, tmp_path):
    folder = tmp_path / "model"
    model = build_tiny_model("llama")
    model.save_pretrained(folder)
    build_full_tokenizer().save_pretrained(folder)
    bank = PromptBank(tmp_path / "bank")
    fill_bank(bank, model)
    DeepPromptModel(model, {"deep": seeded_prompt(2, seed=3)}).save_task("deep", bank)
    port = free_port()
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "softprompt",
            "serve",
            "--model",
            str(folder),
            "--bank",
            str(bank.root),
            "--port",
            str(port),
            "--backend",
            "vllm",
            "--vllm-python",
            str(fake_vllm_python),
            "--vllm-dtype",
            "float32",
            "--vllm-startup-timeout-s",
            "120",
            "--vllm-block-size",
            "32",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        health = _wait_healthy(url, gateway)
        vllm_url = health["backend"]["url"]
        assert vllm_url.startswith("http://127.0.0.1:") and vllm_url != url
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "t0", "prompt": "fun", "max_tokens": 2, "temperature": 0},
            timeout=60,
        )  # greedy: sampling could draw EOS first
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        deep = httpx.post(
            f"{url}/v1/completions",
            json={"model": "deep", "prompt": "fun", "max_tokens": 2, "temperature": 0},
            timeout=60,
        )
        assert deep.status_code == 200, deep.text  # through the connector's folder
        prefix_dir = Path(health["backend"]["prefix_dir"])
        assert len(list(prefix_dir.glob("*.safetensors"))) == 1
    finally:
        gateway.send_signal(signal.SIGINT)  # Ctrl-C
        output = gateway.communicate(timeout=60)[0]
    assert gateway.returncode is not None, output[-2000:]
    with pytest.raises(httpx.TransportError):  # the vLLM it started is gone with it
        httpx.get(f"{vllm_url}/health", timeout=2)
    assert not prefix_dir.exists()  # the temporary prefix folder too


def _wait_healthy(url: str, process: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"gateway exited: {process.stdout.read()[-3000:]}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail("gateway did not become healthy")


def test_the_vllm_environment_is_looked_for_in_this_checkout():
    from softprompt.serving.vllm import process

    assert process._CHECKOUT == Path(__file__).resolve().parents[2]


def test_missing_vllm_environment_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.delenv("SOFTPROMPT_VLLM_PYTHON", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("softprompt.serving.vllm.process._CHECKOUT", tmp_path)
    with pytest.raises(ConfigError, match="make vllm"):
        find_vllm_python()
    with pytest.raises(ConfigError, match="does not exist"):
        find_vllm_python(str(tmp_path / "nope"))
