"""Deep prompts (P-tuning v2): exact against the soft-prompt path, trainable, frozen base, PEFT format."""

from __future__ import annotations

import pytest
import torch

from softprompt.data import Example
from softprompt.errors import IncompatiblePromptError
from softprompt.prompting.deep import DeepPromptModel, kv_to_rows, prompt_kv, rows_to_kv
from softprompt.prompting.prompted import PromptedModel
from softprompt.prompting.soft import NO_TASK
from softprompt.training.compare import model_digest
from softprompt.training.trainer import TrainConfig, Trainer

from ..conftest import build_tiny_model, build_tiny_tokenizer
from .serving_fixtures import DEEP_TEXTS, served_bank

ATOL = 1e-5
# Gemma 3's tiny config has an 8-column sliding window: prompt + tokens stay within it.
ROWS = [[5, 6, 7, 8, 9], [10, 11, 12]]


def _batch(rows, side="left"):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, cols], mask[b, cols] = torch.tensor(row), 1
    return ids, mask


def _prompt(n=2, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, 32) * 0.5


def _pair(model, prompts):
    """A PromptedModel and a DeepPromptModel holding the same prompts (deep = their KV)."""
    prompted, deep = PromptedModel(model), DeepPromptModel(model)
    for name, prompt in prompts.items():
        prompted.add_task(name, prompt)
        deep.add_task(name, prompt_kv(model, prompt))
    return prompted, deep


@pytest.mark.parametrize("side", ["left", "right"])
def test_deep_prompt_with_prompt_kv_equals_prompt_path(tiny_model, side):
    prompted, deep = _pair(tiny_model, {"a": _prompt()})
    ids, mask = _batch(ROWS, side)
    labels = ids.masked_fill(mask == 0, -100)
    labels[
        :, :-2
    ] = -100  # answers at the end, as in training (a row's first token has no prediction)
    with torch.no_grad():
        want, got = prompted(ids, mask, "a").logits, deep(ids, mask, "a")
        assert torch.allclose(want[mask.bool()], got[mask.bool()], atol=ATOL)
        for reduction in ("mean", "none"):
            assert torch.allclose(
                prompted.loss(ids, mask, "a", labels, reduction),
                deep.loss(ids, mask, "a", labels, reduction),
                atol=ATOL,
            )
    assert prompted.generate_ids(ids, mask, "a", max_new_tokens=1) == deep.generate_ids(
        ids, mask, "a", max_new_tokens=1
    )


def test_deep_prompt_mixed_tasks_and_no_task_rows_equal_separate_batches(tiny_llama):
    prompted, deep = _pair(tiny_llama, {"a": _prompt(3, seed=1), "b": _prompt(2, seed=2)})
    with pytest.raises(
        IncompatiblePromptError, match="has no rows"
    ):  # the one check of prompt rows
        deep.add_task("empty", torch.zeros(2, 2, 2, 0, 8))
    rows = ROWS + [[13, 14, 15, 16]]
    ids, mask = _batch(rows)
    with torch.no_grad():
        mixed = deep(ids, mask, ["a", "b", None])
        for b, task in enumerate(["a", "b", None]):
            alone_ids, alone_mask = _batch([rows[b]])
            alone = deep(alone_ids, alone_mask, task)[0][alone_mask[0].bool()]
            assert torch.allclose(mixed[b][mask[b].bool()], alone, atol=ATOL)
            reference = prompted(alone_ids, alone_mask, task).logits[0][alone_mask[0].bool()]
            assert torch.allclose(alone, reference, atol=ATOL)
        assert not torch.allclose(
            mixed[0][-1], deep(ids, mask, "b")[0][-1], atol=1e-3
        )  # tasks really differ


def test_trainable_count_is_the_prefix_shape(tiny_llama):
    deep = DeepPromptModel(tiny_llama, {"a": _prompt(4)})
    config = tiny_llama.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert deep.kv("a").shape == (
        config.num_hidden_layers,
        2,
        config.num_key_value_heads,
        4,
        head_dim,
    )
    assert (
        deep.trainable_parameter_count()
        == 4 * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim
    )
    assert not any(p.requires_grad for p in deep.model.parameters())
    kv = deep.kv("a")
    assert torch.equal(rows_to_kv(kv_to_rows(kv), deep.shape), kv)


