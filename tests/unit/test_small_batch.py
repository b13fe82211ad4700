"""model/small_batch.py: the transposed product for decode steps of a few rows on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from softprompt.model.small_batch import SMALL_ROWS, SmallBatchLinear, use_small_batch_matmul
from softprompt.serving.engine import Engine, GenerationRequest

from ..conftest import build_tiny_model, build_tiny_tokenizer


@pytest.mark.parametrize(
    "shape", [(1, 1), (2, 1), (3, 1), (SMALL_ROWS, 1), (SMALL_ROWS + 1, 1), (1, 15), (4, 10)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_small_batch_linear_equals_the_plain_layer(shape, bias):
    torch.manual_seed(sum(shape))
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape, 24)  # (B, positions, d): (B, 1, d) is a decoding step
    expected = F.linear(x, layer.weight, layer.bias)
    use_small_batch_matmul(layer)
    assert type(layer) is SmallBatchLinear
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (*shape, 40)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradients_take_the_plain_path_and_switching_back_restores_the_class():
    layer = nn.Linear(8, 4)
    use_small_batch_matmul(layer)
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()  # the plain kernel: gradients flow as always
    assert x.grad is not None and layer.weight.grad is not None
    assert use_small_batch_matmul(layer, enabled=False) == 1 and type(layer) is nn.Linear


def test_only_plain_linear_layers_change():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.Embedding(3, 4))
    assert use_small_batch_matmul(model) == 1
    assert [type(m) for m in model] == [SmallBatchLinear, Custom, nn.Embedding]


def test_engine_generation_on_cpu_equals_the_unchanged_model():
    plain, switched = (
        build_tiny_model("llama"),
        build_tiny_model("llama"),
    )  # same seed: same weights
    tokenizer = build_tiny_tokenizer()
    engine = Engine((switched, tokenizer))
    assert any(type(m) is SmallBatchLinear for m in switched.modules())
    texts = ["the movie was", "a boring plot and", "fun"]
    results = engine.generate([GenerationRequest(t, max_new_tokens=8) for t in texts])
    for text, result in zip(texts, results, strict=True):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        expected = plain.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        assert result.token_ids == expected[0, ids.shape[1] :].tolist()
    assert not any(type(m) is SmallBatchLinear for m in plain.modules())


def test_only_decoding_steps_take_the_transposed_product(monkeypatch):
    layer = nn.Linear(24, 40)
    use_small_batch_matmul(layer)
    calls = []
    plain_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(a[1].shape) or plain_mm(*a))
    with torch.no_grad():
        for shape in [(2, 1), (SMALL_ROWS, 1), (SMALL_ROWS + 1, 1), (1, 15)]:
            layer(torch.randn(*shape, 24))
    layer(torch.randn(2, 1, 24))  # gradients on: the plain kernel
    assert calls == [(24, 2), (24, SMALL_ROWS)]
