"""Checks that need an NVIDIA GPU. Where CUDA is absent they are deselected (conftest), not skipped:
CI has no GPU; run them on one with `make test-cuda`."""

from __future__ import annotations

import pytest
import torch

from softprompt.prompting.prompted import PromptedModel

pytestmark = pytest.mark.cuda

PROMPT_LENGTH = 16


def _left_padded_batch(longest: int, rows: int = 8, seed: int = 0):
    """Rows of 3..`longest` tokens, left-padded, each labelled on its last token."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(3, longest, rows).round().long()
    ids = torch.zeros(rows, longest, dtype=torch.long)
    mask = torch.zeros(rows, longest, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        ids[row, longest - length :] = torch.randint(4, 128, (length,), generator=generator)
        mask[row, longest - length :] = 1
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return ids.cuda(), mask.cuda(), labels.cuda()


def _attention_shaped_like_smollm2():
    """Two layers with SmolLM2's head size (64): the shape the cuDNN kernel serves."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).cuda().eval()


@pytest.mark.parametrize("width", [64, 192])
def test_bf16_prompt_gradients_stay_finite_when_the_padded_width_is_64_mod_128(width):
    # pytorch#196678: on H100/H200 cuDNN's SDPA backward returns NaN for a query row that attends
    # to nothing (left padding) when the width is 64 mod 128; bf16 prompt training collapsed there.
    prompted = PromptedModel(
        _attention_shaped_like_smollm2(), {"t": torch.randn(PROMPT_LENGTH, 256)}
    )
    prompted.cuda()
    ids, mask, labels = _left_padded_batch(width - PROMPT_LENGTH)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = prompted.loss(ids, mask, "t", labels)
    loss.backward()
    grad = prompted.table.prompts[0].grad
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), f"non-finite at width {width}"
    assert grad.abs().sum() > 0
