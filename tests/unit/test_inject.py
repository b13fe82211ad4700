"""Invariants of the injection seam (docs/architecture.md 1-4, 7) on tiny random Llama and Gemma 3 models."""

from __future__ import annotations

import pytest
import torch

from softprompt.prompting import inject
from softprompt.prompting.soft import NO_TASK, PromptTable

from ..conftest import build_tiny_model

ATOL = 1e-5


def _table(d=32, lengths=(4, 3), seed=1):
    torch.manual_seed(seed)
    table = PromptTable()
    for i, n in enumerate(lengths):
        table.add(f"task{i}", torch.randn(n, d) * 0.5)
    return table


def _batch(rows, side="right", pad=0, extra=0):
    """input_ids and mask for token lists, padded on `side` plus `extra` more pad columns."""
    width = max(len(r) for r in rows) + extra
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[b, cols] = torch.tensor(row)
        mask[b, cols] = 1
    return ids, mask


def _real_logits(model, table, rows, task_ids, **pad):
    ids, mask = _batch(rows, **pad)
    prompts, lengths = table.gather(torch.tensor(task_ids))
    batch = inject.inject(model, ids, mask, prompts, lengths)
    with torch.no_grad():
        logits = batch.real_logits(inject.forward(model, batch).logits)
    return [logits[b][mask[b].bool()] for b in range(len(rows))]  # per row (len, V)


ROWS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]


# ---------------------------------------------------------------- 1. frozen


def test_frozen_base_tensors_bit_identical_after_optimizer_step(tiny_model):
    table = _table()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.requires_grad_(False)
    ids, mask = _batch(ROWS[:2])
    labels = ids.masked_fill(mask == 0, -100)
    prompts, lengths = table.gather(torch.tensor([0, 1]))
    optimizer = torch.optim.AdamW(table.parameters(), lr=0.1)
    loss = inject.loss(tiny_model, inject.inject(tiny_model, ids, mask, prompts, lengths, labels))
    loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert all(p.grad is None for p in tiny_model.parameters())
    assert table.get("task0").grad is not None and table.get("task0").grad.abs().sum() > 0


# ---------------------------------------------------------------- 2. mixed batch


def test_mixed_batch_logits_equal_separate_batches(tiny_model):
    table = _table()
    mixed = _real_logits(tiny_model, table, ROWS, [0, 1, NO_TASK])
    alone_a = _real_logits(tiny_model, table, ROWS[:1], [0])[0]
    alone_b = _real_logits(tiny_model, table, ROWS[1:2], [1])[0]
    with torch.no_grad():
        plain = tiny_model(input_ids=torch.tensor([ROWS[2]])).logits[0]
    torch.testing.assert_close(mixed[0], alone_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], alone_b, atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[2], plain, atol=ATOL, rtol=0)


def test_mixed_batch_tasks_really_differ(tiny_model):
    table = _table()
    as_a = _real_logits(tiny_model, table, ROWS[:1], [0])[0]
    as_b = _real_logits(tiny_model, table, ROWS[:1], [1])[0]
    assert (as_a - as_b).abs().max() > 1e-3


def test_mixed_batch_greedy_generation_equals_separate(tiny_model):
    table = _table()
    ids, mask = _batch(ROWS, side="left")
    prompts, lengths = table.gather(torch.tensor([0, 1, NO_TASK]))
    mixed = inject.generate(
        tiny_model, ids, mask, prompts=prompts, prompt_lengths=lengths, max_new_tokens=8
    )
    for b, row in enumerate(ROWS):
        p, n = table.gather(torch.tensor([[0, 1, NO_TASK][b]]))
        alone = inject.generate(
            tiny_model,
            torch.tensor([row]),
            torch.ones(1, len(row), dtype=torch.long),
            prompts=p,
            prompt_lengths=n,
            max_new_tokens=8,
        )
        assert mixed[b] == alone[0]
    assert (
        mixed[0]
        != inject.generate(
            tiny_model,
            torch.tensor([ROWS[0]]),
            torch.ones(1, 6, dtype=torch.long),
            prompts=table.gather(torch.tensor([1]))[0],
            prompt_lengths=torch.tensor([3]),
            max_new_tokens=8,
        )[0]
    )


# ---------------------------------------------------------------- 3. padding


