"""Decoding steps of a few rows on CPU at the cost of one row.

A decoding step multiplies every weight matrix by a handful of vectors (one per running row).
With MKL's sgemm on CPU, `x @ W.T` with 2-8 rows costs up to twice the one-row product (gemv):
on this project's 2-core AMD EPYC a SmolLM2-135M decoding step took 127 ms with two rows and
168 ms with four, against 83 ms with one, so a short request joining a running generation made
every step it shared dearer. Taken as `(W @ x.T).T` the same product cost 86 and 104 ms
(`bench/serve_mixed.py`, which times both side by side: `decode_step_ms_by_rows` in
bench/results/serve_mixed.json). Continuous batching (scheduler.py) exists to share steps, so on
CPU the engine computes a decoding step's products this way (`Engine(small_batch_matmul=False)`
keeps the library's kernel).

Only `torch.nn.Linear` modules of exactly that type change, only while gradients are off (the
trainer never takes this path) and only for inputs shaped like a decoding step: one position per
row, at most SMALL_ROWS rows. A prefill's many positions keep the library's kernel, which is the
faster one there (measured: a 15-token prefill 158-165 ms with it, 208-214 ms transposed). The
result is the same product, so outputs agree with the plain layer to float rounding (the
engine's tests compare rows batched with the same rows alone, both through this path).
"""

from __future__ import annotations

import torch
from torch import nn

SMALL_ROWS = 16
"""Decoding steps of up to this many rows take the transposed product (the default
--max-batch-size; at 8 and 16 rows the two kernels measured about the same)."""


class SmallBatchLinear(nn.Linear):
    """nn.Linear whose no-grad forward over a decoding step's input (B, 1, d), B <= SMALL_ROWS,
    is (W @ x.T).T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        one_position = x.dim() < 2 or x.shape[-2] == 1
        if torch.is_grad_enabled() or not one_position or not 0 < rows <= SMALL_ROWS:
            return super().forward(x)
        out = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()  # (rows, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def use_small_batch_matmul(model: nn.Module, enabled: bool = True) -> int:
    """Switch the model's plain Linear layers to (or back from) SmallBatchLinear; returns how
    many changed. Only for a model on CPU (elsewhere the library's kernels are left alone)."""
    if enabled and next(model.parameters()).device.type != "cpu":
        return 0
    old, new = (nn.Linear, SmallBatchLinear) if enabled else (SmallBatchLinear, nn.Linear)
    changed = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            changed += 1
    return changed


__all__ = ["SMALL_ROWS", "SmallBatchLinear", "use_small_batch_matmul"]
