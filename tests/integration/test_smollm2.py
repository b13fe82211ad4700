"""The real embedded SmolLM2-135M-Instruct: cache, PEFT parity, the CLI end to end."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import pytest
import torch

from softprompt.model.loading import load_model
from softprompt.prompting.prompted import PromptedModel
from softprompt.prompting.soft import PromptTuningConfig

pytestmark = pytest.mark.integration

INIT_TEXT = "Classify if this review is positive or negative:"


def test_default_loads_from_cache_on_second_call(smollm2, caplog):
    with caplog.at_level(logging.INFO, logger="softprompt.model.loading"):
        again = load_model("default")
    assert "converting" not in caplog.text  # no GGUF dequantisation the second time
    assert again.fingerprint == smollm2.fingerprint
    assert (
        again.fingerprint["architecture"] == "LlamaForCausalLM"
        and again.fingerprint["hidden_size"] == 576
    )
    assert all(not p.requires_grad for p in again.model.parameters())


def test_peft_interop_text_prompt_same_greedy_generation_as_peft(smollm2):
    from peft import PromptTuningConfig as PeftConfig
    from peft import get_peft_model

    config = PromptTuningConfig(
        num_virtual_tokens=8, prompt_tuning_init="text", prompt_tuning_init_text=INIT_TEXT
    )
    prompted = PromptedModel(smollm2, {"sentiment": config})
    peft_model = get_peft_model(
        copy.deepcopy(smollm2.model),
        PeftConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=8,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=INIT_TEXT,
            tokenizer_name_or_path=smollm2.source,
        ),
    ).eval()
    torch.testing.assert_close(
        peft_model.get_prompt_embedding_to_save("default"), prompted.table.get("sentiment").detach()
    )
    text = "Review: a gorgeous, witty and moving film\nSentiment:"
    enc = smollm2.tokenizer(text, return_tensors="pt")
    ours = prompted.generate_ids(
        enc["input_ids"], enc["attention_mask"], "sentiment", max_new_tokens=12, eos_token_ids=()
    )[0]  # no early stop: all 12 tokens are compared
    # Greedy decoding driven by PEFT's own forward (full recompute, no cache). PEFT 0.21.2's
    # generate() on transformers 5.24 drifts from its own forward after a few tokens, so its
    # forward is the reference for "what PEFT's prompt means".
    tokens = enc["input_ids"][0].tolist()
    reference: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            logits = peft_model(input_ids=torch.tensor([tokens + reference])).logits[0, -1]
            reference.append(int(logits.argmax()))
    assert len(ours) == 12 and ours == reference


def test_engine_kv_prefix_cache_on_the_real_model_equals_injection_and_is_taken(smollm2):
    from softprompt.serving.engine import Engine, GenerationRequest

    config = PromptTuningConfig(
        num_virtual_tokens=8, prompt_tuning_init="text", prompt_tuning_init_text=INIT_TEXT
    )
    prompt = PromptedModel(smollm2, {"a": config}).table.get("a").detach()
    meta = {
        "template": "Review: {text}\nSentiment:",
        "verbalizer": {"labels": ["negative", "positive"]},
    }
    cached, injected = (
        Engine(smollm2, use_prefix_cache=True),
        Engine(smollm2, use_prefix_cache=False),
    )
    for engine in (cached, injected):
        engine.add_task("a", prompt, meta)
    request = [
        GenerationRequest(
            "Review: a gorgeous, witty and moving film\nSentiment:", task="a", max_new_tokens=8
        )
    ]
    assert cached.generate(request)[0].token_ids == injected.generate(request)[0].token_ids
    texts = ["dull and far too long", "a gorgeous, witty and moving film"]
    for by_cache, by_injection in zip(
        cached.classify("a", texts), injected.classify("a", texts), strict=True
    ):
        assert by_cache.log_likelihoods == pytest.approx(by_injection.log_likelihoods, abs=1e-3)
    assert (
        cached.prefix_computations == 1 and injected.prefix_computations == 0
    )  # each path was the one taken


def test_mixed_batch_real_model_rows_equal_alone(smollm2):
    prompted = PromptedModel(
        smollm2,
        {
            "a": PromptTuningConfig(
                num_virtual_tokens=8, prompt_tuning_init="text", prompt_tuning_init_text=INIT_TEXT
            ),
            "b": PromptTuningConfig(
                num_virtual_tokens=4,
                prompt_tuning_init="text",
                prompt_tuning_init_text="Translate to French:",
            ),
        },
    )
    texts = ["Review: dull and far too long\nSentiment:", "The cat sat on the mat.", "Hello"]
    mixed = prompted.generate(texts, ["a", "b", None], max_new_tokens=8)
    alone = [
        prompted.generate([t], task, max_new_tokens=8)[0]
        for t, task in zip(texts, ["a", "b", None], strict=True)
    ]
    assert mixed == alone
    assert prompted.generate(texts[:1], "a", max_new_tokens=8) != prompted.generate(
        texts[:1], "b", max_new_tokens=8
    )


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "softprompt", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


def test_cli_train_eval_generate_info_on_builtin_data(tmp_path):
    bank, out = tmp_path / "bank", tmp_path / "run"
    trained = _cli(
        "train",
        "--model",
        "default",
        "--task",
        "movie",
        "--data",
        "builtin:movie_sentiment:train",
        "--eval-data",
        "builtin:movie_sentiment:validation",
        "--max-steps",
        "4",
        "--eval-steps",
        "2",
        "--max-eval-examples",
        "16",
        "--per-device-train-batch-size",
        "4",
        "--bank",
        str(bank),
        "--output-dir",
        str(out),
        "--json",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and (bank / "movie" / "adapter_model.safetensors").is_file()
    assert {p.rsplit("/", 1)[-1] for p in summary["plots"]} == {
        "loss.png",
        "validation.png",
        "grad_norms.png",
    }

    evaluated = _cli(
        "eval",
        "--model",
        "default",
        "--bank",
        str(bank),
        "--task",
        "movie",
        "--data",
        str(_few_rows(tmp_path)),
        "--json",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert {"accuracy", "macro_f1", "n"} <= metrics.keys() and metrics["n"] == 6

    zero = _cli(
        "eval",
        "--model",
        "default",
        "--zero-shot",
        "--template",
        "Review: {text}\\nSentiment:",
        "--labels",
        "negative,positive",
        "--data",
        str(_few_rows(tmp_path)),
        "--json",
    )
    assert zero.returncode == 0 and json.loads(zero.stdout.strip().splitlines()[-1])["n"] == 6

    generated = _cli(
        "generate",
        "--model",
        "default",
        "--bank",
        str(bank),
        "--task",
        "movie",
        "--max-new-tokens",
        "3",
        "--json",
        "Review: lovely\\nSentiment:",
    )
    assert (
        generated.returncode == 0
        and len(json.loads(generated.stdout.splitlines()[-1])["outputs"]) == 1
    )
    info = _cli("info", "--model", "default", "--json")
    assert json.loads(info.stdout.splitlines()[-1])["hidden_size"] == 576


def test_cli_bad_data_reports_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": "oops", "label": 7}\n')
    result = _cli(
        "eval",
        "--model",
        "default",
        "--zero-shot",
        "--labels",
        "negative,positive",
        "--data",
        str(bad),
    )
    assert result.returncode == 2
    assert (
        f"{bad}:2" in result.stderr
        and "unknown label" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_cli_unknown_hub_model_fails_clearly():
    import os

    # offline mode makes the hub refusal immediate instead of a retry loop; the path is the same
    result = _cli(
        "info", "--model", "no-such-org/no-such-model", env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert (
        result.returncode == 2
        and "no-such-org/no-such-model" in result.stderr
        and "Traceback" not in result.stderr
    )


def _few_rows(tmp_path):
    path = tmp_path / "few.jsonl"
    rows = [
        ("a joy to watch", 1),
        ("dreadful", 0),
        ("superb acting", 1),
        ("boring mess", 0),
        ("great fun", 1),
        ("awful", 0),
    ]
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path