def test_gradients_reach_every_layer_and_the_trainer_keeps_the_base_frozen(tiny_llama):
    tokenizer = build_tiny_tokenizer()
    deep = DeepPromptModel(tiny_llama, {"a": _prompt(2)}, tokenizer=tokenizer)
    ids, mask = _batch(ROWS)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-1] = -100
    deep.loss(ids, mask, "a", labels).backward()
    grad = rows_to_kv(deep.table.get("a").grad, deep.shape)  # (layers, 2, H_kv, n, hd)
    assert (grad.abs().sum(dim=(2, 3, 4)) > 0).all()  # keys and values of every layer learn
    deep.table.get("a").grad = None

    before, start = model_digest(tiny_llama), deep.kv("a").detach().clone()
    examples = [Example(row[:-1], row[-1:], 0, None) for row in ROWS * 4]
    result = Trainer(
        deep,
        examples,
        TrainConfig(
            max_steps=3, per_device_train_batch_size=4, bf16="no", warmup_steps=0, learning_rate=0.1
        ),
    ).train()
    assert result.trainable_parameters == deep.trainable_parameter_count()
    assert len(result.history[0]["prompt_grad_norms"]["a"]) == 2  # per-virtual-token monitor works
    assert model_digest(tiny_llama) == before
    assert not torch.equal(deep.kv("a").detach(), start)


def test_save_load_roundtrip_and_peft_loads_it(tiny_llama, tmp_path):
    from peft import PeftModel

    deep = DeepPromptModel(tiny_llama, {"a": prompt_kv(tiny_llama, _prompt(3)) + 0.1})
    folder = deep.save_task("a", tmp_path / "bank")  # the bank's atomic save, like soft prompts
    other = DeepPromptModel(build_tiny_model("llama"))
    other.load_task(folder)
    assert torch.equal(other.kv("a"), deep.kv("a"))

    ids = torch.tensor([[5, 6, 7, 8]])
    peft_model = PeftModel.from_pretrained(build_tiny_model("llama"), str(folder))
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, deep(ids, None, "a"), atol=ATOL)


def test_bad_inputs_are_refused(tiny_model):
    deep = DeepPromptModel(tiny_model, {"a": _prompt(4)})
    with pytest.raises(IncompatiblePromptError, match="shape"):
        deep.add_task("b", torch.zeros(3, 2, 2, 4, 8))
    if tiny_model.config.model_type.startswith("gemma3"):  # 4 + 6 columns > the 8-column window
        ids, mask = _batch([[5, 6, 7, 8, 9, 10]])
        with pytest.raises(IncompatiblePromptError, match="sliding window"):
            deep(ids, mask, "a")
    with pytest.raises(Exception, match="unknown task"):
        deep.task_ids(torch.tensor([NO_TASK, 5]), 2)


def _examples():
    return [Example([5, 6, 7], [9], 0, 0), Example([8, 6], [10], 0, 1)] * 4


def test_reparam_mlp_starts_at_the_soft_prompt_kv_trains_and_folds_exactly(tiny_llama):
    deep = DeepPromptModel(
        tiny_llama, {"a": _prompt(2)}, reparam_hidden=16, tokenizer=build_tiny_tokenizer()
    )
    start = deep.task_rows(0).detach().clone()
    torch.testing.assert_close(
        start, kv_to_rows(prompt_kv(tiny_llama, _prompt(2)))
    )  # zero-init last layer
    assert "a" in deep.reparams and deep.trainable_parameter_count() > start.numel()
    config = TrainConfig(
        max_steps=3, per_device_train_batch_size=4, bf16="no", warmup_steps=0, learning_rate=0.05
    )
    Trainer(deep, _examples(), config).train()
    trained = deep.task_rows(0).detach().clone()
    ids, mask = _batch(ROWS)
    with torch.no_grad():
        logits = deep(ids, mask, "a")
    assert not torch.allclose(trained, start)
    deep.fold_reparams()
    assert not deep.reparams and torch.equal(deep.table.get("a").detach(), trained)
    with torch.no_grad():
        torch.testing.assert_close(deep(ids, mask, "a"), logits)


def test_prefix_layers_trains_only_the_last_layers(tiny_llama):
    deep = DeepPromptModel(
        tiny_llama, {"a": _prompt(2)}, prefix_layers=1, tokenizer=build_tiny_tokenizer()
    )
    before = deep.kv("a").detach().clone()  # (layers, 2, H_kv, n, hd)
    config = TrainConfig(
        max_steps=3, per_device_train_batch_size=4, bf16="no", warmup_steps=0, learning_rate=0.05
    )
    Trainer(deep, _examples(), config).train()
    after = deep.kv("a").detach()
    assert torch.equal(after[:-1], before[:-1])  # the first layers keep the soft prompt's KV
    assert not torch.allclose(after[-1], before[-1])
    with pytest.raises(Exception, match="prefix_layers"):
        DeepPromptModel(tiny_llama, prefix_layers=99)


