"""Helpers the serving tests share (engine, server, deep prompts): tiny tokenizer and bank
builders, prompts, and a loopback server. Test files import shared helpers from fixtures
modules like this one (or conftest), never from another test file."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time

import safetensors.torch
import torch

from softprompt.bank import PromptBank, SavedPrompt
from softprompt.model.loading import fingerprint
from softprompt.prompting.deep import DeepPromptModel
from softprompt.prompting.prompted import PromptedModel
from softprompt.serving.engine import (
    GenerationRequest,
)

from ..conftest import WORDS

D = 32


TASKS = {"t0": 2, "t1": 3, "t2": 4, "t3": 6}  # name -> virtual tokens


VERBALIZER = {"labels": ["positive", "negative"], "targets": [" good", " bad film"]}


TEMPLATE = "review : {text} sentiment :"


TEXTS = ["the movie was", "a boring plot and", "i love this film", "fun", "the actor is not"]


def build_full_tokenizer():
    """Word-level tokenizer covering all 128 ids of the tiny model, so every token decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in [*WORDS, "i"]:
        vocab.setdefault(word, len(vocab))
    for i in range(len(vocab), 128):
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def peft_config(n: int, d: int = D) -> dict:
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": n,
        "token_dim": d,
        "num_transformer_submodules": 1,
    }


def random_prompt(n: int, seed: int, d: int = D) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator) * 3.0


def save_task(bank: PromptBank, name: str, values: torch.Tensor, model, **meta) -> None:
    meta = {
        "fingerprint": fingerprint(model),
        "verbalizer": VERBALIZER,
        "template": TEMPLATE,
        **meta,
    }
    bank.save(SavedPrompt(name, values, peft_config(values.shape[0], values.shape[1]), meta))


def fill_bank(bank: PromptBank, model) -> None:
    for seed, (name, n) in enumerate(TASKS.items()):
        save_task(bank, name, random_prompt(n, seed), model)


def greedy(text, task, n=8):
    return GenerationRequest(text, task=task, max_new_tokens=n)


def outputs(results):
    return [(r.text, r.token_ids) for r in results]


API_KEY = "test-admin-key"


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}review :{% endif %}"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """`app` served by uvicorn on a free loopback port for the block; yields its base URL."""
    import uvicorn

    uv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{uv.config.port}"
    finally:
        uv.should_exit = True
        thread.join(10)


def assert_error(response, status, message, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error
    if code is not None:
        assert error["code"] == code


def upload_files(values, *, n=None, meta=None, model=None):
    weights = safetensors.torch.save({"prompt_embeddings": values.contiguous()})
    config = peft_config(n if n is not None else values.shape[0], values.shape[1])
    files = {
        "adapter_model.safetensors": ("adapter_model.safetensors", io.BytesIO(weights)),
        "adapter_config.json": ("adapter_config.json", io.BytesIO(json.dumps(config).encode())),
    }
    if meta is not None or model is not None:
        full = {"fingerprint": fingerprint(model)} if model is not None else {}
        files["softprompt.json"] = (
            "softprompt.json",
            io.BytesIO(json.dumps({**full, **(meta or {})}).encode()),
        )
    return files


ADMIN = {"Authorization": f"Bearer {API_KEY}"}


DEEP_TEXTS = ["the movie was", "a boring plot and", "i love this film"]


def seeded_prompt(n=2, seed=1):
    """A random [n, 32] prompt from a fixed seed."""
    torch.manual_seed(seed)
    return torch.randn(n, 32) * 0.5


def served_bank(model, tokenizer, path):
    """A bank with a deep prompt (trained a little away from its soft init) and a soft prompt."""
    from softprompt.bank import PromptBank

    deep = DeepPromptModel(model, {"deep-task": seeded_prompt(3, seed=4)}, tokenizer=tokenizer)
    with torch.no_grad():
        deep.table.get("deep-task").add_(0.3 * torch.randn_like(deep.table.get("deep-task")))
    meta = {"template": "review : {text} sentiment :", "verbalizer": VERBALIZER}
    deep.save_task("deep-task", path, meta=meta)
    soft = PromptedModel(model, {"soft-task": seeded_prompt(2, seed=5)}, tokenizer=tokenizer)
    soft.save_task("soft-task", path, meta=meta)
    return deep, PromptBank(path)
