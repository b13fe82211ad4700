"""What a soft prompt "means": nearest vocabulary tokens per virtual token, norms, task similarity.

Soft prompts usually drift off the token manifold, so nearest tokens are a hint, not a decoding;
the cosine similarity says how far each virtual token still is from any real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def nearest_tokens(
    vocab: torch.nn.Module, tokenizer, prompt: torch.Tensor, k: int = 5
) -> list[list[tuple[str, float]]]:
    """For each virtual token of `prompt` [n, d]: the k real tokens closest in cosine similarity
    (`vocab`: the model's input-embedding module, `model.get_input_embeddings()`)."""
    ids = torch.arange(vocab.weight.shape[0], device=vocab.weight.device)
    table = F.normalize(vocab(ids).float(), dim=-1)  # (V, d) as the model embeds them
    sims = F.normalize(prompt.float().to(table.device), dim=-1) @ table.T  # (n, V)
    top = sims.topk(k, dim=-1)
    return [
        [
            (tokenizer.decode([int(i)]), round(float(s), 4))
            for i, s in zip(row_ids, row_sims, strict=True)
        ]
        for row_ids, row_sims in zip(top.indices, top.values, strict=True)
    ]


@torch.no_grad()
def embedding_norm_stats(vocab: torch.nn.Module) -> dict:
    """Mean and spread of real token embedding norms, the scale a prompt's norms compare to
    (`vocab`: the model's input-embedding module)."""
    weight = vocab(torch.arange(vocab.weight.shape[0], device=vocab.weight.device)).float()
    norms = weight.norm(dim=-1)
    return {"mean": round(float(norms.mean()), 4), "std": round(float(norms.std()), 4)}


def task_similarity(prompts: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Cosine similarity between tasks' mean-pooled prompts (which tasks learned alike)."""
    pooled = {name: F.normalize(p.float().mean(0), dim=0) for name, p in prompts.items()}
    return {
        a: {b: round(float(pa @ pb), 4) for b, pb in pooled.items()} for a, pa in pooled.items()
    }


def inspect_prompts(model, tokenizer, prompts: dict[str, torch.Tensor], k: int = 5) -> dict:
    """Everything `softprompt inspect` reports, as one JSON-ready dict."""
    return {
        "embedding_norms": embedding_norm_stats(model.get_input_embeddings()),
        "tasks": {
            name: {
                "shape": list(p.shape),
                "norms": [round(float(x), 4) for x in p.float().norm(dim=-1)],
                "nearest_tokens": nearest_tokens(model.get_input_embeddings(), tokenizer, p, k),
            }
            for name, p in prompts.items()
        },
        "similarity": task_similarity(prompts) if len(prompts) > 1 else {},
    }