def test_prefix_layers_backward_stops_at_the_first_trained_layer(tiny_llama):
    """The layers below the trained prefixes build no autograd graph: the saving that makes
    prefix_layers a speed lever, not only a quality one."""
    layers = tiny_llama.model.layers
    deep = DeepPromptModel(
        tiny_llama, {"a": _prompt(2)}, prefix_layers=1, tokenizer=build_tiny_tokenizer()
    )
    needs_grad = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out: needs_grad.append(
                (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
        for layer in layers
    ]
    ids, mask = _batch(ROWS)
    labels = ids.masked_fill(mask == 0, -100)
    deep.loss(ids, mask, "a", labels).backward()
    for hook in hooks:
        hook.remove()
    assert needs_grad == [False] * (len(layers) - 1) + [True]
    grad = rows_to_kv(deep.table.get("a").grad, deep.shape)
    assert not grad[:-1].any() and grad[-1].abs().sum() > 0


def test_deep_prompt_in_the_bank_is_refused_by_soft_prompt_paths_with_a_clear_error(
    tiny_llama, tmp_path
):
    from softprompt.bank import PromptBank

    deep = DeepPromptModel(tiny_llama, {"a": _prompt(2)})
    deep.save_task("a", tmp_path / "bank")
    saved = PromptBank(tmp_path / "bank").load("a")
    assert saved.kind == "deep" and saved.embeddings.shape == (2, deep.shape.row_width)
    with pytest.raises(
        IncompatiblePromptError, match="'a' is a deep prompt; this path serves soft prompts only"
    ):
        PromptedModel(tiny_llama).add_task("a", saved)
    other = DeepPromptModel(build_tiny_model("llama"))
    other.add_saved(saved)
    assert torch.equal(other.kv("a"), deep.kv("a"))


VERBALIZER = {"labels": ["positive", "negative"], "targets": [" good", " bad film"]}


def test_builtin_engine_serves_a_deep_prompt_exactly_as_deep_prompt_model(tiny_llama, tmp_path):
    from softprompt.data import encode_example, task_from_meta
    from softprompt.serving.engine import Engine, GenerationRequest
    from softprompt.training.evaluation import label_log_likelihoods

    tokenizer = build_tiny_tokenizer()
    deep, bank = served_bank(tiny_llama, tokenizer, tmp_path / "bank")
    engine = Engine((tiny_llama, tokenizer), bank)
    assert (
        engine.activate("deep-task").kind == "deep" and engine.activate("soft-task").kind == "soft"
    )
    served = engine.generate(
        [GenerationRequest(t, task="deep-task", max_new_tokens=5) for t in DEEP_TEXTS]
    )
    assert [r.text for r in served] == deep.generate(DEEP_TEXTS, "deep-task", max_new_tokens=5)
    task = task_from_meta("deep-task", bank.load("deep-task").meta)
    examples = [
        encode_example(tokenizer, task, {"text": t}, 0, require_target=False) for t in DEEP_TEXTS
    ]
    expected = label_log_likelihoods(deep, examples, task.verbalizer.target_token_ids(tokenizer), 0)
    for result, scores in zip(engine.classify("deep-task", DEEP_TEXTS), expected, strict=True):
        assert [result.log_likelihoods[label] for label in VERBALIZER["labels"]] == pytest.approx(
            scores.tolist(), abs=1e-4
        )


@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_builtin_engine_mixes_deep_soft_and_base_rows_in_one_batch(
    tiny_llama, tmp_path, use_prefix_cache
):
    from softprompt.serving.engine import Engine, GenerationRequest

    tokenizer = build_tiny_tokenizer()
    _, bank = served_bank(tiny_llama, tokenizer, tmp_path / "bank")
    engine = Engine((tiny_llama, tokenizer), bank, use_prefix_cache=use_prefix_cache)
    requests = [
        GenerationRequest(DEEP_TEXTS[i], task=name, max_new_tokens=5)
        for i, name in enumerate(["deep-task", "soft-task", None])
    ]
    mixed = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [r.token_ids for r in mixed] == [r.token_ids for r in alone]
    classified = engine.classify(["deep-task", "soft-task"], DEEP_TEXTS[:2])
    assert classified[0].probabilities == pytest.approx(
        engine.classify("deep-task", DEEP_TEXTS[:1])[0].probabilities, abs=1e-5
    )


def test_builtin_engine_refuses_a_deep_prompt_past_a_sliding_window_instead_of_answering_wrong(
    tmp_path,
):
    from softprompt.serving.engine import Engine, GenerationRequest

    gemma, tokenizer = (
        build_tiny_model("gemma3"),
        build_tiny_tokenizer(),
    )  # sliding window: 8 columns
    _, bank = served_bank(gemma, tokenizer, tmp_path / "bank")
    engine = Engine((gemma, tokenizer), bank)
    assert engine.generate([GenerationRequest("fun", task="deep-task", max_new_tokens=2)])[
        0
    ].token_ids
    with pytest.raises(IncompatiblePromptError, match="exceeds this model's sliding window"):
        engine.generate(
            [GenerationRequest("the movie was fun", task="deep-task", max_new_tokens=5)]
        )
    with pytest.raises(IncompatiblePromptError, match="exceeds this model's sliding window"):
        engine.classify("deep-task", ["the movie was fun and the plot was great"])