@pytest.mark.parametrize("extra", [0, 5])
def test_padding_left_vs_right_and_extra_padding_same_logits(tiny_model, extra):
    table = _table()
    right = _real_logits(tiny_model, table, ROWS, [0, 1, NO_TASK], side="right")
    left = _real_logits(tiny_model, table, ROWS, [0, 1, NO_TASK], side="left", extra=extra)
    for a, b in zip(right, left, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_padding_that_reaches_the_model_changes_nothing(tiny_model):
    """A long row makes the seam lay the short rows out behind real pad columns (mask 0 in the
    model's input): each row's logits still equal the row alone, which has no padding at all."""
    table = _table()
    rows, task_ids = [*ROWS, list(range(20, 34))], [0, 1, NO_TASK, 1]
    ids, mask = _batch(rows, side="right")
    prompts, lengths = table.gather(torch.tensor(task_ids))
    laid_out = inject.inject(tiny_model, ids, mask, prompts, lengths)
    pad_columns = (laid_out.attention_mask == 0).sum(dim=1)  # (B,)
    assert pad_columns[:3].tolist() == [7, 11, 13]  # padding really reaches the model
    batched = _real_logits(tiny_model, table, rows, task_ids)
    for b, row in enumerate(rows):
        alone = _real_logits(tiny_model, table, [row], [task_ids[b]])[0]
        torch.testing.assert_close(batched[b], alone, atol=ATOL, rtol=0)


def test_padding_prompt_sits_directly_before_real_tokens(tiny_llama):
    table = _table(lengths=(2, 3))
    ids, mask = _batch([[5, 6, 7], [8]], side="right")
    prompts, lengths = table.gather(torch.tensor([0, 1]))
    batch = inject.inject(tiny_llama, ids, mask, prompts, lengths)
    # row 1: 1 real token + 3 prompt vectors in a 5-wide layout -> 1 pad column on the left
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert batch.position_ids[1, 1:].tolist() == [0, 1, 2, 3]
    assert batch.token_columns.tolist() == [[2, 3, 4], [4, 5, 5]]
    torch.testing.assert_close(batch.inputs_embeds[1, 1:4], table.get("task1").detach())


def test_padding_labels_ignore_prompt_and_padding(tiny_llama):
    table = _table(lengths=(2, 3))
    ids, mask = _batch([[5, 6, 7], [8]], side="right")
    labels = torch.tensor([[-100, 6, 7], [8, -100, -100]])
    prompts, lengths = table.gather(torch.tensor([0, 1]))
    batch = inject.inject(tiny_llama, ids, mask, prompts, lengths, labels)
    assert batch.labels.tolist() == [[-100, -100, -100, 6, 7], [-100, -100, -100, -100, 8]]


def test_padding_loss_window_equals_full_logits_loss(tiny_model):
    table = _table()
    ids, mask = _batch(ROWS, side="right")
    labels = torch.full_like(ids, -100)
    labels[0, 4:6], labels[1, 2], labels[2, 3] = ids[0, 4:6], ids[1, 2], ids[2, 3]
    prompts, lengths = table.gather(torch.tensor([0, 1, NO_TASK]))
    batch = inject.inject(tiny_model, ids, mask, prompts, lengths, labels)
    fast = inject.loss(tiny_model, batch)
    logits = inject.forward(tiny_model, batch).logits
    full = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 128), batch.labels[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 4. KV prefix


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_kv_prefix_generation_equals_injected_prompt(kind):
    model = build_tiny_model(kind)
    model.config.sliding_window = 64  # wide enough that the cached path is exact and used
    table = _table()
    ids, mask = _batch(ROWS, side="left")
    task_ids = torch.tensor([0, 1, NO_TASK])
    prompts, lengths = table.gather(task_ids)
    injected = inject.generate(
        model, ids, mask, prompts=prompts, prompt_lengths=lengths, max_new_tokens=8
    )
    prefixes = [
        inject.prompt_prefix(model, table.get("task0")),
        inject.prompt_prefix(model, table.get("task1")),
        None,
    ]
    cached = inject.generate(model, ids, mask, prefixes=prefixes, max_new_tokens=8)
    assert cached == injected
    out, full_mask, plain = inject.prefix_forward(model, ids, mask, prefixes)
    batch = inject.inject(model, ids, mask, prompts, lengths)
    with torch.no_grad():
        reference = inject.forward(model, batch).logits[:, -1]
    torch.testing.assert_close(out.logits[:, -1], reference, atol=ATOL, rtol=0)


def test_kv_prefix_falls_back_when_sliding_window_is_too_short():
    model = build_tiny_model("gemma3")  # sliding_window=8: a padding gap could leave the window
    assert not inject.prefix_is_exact(model, 20)
    table = _table()
    ids, mask = _batch(ROWS, side="left")
    prompts, lengths = table.gather(torch.tensor([0, 1, 0]))
    injected = inject.generate(
        model, ids, mask, prompts=prompts, prompt_lengths=lengths, max_new_tokens=8
    )
    prefixes = [inject.prompt_prefix(model, table.get(f"task{t}")) for t in (0, 1, 0)]
    assert inject.generate(model, ids, mask, prefixes=prefixes, max_new_tokens=8) == injected


# ---------------------------------------------------------------- 7. no prompt == plain model


def test_no_prompt_generation_equals_plain_generate(tiny_model):
    ids, mask = _batch(ROWS, side="left")
    ours = inject.generate(tiny_model, ids, mask, max_new_tokens=8)
    theirs = tiny_model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert ours == theirs[:, ids.shape[1] :].tolist()


def test_sampling_with_seed_is_batch_independent(tiny_llama):
    table = _table()
    ids, mask = _batch(ROWS, side="left")
    prompts, lengths = table.gather(torch.tensor([0, 1, NO_TASK]))
    sampling = [inject.Sampling(temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3)]
    mixed = inject.generate(
        tiny_llama,
        ids,
        mask,
        prompts=prompts,
        prompt_lengths=lengths,
        max_new_tokens=8,
        sampling=sampling,
    )
    p, n = table.gather(torch.tensor([1]))
    alone = inject.generate(
        tiny_llama,
        torch.tensor([ROWS[1]]),
        torch.ones(1, 3, dtype=torch.long),
        prompts=p,
        prompt_lengths=n,
        max_new_tokens=8,
        sampling=[sampling[1]],
    )
    assert mixed[1] == alone[0]
    greedy = inject.generate(
        tiny_llama, ids, mask, prompts=prompts, prompt_lengths=lengths, max_new_tokens=8
    )
    assert mixed != greedy  # sampling really samples


@pytest.mark.parametrize("temperature", [0.0, -0.0, 5e-324, 1e-45, 1e-300, 9.9e-6])
@pytest.mark.parametrize("top_p", [1.0, 5e-324, 1e-45, 1e-300])
def test_sampling_values_below_eps_are_greedy(temperature, top_p):
    sampling = inject.Sampling(temperature, top_p, seed=1)
    assert (sampling.temperature, sampling.top_p) == (0.0, 1.0)  # what every backend reads
    logits = torch.randn(4, 50)  # (B, V)
    picker = inject.TokenPicker([sampling] * 4)
    assert torch.equal(picker(logits), logits.argmax(-1))


@pytest.mark.parametrize("temperature, top_p", [(1e-5, 1.0), (1e-5, 1e-5), (2.0, 1e-5)])
def test_sampler_never_overflows_to_nan_and_tiny_top_p_keeps_the_top_token(temperature, top_p):
    """Logits near float32's limits divided by the smallest sampling temperature overflow in
    float32 (inf / inf = nan); the sampler works in float64."""
    logits = torch.tensor([[3e38, 1e38, -3e38, 0.0], [0.0, 0.0, 5.0, 0.0]])  # (B=2, V=4)
    picker = inject.TokenPicker([inject.Sampling(temperature, top_p, seed=s) for s in (1, 2)])
    for _ in range(20):
        assert picker(logits).tolist() == [0, 2]


def test_sampling_ties_under_a_tiny_top_p_pick_the_argmax():
    logits = torch.tensor([[0.0, 7.0, 7.0, 7.0]])  # three tokens share the top
    picker = inject.TokenPicker([inject.Sampling(1.0, 2e-5, seed=3)])
    assert picker(logits).item() == logits.argmax(-1).item() == 1


def test_bad_input_unknown_task_id_names_it():
    from softprompt.errors import UnknownTaskError

    with pytest.raises(UnknownTaskError, match=r"\[7\]"):
        _table().gather(torch.tensor([0, 7]))
