"""The one seam where soft prompts meet the model: forward, loss, KV prefix and generation.

Layout rule (padding-correct, unlike peft#1093): each row is rebuilt *left-padded* as
`[pad ... pad | soft prompt | real tokens]`, so the prompt sits directly before the real tokens
whatever padding side the caller used, and position ids count real positions only (the prompt
starts at 0). A row with task id NO_TASK gets a zero-length prompt and is exactly the plain model.

Only public transformers arguments are used: `inputs_embeds`, `attention_mask`, `position_ids`,
`cache` (transformers' KV-cache argument), `logits_to_keep`. Nothing is monkey-patched.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from softprompt.errors import IncompatiblePromptError

IGNORE_INDEX = -100


@dataclass
class InjectedBatch:
    """Model inputs with soft prompts in place, plus the map back to the caller's layout."""

    inputs_embeds: torch.Tensor  # (B, C, d) model dtype
    attention_mask: torch.Tensor  # (B, C) 1 on prompt and real tokens
    position_ids: torch.Tensor  # (B, C) 0 at the first prompt token
    token_columns: torch.Tensor  # (B, L) column of each caller token in C; C for padding
    prompt_lengths: torch.Tensor  # (B,)
    labels: torch.Tensor | None = None  # (B, C) IGNORE_INDEX over prompt and padding

    def real_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, C, V] back in the caller's layout [B, L, V] (zeros at padding)."""
        padded = torch.cat([logits, logits.new_zeros(logits.shape[0], 1, logits.shape[2])], 1)
        index = self.token_columns.unsqueeze(-1).expand(-1, -1, logits.shape[2])  # (B, L, V)
        return padded.gather(1, index)


def inject(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompts: torch.Tensor,
    prompt_lengths: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> InjectedBatch:
    """Place each row's soft prompt directly before its real tokens.

    input_ids, attention_mask, labels: (B, L), any padding side. prompts: (B, N, d) fp32,
    right-padded, row b uses its first prompt_lengths[b] vectors (0 = no prompt).
    """
    embed = model.get_input_embeddings()
    real = attention_mask.bool()  # (B, L)
    total = real.sum(1) + prompt_lengths  # (B,)
    width = int(total.max())  # C
    offset = width - total  # (B,) left padding of each row
    rank = real.long().cumsum(1) - 1  # (B, L) index of each real token among the real ones
    token_columns = torch.where(real, (offset + prompt_lengths)[:, None] + rank, width)
    slot = torch.arange(prompts.shape[1], device=prompts.device)  # (N,)
    prompt_columns = torch.where(
        slot[None] < prompt_lengths[:, None], offset[:, None] + slot, width
    )

    token_embeds = embed(input_ids)  # (B, L, d)
    sources, columns = token_embeds, token_columns
    if prompts.shape[1]:
        sources = torch.cat([prompts.to(token_embeds.dtype), token_embeds], 1)  # (B, N+L, d)
        columns = torch.cat([prompt_columns, token_columns], 1)  # (B, N+L)
    index = columns.unsqueeze(-1).expand(-1, -1, sources.shape[2])
    canvas = sources.new_zeros(len(input_ids), width + 1, sources.shape[2])  # last column = bin
    inputs_embeds = canvas.scatter(1, index, sources)[:, :width]  # (B, C, d)

    positions = torch.arange(width, device=input_ids.device)[None] - offset[:, None]  # (B, C)
    return InjectedBatch(
        inputs_embeds=inputs_embeds,
        attention_mask=(positions >= 0).long(),
        position_ids=positions.clamp(min=0),
        token_columns=token_columns,
        prompt_lengths=prompt_lengths,
        labels=None if labels is None else _move_labels(labels, token_columns, width),
    )


def _move_labels(labels: torch.Tensor, token_columns: torch.Tensor, width: int) -> torch.Tensor:
    moved = labels.new_full((labels.shape[0], width + 1), IGNORE_INDEX)
    return moved.scatter(1, token_columns, labels)[:, :width]  # (B, C)


# Every attention kernel but cuDNN's. On H100/H200 (torch 2.11+) cuDNN's SDPA backward returns NaN
# when a query row attends to nothing -- a left-padded row's padding -- and the padded width is
# 64 mod 128 (pytorch#196678): every such bf16 training step lost its gradient
# (bench/results/cuda_attention_nan.json). Flash / memory-efficient attention serve instead; CPUs
# never pick cuDNN, so they are left alone.
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def run_model(model, **inputs):
    """`model(**inputs)`: the one place softprompt calls a model, so every call avoids the broken kernel."""
    on_cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in inputs.values())
    with sdpa_kernel(_ATTENTION_BACKENDS) if on_cuda else nullcontext():
        return model(**inputs)


