"""Shared fixtures: tiny random models built from a config (no download) and a tiny tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_sessionfinish(session, exitstatus):
    """With SOFTPROMPT_NO_SKIPS=1 (CI sets it) a skipped test fails the run: a missing model, client
    or package must not turn a test into a silent pass."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("SOFTPROMPT_NO_SKIPS") == "1" and skipped:
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            reporter.write_line(
                f"SKIPPED IS A FAILURE HERE (SOFTPROMPT_NO_SKIPS=1): {report.nodeid}: {reason}",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where a GPU is; elsewhere they are deselected, not skipped (CI has no
    GPU, and a skip fails CI)."""
    if torch.cuda.is_available():
        return
    gpu_only = [item for item in items if "cuda" in item.keywords]
    if gpu_only:
        config.hook.pytest_deselected(items=gpu_only)
        items[:] = [item for item in items if "cuda" not in item.keywords]


WORDS = (
    "the a movie film great good bad awful boring fun plot actor love hate review sentiment "
    "positive negative is was very not and it this of to in classify text if or : . , ! ?"
).split()


def _tiny_config(kind: str):
    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**common, head_dim=8, sliding_window=8, query_pre_attn_scalar=8)


def build_tiny_model(kind: str = "llama", seed: int = 0):
    """A deterministic tiny causal LM of the given architecture, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _tiny_config(kind)
    config.architectures = ["LlamaForCausalLM" if kind == "llama" else "Gemma3ForCausalLM"]
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def build_tiny_tokenizer():
    """A word-level tokenizer over a small vocabulary (ids < 128, 0=pad, 1=bos, 2=eos, 3=unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


@pytest.fixture(params=["llama", "gemma3"])
def tiny_model(request):
    return build_tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return build_tiny_model("llama")


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


POSITIVE = [
    "great movie",
    "good fun film",
    "i love this movie",
    "very good actor",
    "fun and great plot",
]
NEGATIVE = [
    "bad movie",
    "awful boring film",
    "i hate this plot",
    "very bad actor",
    "boring and awful",
]


def write_sentiment_jsonl(path, repeats: int = 4) -> str:
    """A small labelled JSONL file in the tiny tokenizer's vocabulary."""
    import json

    rows = [{"text": t, "label": 1} for t in POSITIVE] + [{"text": t, "label": 0} for t in NEGATIVE]
    with open(path, "w") as f:
        for _ in range(repeats):
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + tokenizer saved as a local model folder (what `--model PATH` loads)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama").save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return str(path)
