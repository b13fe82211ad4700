"""The real Gemma-3-270M (scales embeddings inside its embedding module): injection stays exact."""

from __future__ import annotations

import pytest
import torch

from softprompt.prompting import inject
from softprompt.prompting.prompted import PromptedModel
from softprompt.prompting.soft import PromptTuningConfig

from .conftest import gemma_installed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not gemma_installed(), reason="gemma3-270m packages not installed"),
]


@pytest.fixture(scope="module")
def gemma():
    from softprompt.model.loading import load_model

    return load_model("gemma3-270m")


def test_gemma_text_init_includes_embedding_scale(gemma):
    prompted = PromptedModel(
        gemma,
        {
            "t": PromptTuningConfig(
                num_virtual_tokens=4,
                prompt_tuning_init="text",
                prompt_tuning_init_text="Classify the sentiment",
            )
        },
    )
    ids = gemma.tokenizer("Classify the sentiment", add_special_tokens=False)["input_ids"][:4]
    raw = gemma.model.get_input_embeddings().weight[ids]
    values = prompted.table.get("t").detach()
    assert not torch.allclose(
        values, raw
    )  # Gemma multiplies by sqrt(d) inside its embedding module
    torch.testing.assert_close(
        values, gemma.model.get_input_embeddings()(torch.tensor(ids)).float()
    )


def test_gemma_mixed_batch_and_kv_prefix_equal_alone(gemma, monkeypatch):
    prompted = PromptedModel(
        gemma,
        {
            "a": PromptTuningConfig(
                num_virtual_tokens=6,
                prompt_tuning_init="text",
                prompt_tuning_init_text="Answer in French:",
            ),
            "b": PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="random"),
        },
    )
    texts = ["The weather today is", "My favourite food is pizza because"]
    mixed = prompted.generate(texts, ["a", "b"], max_new_tokens=6)
    assert mixed[0] == prompted.generate(texts[:1], "a", max_new_tokens=6)[0]
    assert mixed[1] == prompted.generate(texts[1:], "b", max_new_tokens=6)[0]
    enc = gemma.tokenizer(texts, return_tensors="pt", padding=True)
    prefixes = [inject.prompt_prefix(gemma.model, prompted.table.get(t)) for t in ("a", "b")]
    calls = []
    prefix_forward = inject.prefix_forward
    monkeypatch.setattr(
        inject, "prefix_forward", lambda *a, **k: calls.append(1) or prefix_forward(*a, **k)
    )
    cached = inject.generate(
        gemma.model, enc["input_ids"], enc["attention_mask"], prefixes=prefixes, max_new_tokens=6
    )
    assert calls == [
        1
    ]  # the cached-prefix path ran (not the exact fallback that injects the prompt)
    monkeypatch.undo()
    injected = prompted.generate_ids(
        enc["input_ids"], enc["attention_mask"], ["a", "b"], max_new_tokens=6, eos_token_ids=()
    )
    assert cached == injected