def forward(model, batch: InjectedBatch, *, logits_to_keep: int = 0, **kwargs):
    """Run the model on an injected batch (logits for the last `logits_to_keep` columns, 0 = all)."""
    return run_model(
        model,
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=logits_to_keep,
        **kwargs,
    )


def label_window(labels: torch.Tensor) -> int:
    """How many trailing columns' logits the loss needs: from the column before the first label."""
    has_label = (labels != IGNORE_INDEX).any(0)  # (C,)
    if not has_label.any():
        return 1
    first = int(has_label.nonzero()[0])
    return labels.shape[1] - max(first - 1, 0)


def loss(model, batch: InjectedBatch, *, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on the labelled tokens only.

    With the left-padded layout every row ends at the last column, so the targets of a
    classification batch sit in a few trailing columns: computing logits only there skips most of
    the LM-head matmul and softmax (a vocabulary of 49k-262k rows).
    """
    keep = label_window(batch.labels)
    logits = forward(model, batch, logits_to_keep=keep, use_cache=False).logits  # (B, keep, V)
    return label_loss(logits, batch.labels, reduction=reduction)


def label_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of logits [B, keep, V] (the last `keep` columns) against labels [B, C]."""
    keep = logits.shape[1]
    targets = labels[:, -keep + 1 :] if keep > 1 else labels[:, :0]  # (B, keep-1)
    per_token = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    if reduction == "none":  # summed log-loss per row (rank classification)
        return per_token.sum(1)
    return per_token.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


# ---------------------------------------------------------------- KV prefix


@dataclass(frozen=True)
class PrefixShape:
    """Per-layer KV geometry of a model (a deep prompt's rows are one position's KV in all
    layers, flattened: `row_width` values)."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def row_width(self) -> int:
        """Values per virtual token: layers x (key, value) x kv_heads x head_dim."""
        return self.layers * 2 * self.kv_heads * self.head_dim

    def numel(self, n: int) -> int:
        return n * self.row_width


@dataclass
class PromptPrefix:
    """Keys and values of one soft prompt, computed once: they do not depend on the input."""

    keys: list[torch.Tensor]  # per layer (H_kv, n, hd)
    values: list[torch.Tensor]  # per layer (H_kv, n, hd)
    prompt: torch.Tensor | None  # (n, d) the soft prompt itself, for the exact fallback;
    # None for a deep prompt (its KV is the prompt: there is nothing to inject instead)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


@torch.no_grad()
def prompt_prefix(model, prompt: torch.Tensor) -> PromptPrefix:
    """KV of `prompt` [n, d] at positions 0..n-1, as the model computes them mid-sequence."""
    embeds = prompt.to(model.get_input_embeddings().weight.dtype)[None]  # (1, n, d)
    positions = torch.arange(prompt.shape[0], device=embeds.device)[None]
    out = run_model(
        model, inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    layers = out.cache.layers
    return PromptPrefix(
        [layer.keys[0] for layer in layers],
        [layer.values[0] for layer in layers],
        prompt.detach().float(),
    )


@torch.no_grad()
def prompt_prefixes(model, prompts: list[torch.Tensor]) -> list[PromptPrefix]:
    """`prompt_prefix` of several prompts [n_i, d], one forward per length: prompts of one length
    need no padding, so each row's KV is what it alone gives, to float rounding. What a batch of
    tasks seen for the first time costs: one forward instead of one per task."""
    found: list[PromptPrefix | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(prompt.shape[0], []).append(i)
    dtype = model.get_input_embeddings().weight.dtype
    for n, rows in by_length.items():
        embeds = torch.stack([prompts[i] for i in rows]).to(dtype)  # (k, n, d)
        positions = torch.arange(n, device=embeds.device)[None].expand(len(rows), n)
        out = run_model(
            model, inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        layers = out.cache.layers
        for b, i in enumerate(rows):  # copies: one evicted prefix must not pin the whole batch
            keys = [layer.keys[b].clone() for layer in layers]
            values = [layer.values[b].clone() for layer in layers]
            found[i] = PromptPrefix(keys, values, prompts[i].detach().float())
    return found


def prefix_is_exact(model, width: int) -> bool:
    """Whether a cached prefix gives the same result as injecting the prompt for `width` columns.

    With a cached prefix, padding sits *between* prompt and tokens. Full attention ignores masked
    columns, but a sliding window (Gemma 3's local layers) counts columns, so the gap could push
    prompt keys out of the window; then callers must inject the prompt instead.
    """
    window = sliding_window(model.config)
    return window is None or width <= window


def sliding_window(config) -> int | None:
    """The window of the model's sliding-window layers (Gemma 3's local ones); None without any.
    The one place that decides it: exactness, merging and the vLLM gateway all ask here."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    has_sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    return window if window and has_sliding else None


def batch_cache(model, prefixes: list[PromptPrefix | None]) -> tuple[DynamicCache, torch.Tensor]:
    """A fresh cache holding each row's prefix right-aligned in N columns, and its mask (B, N)."""
    width = max((p.length for p in prefixes if p is not None), default=0)
    lengths = torch.tensor([p.length if p is not None else 0 for p in prefixes])
    mask = (torch.arange(width)[None] >= (width - lengths)[:, None]).long()  # (B, N)
    cache = DynamicCache(config=model.config)
    reference = next(p for p in prefixes if p is not None and p.length > 0)
    for layer in range(len(reference.keys)):
        keys = _stack_right_aligned(
            [p.keys[layer] if p else None for p in prefixes], width, reference.keys[layer]
        )
        values = _stack_right_aligned(
            [p.values[layer] if p else None for p in prefixes], width, reference.values[layer]
        )
        cache.update(keys, values, layer)
    return cache, mask.to(reference.keys[0].device)


def _stack_right_aligned(rows, width: int, like: torch.Tensor) -> torch.Tensor:
    heads, _, dim = like.shape
    out = like.new_zeros(len(rows), heads, width, dim)  # (B, H_kv, N, hd)
    for b, row in enumerate(rows):
        if row is not None and row.shape[1]:
            out[b, :, width - row.shape[1] :] = row
    return out


def pad_prompts(
    prompts: list[torch.Tensor | None], width: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt [n_b, width] (None: no prompt) right-padded with zeros: values (B, N, width)
    and lengths (B,). The one way prompts of different lengths become a batch."""
    lengths = torch.tensor([0 if p is None else p.shape[0] for p in prompts], device=device)
    n_max = int(lengths.max()) if len(prompts) else 0
    if n_max == 0:
        return torch.zeros(len(prompts), 0, width, device=device), lengths
    return torch.stack([_pad_rows(p, n_max, width, device) for p in prompts]), lengths


def _pad_rows(prompt: torch.Tensor | None, n: int, width: int, device) -> torch.Tensor:
    if prompt is None:
        return torch.zeros(n, width, device=device)
    prompt = prompt.to(device)
    if prompt.shape[0] == n:
        return prompt
    return torch.cat([prompt, prompt.new_zeros(n - prompt.shape[0], width)])  # (n, width)


@dataclass
class PromptInputs:
    """How a batch's prompts enter the forward pass, as a prompt kind hands them over: input
    embeddings (`prompts` (B, N, d) fp32 right-padded, `prompt_lengths` (B,)) or per-layer KV
    prefixes (`prefixes`, one per row or None). Neither: no row has a prompt (the plain model)."""

    prompts: torch.Tensor | None = None
    prompt_lengths: torch.Tensor | None = None
    prefixes: list[PromptPrefix | None] | None = None


def exact_inputs(model, inputs: PromptInputs, columns: int, shorten: str) -> PromptInputs:
    """`inputs` as they may enter a forward over `columns` columns after the prompt: the one
    sliding-window check (`prefix_is_exact`). Past the window a soft prompt's cached prefix is
    replaced by the prompt itself, injected as embeddings (never silently inexact); a deep
    prompt, which has nothing to inject instead, is refused with what to `shorten`."""
    prefixes = inputs.prefixes
    if prefixes is None:
        return inputs
    if not any(p is not None and p.length for p in prefixes):
        return PromptInputs()
    width = max(p.length for p in prefixes if p is not None) + columns
    if prefix_is_exact(model, width):
        return inputs
    if any(p is not None and p.prompt is None for p in prefixes):
        raise IncompatiblePromptError(
            f"a deep prompt over {width} columns exceeds this model's sliding window; "
            f"shorten {shorten}"
        )
    ref = next(p.prompt for p in prefixes if p is not None)
    prompts, lengths = pad_prompts(
        [p.prompt if p is not None else None for p in prefixes], ref.shape[1], ref.device
    )
    return PromptInputs(prompts, lengths)


def prompt_logits(
    model, input_ids, attention_mask, inputs: PromptInputs, *, keep: int = 0
) -> torch.Tensor:
    """Logits with each row's prompt in place, however it enters: [B, L, V] in the caller's
    layout (keep = 0), or [B, keep, V] for the last `keep` columns of left-padded rows (the LM
    head runs on those only; what the scorer reads)."""
    inputs = exact_inputs(model, inputs, input_ids.shape[1], "the inputs")
    if inputs.prefixes is not None:
        out, _, plain = prefix_forward(
            model, input_ids, attention_mask, inputs.prefixes, use_cache=True, logits_to_keep=keep
        )
        return out.logits if keep else plain.real_logits(out.logits)
    batch = _embedded(model, input_ids, attention_mask, inputs)
    out = forward(model, batch, logits_to_keep=keep, use_cache=False)
    return out.logits if keep else batch.real_logits(out.logits)


def prompt_loss(
    model, input_ids, attention_mask, labels, inputs: PromptInputs, *, reduction: str = "mean"
) -> torch.Tensor:
    """Training loss with each row's prompt in place, however it enters (`loss`, `prefix_loss`)."""
    inputs = exact_inputs(model, inputs, input_ids.shape[1], "the inputs")
    if inputs.prefixes is not None:
        return prefix_loss(
            model, input_ids, attention_mask, labels, inputs.prefixes, reduction=reduction
        )
    batch = _embedded(model, input_ids, attention_mask, inputs, labels)
    return loss(model, batch, reduction=reduction)


def _embedded(model, input_ids, attention_mask, inputs: PromptInputs, labels=None):
    if inputs.prompts is None:
        return _tokens_only(model, input_ids, attention_mask, labels)
    return inject(model, input_ids, attention_mask, inputs.prompts, inputs.prompt_lengths, labels)


def prefix_forward(model, input_ids, attention_mask, prefixes: list[PromptPrefix | None], **kwargs):
    """Forward the caller's tokens on top of cached prompt prefixes (same result as `inject`).

    Tokens are left-padded after the N prefix columns; padding between prefix and tokens is
    masked out and position ids continue from each row's own prompt length, so the model sees
    exactly `[prompt | tokens]`. Returns (model output, full attention mask, last positions).
    """
    plain = _tokens_only(model, input_ids, attention_mask)
    out, mask = _forward_after_prefixes(model, plain, prefixes, **kwargs)
    return out, mask, plain


def prefix_loss(
    model,
    input_ids,
    attention_mask,
    labels,
    prefixes: list[PromptPrefix | None],
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """`loss` with the prompts entering as KV prefixes; gradients reach the prefix tensors
    (this is how deep prompts train). A label on a row's very first token is not scored: its
    prediction would come from the cached prefix (targets follow an input, so this never bites)."""
    plain = _tokens_only(model, input_ids, attention_mask, labels)
    keep = label_window(plain.labels)
    out, _ = _forward_after_prefixes(model, plain, prefixes, logits_to_keep=keep, use_cache=True)
    return label_loss(out.logits, plain.labels, reduction=reduction)


def _tokens_only(model, input_ids, attention_mask, labels=None) -> InjectedBatch:
    """The caller's tokens left-padded with no prompt: the layout that follows a cached prefix."""
    no_prompt = input_ids.new_zeros(len(input_ids))
    empty = torch.zeros(len(input_ids), 0, 1, device=input_ids.device)
    return inject(model, input_ids, attention_mask, empty, no_prompt, labels)


def _forward_after_prefixes(
    model, plain: InjectedBatch, prefixes: list[PromptPrefix | None], **kwargs
):
    cache, prefix_mask = batch_cache(model, prefixes)  # prefix_mask (B, N)
    positions = plain.position_ids + prefix_mask.sum(1, keepdim=True)  # (B, L')
    mask = torch.cat([prefix_mask, plain.attention_mask], 1)  # (B, N + L')
    out = run_model(
        model,
        inputs_embeds=plain.inputs_embeds,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        **kwargs,
    )
    return out, mask


# ---------------------------------------------------------------- generation


SAMPLING_EPS = 1e-5
"""A temperature or top_p below this samples greedily (vLLM's `_SAMPLING_EPS` for temperature).
Greedy is their limit, and smaller values break the arithmetic: logits / 1e-300 overflow, and a
top_p of 1e-300 is 0 in float32 and keeps no token. (A top_p below 1e-5 keeps the top token
alone unless that token is under 1e-5 likely, i.e. a nearly flat distribution over > 100k.)"""


@dataclass
class Sampling:
    """How one row picks its next token. Values below `SAMPLING_EPS` are set to their limit,
    greedy, when the settings are made: every backend (this sampler, the vLLM gateway) reads
    these fields, so all of them treat such values alike and none meets one it mishandles."""

    temperature: float = 0.0
    """0 = greedy (argmax); above 0 = sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of this row's own random generator (reproducible whatever else is in the batch)."""

    def __post_init__(self):
        if self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS:
            self.temperature, self.top_p = 0.0, 1.0  # greedy; as in vLLM, top_p plays no part


class TokenPicker:
    """Greedy or sampled next tokens, each row with its own settings and generator.

    Rows can leave (`select`) and join (`+`) between steps: a row keeps its generator, so its
    samples never depend on what else is in the batch."""

    def __init__(self, sampling: list[Sampling], generators: list | None = None):
        self.sampling = list(sampling)
        self.generators = (
            generators
            if generators is not None
            else [
                torch.Generator().manual_seed(s.seed) if s.seed is not None else None
                for s in self.sampling
            ]
        )

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
        greedy = logits.argmax(-1)
        picks = [
            self._sample(logits[b], b) if s.temperature > 0 else greedy[b]
            for b, s in enumerate(self.sampling)
        ]
        return torch.stack(picks)

    def select(self, rows: list[int]) -> TokenPicker:
        return TokenPicker([self.sampling[r] for r in rows], [self.generators[r] for r in rows])

    def __add__(self, other: TokenPicker) -> TokenPicker:
        return TokenPicker(self.sampling + other.sampling, self.generators + other.generators)

    def _sample(self, logits: torch.Tensor, row: int) -> torch.Tensor:
        s = self.sampling[row]
        # float64: logits / temperature (>= SAMPLING_EPS) can neither overflow nor underflow
        probs = torch.softmax(logits.double().cpu() / s.temperature, -1)  # (V,)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True, stable=True)  # ties: argmax's first
            outside = sorted_probs.cumsum(0) - sorted_probs >= s.top_p
            outside[0] = False  # the top token always stays, whatever the rounding
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        pick = torch.multinomial(probs, 1, generator=self.generators[row])[0]
        return pick.to(logits.device)


@dataclass
class DecodeState:
    """A batch of generating rows between two steps.

    Every row ends at the cache's last column (left-aligned layout, as `inject` builds it), so
    rows can leave (`select_rows`) and batches can join (`merge_states`) between steps: a row's
    own columns, positions and mask never change, only the padding on its left.
    """

    cache: DynamicCache
    mask: torch.Tensor  # (B, T) 1 on each row's prompt, input and generated columns
    positions: torch.Tensor  # (B,) position id of each row's last token
    logits: torch.Tensor  # (B, V) each row's next-token logits

    def __len__(self) -> int:
        return len(self.mask)


@torch.no_grad()
def prefill(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    prompts: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
    prefixes: list[PromptPrefix | None] | None = None,
    max_new_tokens: int = 0,
) -> DecodeState:
    """Run the rows' prompts and inputs once: the state from which they decode.

    The prompt enters either as embeddings (`prompts`, `prompt_lengths`) or as cached KV
    (`prefixes`, one per row or None). Where a cached prefix would not be exact over the
    `max_new_tokens` to come (a sliding window), the prompts are injected instead; a deep
    prompt, which has nothing to inject, is refused.
    """
    inputs = exact_inputs(
        model,
        PromptInputs(prompts, prompt_lengths, prefixes),
        input_ids.shape[1] + max_new_tokens,
        "the input or max_new_tokens",
    )
    if inputs.prefixes is not None:
        out, mask, plain = prefix_forward(
            model, input_ids, attention_mask, inputs.prefixes, use_cache=True, logits_to_keep=1
        )
        positions = plain.position_ids[:, -1] + mask[:, : -plain.attention_mask.shape[1]].sum(1)
    else:
        batch = _embedded(model, input_ids, attention_mask, inputs)
        out = forward(model, batch, logits_to_keep=1, use_cache=True)
        mask, positions = batch.attention_mask, batch.position_ids[:, -1]
    return DecodeState(out.cache, mask, positions, out.logits[:, -1])


@torch.no_grad()
def decode(model, state: DecodeState, next_ids: torch.Tensor) -> DecodeState:
    """Feed each row's new token (B,): the state one column further, with the next logits.

    The cache grows in place, layer by layer; if the forward raises, full-attention layers are
    cut back to their columns before it, so the state is as it was and its rows can be fed again
    (a sliding-window layer drops old columns as it grows: it cannot be restored).
    """
    mask = torch.cat([state.mask, state.mask.new_ones(len(state), 1)], 1)  # (B, T+1)
    positions = state.positions + 1
    try:
        out = run_model(
            model,
            input_ids=next_ids[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            cache=state.cache,
            use_cache=True,
        )
    except Exception:
        _cut_columns(state.cache, state.mask.shape[1])
        raise
    return DecodeState(out.cache, mask, positions, out.logits[:, -1])


def _cut_columns(cache: DynamicCache, width: int) -> None:
    """Keep the first `width` columns of every full-attention layer (keys and values apart: a
    forward may fail between the two)."""
    for layer in cache.layers:
        if type(layer) is DynamicLayer and layer.is_initialized:
            layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]


def can_merge(model) -> bool:
    """Whether batches of this model can join between steps. A sliding-window cache keeps only
    its last columns per layer (and counts columns for the window), so its rows are never merged."""
    return sliding_window(model.config) is None


def select_rows(state: DecodeState, rows: list[int]) -> DecodeState:
    """Keep `rows` (indices into the batch), dropping the columns no remaining row uses."""
    index = torch.tensor(rows, device=state.mask.device)
    state.cache.batch_select_indices(index)
    mask = state.mask[index]
    first = int(mask.any(0).long().argmax())  # leading columns that are padding for every row
    if first and _plain_layers(state.cache):
        for layer in state.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        mask = mask[:, first:]
    return DecodeState(state.cache, mask, state.positions[index], state.logits[index])


def copy_rows(state: DecodeState, rows: list[int]) -> DecodeState:
    """`select_rows` on a copy: `state` stays as it was (for running some rows apart from their
    batch). Only the selected rows' keys and values are copied."""
    cache = copy.copy(state.cache)
    cache.layers = [copy.copy(layer) for layer in state.cache.layers]  # each layer's tensors
    # are replaced, never written, by `batch_select_indices` and `update`
    return select_rows(DecodeState(cache, state.mask, state.positions, state.logits), rows)


def merge_states(a: DecodeState, b: DecodeState) -> DecodeState:
    """One batch of the rows of `a` then `b`: the narrower side is left-padded (masked keys and
    values of zeros), which leaves each row's own columns, positions and results unchanged."""
    if not (_plain_layers(a.cache) and _plain_layers(b.cache)):
        raise ValueError("only full-attention dynamic caches can be merged (see can_merge)")
    width = max(a.mask.shape[1], b.mask.shape[1])
    for left, right in zip(a.cache.layers, b.cache.layers, strict=True):
        left.keys = torch.cat([_pad_columns(left.keys, width), _pad_columns(right.keys, width)], 0)
        left.values = torch.cat(
            [_pad_columns(left.values, width), _pad_columns(right.values, width)], 0
        )
    mask = torch.cat([_pad_columns(a.mask, width), _pad_columns(b.mask, width)], 0)  # (Ba+Bb, W)
    return DecodeState(
        a.cache, mask, torch.cat([a.positions, b.positions]), torch.cat([a.logits, b.logits])
    )


def _plain_layers(cache: DynamicCache) -> bool:
    """Every layer a full-attention dynamic layer, holding all its columns."""
    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


def _pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the column dim (dim 2 of keys (B, H, T, hd), dim 1 of a mask (B, T))."""
    dim = 2 if values.dim() == 4 else 1
    missing = width - values.shape[dim]
    if not missing:
        return values
    shape = list(values.shape)
    shape[dim] = missing
    return torch.cat([values.new_zeros(shape), values], dim)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    prompts: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
    prefixes: list[PromptPrefix | None] | None = None,
    max_new_tokens: int = 32,
    eos_token_ids: tuple[int, ...] = (),
    sampling: list[Sampling] | None = None,
    should_stop=None,
) -> list[list[int]]:
    """New tokens for each row (an end-of-sequence token is kept, as transformers does).

    The prompt enters as in `prefill`. `should_stop(row, tokens)` ends a row early (stop
    strings); a finished row leaves the batch at once.
    """
    state = prefill(
        model,
        input_ids,
        attention_mask,
        prompts=prompts,
        prompt_lengths=prompt_lengths,
        prefixes=prefixes,
        max_new_tokens=max_new_tokens,
    )
    pick = TokenPicker(sampling or [Sampling()] * len(input_ids))
    tokens: list[list[int]] = [[] for _ in range(len(input_ids))]
    live = list(range(len(input_ids)))  # the caller's row of each batch row
    for step in range(max_new_tokens):
        next_ids = pick(state.logits)  # (B,)
        keep = []
        for i, (row, token) in enumerate(zip(live, next_ids.tolist(), strict=True)):
            tokens[row].append(token)
            done = token in eos_token_ids or bool(should_stop and should_stop(row, tokens[row]))
            if not done and step < max_new_tokens - 1:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(live):
            state, pick, live = select_rows(state, keep), pick.select(keep), [live[i] for i in keep]
        state = decode(model, state, next_ids[keep])
    return tokens


def generate_texts(
    prompted,
    texts: str | list[str],
    tasks=None,
    *,
    max_new_tokens=32,
    temperature=0.0,
    top_p=1.0,
    seed=None,
) -> list[str]:
    """Generated continuations of `texts` from a PromptedModel (anything with `.tokenizer`,
    `.model` and `.generate_ids`), each row with its task's prompt."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    enc = prompted.tokenizer(texts, return_tensors="pt", padding=True)
    device = prompted.model.get_input_embeddings().weight.device
    # Every row gets the same seed, as each request does on the server: a text samples the same
    # continuation from `softprompt generate` and from /v1/completions, whatever else is in the batch.
    sampling = [Sampling(temperature, top_p, seed) for _ in texts]
    ids = prompted.generate_ids(
        enc["input_ids"].to(device),
        enc["attention_mask"].to(device),
        tasks,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
    )
    return prompted.tokenizer.batch_decode(ids, skip_special_tokens=True)
