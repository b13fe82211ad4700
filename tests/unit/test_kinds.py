"""The prompt-kind interface: every kind is named as the bank reads it back, one prompted-model
class serves every kind, one sliding-window check, one way to pad prompts, and a new kind plugs
into training and evaluation with nothing else changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softprompt.bank import PEFT_TYPES, PromptBank, SavedPrompt
from softprompt.data import Example, Task, Template, Verbalizer
from softprompt.errors import ConfigError, IncompatiblePromptError
from softprompt.model.loading import LoadedModel, fingerprint
from softprompt.prompting import inject
from softprompt.prompting.deep import DeepPrompt, DeepPromptModel
from softprompt.prompting.kinds import KINDS, default_learning_rate, kind_named, model_for_saved
from softprompt.prompting.prompted import PromptedModel
from softprompt.prompting.soft import NO_TASK, SoftPrompt, default_init_text
from softprompt.training.evaluation import evaluate_task
from softprompt.training.trainer import TrainConfig, Trainer

from ..conftest import build_tiny_model, build_tiny_tokenizer

ROWS = [[5, 6, 7, 8], [10, 11, 12]]


def _batch(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :], mask[b, width - len(row) :] = torch.tensor(row), 1
    return ids, mask


def _prompt(n=2, seed=1):
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)) * 0.5


def test_every_kind_is_saved_under_its_name_and_loads_back_into_its_own_kind(tiny_llama, tmp_path):
    tokenizer = build_tiny_tokenizer()
    loaded = LoadedModel(tiny_llama, tokenizer, "tiny", "tiny", fingerprint(tiny_llama))
    ids, mask = _batch(ROWS)
    for name in KINDS:
        assert PEFT_TYPES[KINDS[name].peft_type] == name  # how the bank reads the kind back
        prompted = PromptedModel(loaded, {"t": _prompt(3)}, kind=kind_named(name))
        with torch.no_grad():
            prompted.table.get("t").add_(0.1)  # "trained"
        prompted.save_task("t", tmp_path / name)
        saved = PromptBank(tmp_path / name).load("t")
        assert saved.kind == name and saved.embeddings.shape == (3, prompted.row_width)
        again = model_for_saved(loaded, saved)
        assert again.kind.name == name and again.task_names == ["t"]
        with torch.no_grad():
            torch.testing.assert_close(
                again(ids, mask, "t").logits, prompted(ids, mask, "t").logits
            )
        other = PromptedModel(loaded, kind=kind_named(name))
        assert isinstance(
            other.load_task(tmp_path / name / "t", "u"), SavedPrompt
        )  # one return type
        assert torch.equal(other.table.get("u"), prompted.table.get("t"))


def test_unknown_kind_is_a_config_error_naming_the_kinds():
    with pytest.raises(ConfigError, match="unknown prompt kind 'wide'; choose from deep, soft"):
        kind_named("wide")
    with pytest.raises(ConfigError, match="choose from deep, soft"):
        default_learning_rate("wide")
    assert default_learning_rate("soft") == SoftPrompt.default_learning_rate == 3e-2
    assert default_learning_rate("deep") == DeepPrompt.default_learning_rate == 1e-2


def test_default_init_text_names_the_labels():
    assert default_init_text(["negative", "positive"]) == "Classify as negative or positive:"
    assert default_init_text([]) == "Answer:"


def test_deep_prompt_model_is_the_prompted_model_with_the_deep_kind(tiny_llama):
    generic = PromptedModel(tiny_llama, {"a": _prompt(3)}, kind=DeepPrompt())
    named = DeepPromptModel(tiny_llama, {"a": _prompt(3)})
    ids, mask = _batch(ROWS)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        assert torch.equal(generic(ids, mask, ["a", None]).logits, named(ids, mask, ["a", None]))
        assert torch.equal(
            generic.last_logits(ids, mask, "a", keep=2), named.last_logits(ids, mask, "a", keep=2)
        )
        assert torch.equal(
            generic.loss(ids, mask, "a", labels, "none"), named.loss(ids, mask, "a", labels, "none")
        )
    assert generic.trainable_parameter_count() == named.trainable_parameter_count()
    with pytest.raises(ConfigError, match="3 task names for 2 rows"):
        generic(ids, mask, ["a", "a", "a"])


def test_exact_inputs_is_the_one_sliding_window_check():
    gemma = build_tiny_model("gemma3")  # 8-column sliding window
    soft = inject.prompt_prefix(gemma, _prompt(3))
    deep = inject.PromptPrefix(soft.keys, soft.values, None)  # KV with no prompt behind it
    inside = inject.PromptInputs(prefixes=[soft, None])
    assert inject.exact_inputs(gemma, inside, 5, "x") is inside  # 3 + 5 columns fit
    fallback = inject.exact_inputs(gemma, inside, 6, "x")  # 3 + 6 do not: the prompt itself
    assert fallback.prefixes is None and fallback.prompt_lengths.tolist() == [3, 0]
    assert torch.equal(fallback.prompts[0], soft.prompt) and not fallback.prompts[1].any()
    with pytest.raises(IncompatiblePromptError, match="9 columns exceeds .* shorten the input"):
        inject.exact_inputs(gemma, inject.PromptInputs(prefixes=[deep]), 6, "the input")
    assert (
        inject.exact_inputs(gemma, inject.PromptInputs(prefixes=[None]), 99, "x").prefixes is None
    )


def test_pad_prompts_right_pads_and_keeps_the_gradient():
    a = nn.Parameter(torch.ones(2, 4))
    values, lengths = inject.pad_prompts([a, None, torch.full((1, 4), 2.0)], 4)
    assert values.shape == (3, 2, 4) and lengths.tolist() == [2, 0, 1]
    assert values[1].abs().sum() == 0 and values[2, 1].abs().sum() == 0
    values.sum().backward()
    assert torch.equal(a.grad, torch.ones(2, 4))
    empty, none = inject.pad_prompts([None, None], 4)
    assert empty.shape == (2, 0, 4) and none.tolist() == [0, 0]


class ScaledSoftPrompt(nn.Module):
    """A kind made for this test only: a soft prompt times a trainable per-task scale, composed
    from the soft kind (what adding a kind looks like)."""

    name, peft_type, default_learning_rate = "soft", "PROMPT_TUNING", 3e-2

    def __init__(self):
        super().__init__()
        self.soft = SoftPrompt()
        self.scale = nn.Parameter(torch.ones(()))

    def bind(self, model) -> int:
        return self.soft.bind(model)

    def add(self, model, table, name, values):
        return self.soft.add(model, table, name, values)

    def add_stored(self, table, name, rows):
        return self.soft.add_stored(table, name, rows)

    def rows(self, table, task_id):
        return self.soft.rows(table, task_id) * self.scale

    def enter(self, model, table, task_ids):
        rows = [None if t == NO_TASK else self.rows(table, t) for t in task_ids.tolist()]
        return inject.PromptInputs(*inject.pad_prompts(rows, table.token_dim, task_ids.device))

    def peft_config(self, model, rows, config, base_name):
        return self.soft.peft_config(model, rows, config, base_name)

    def saved_meta(self, info, config):
        return self.soft.saved_meta(info, config)


def test_a_new_kind_trains_and_evaluates_with_nothing_else_changed(tiny_llama):
    tokenizer = build_tiny_tokenizer()
    prompted = PromptedModel(tiny_llama, {"t": _prompt(2)}, tokenizer=tokenizer)
    scaled = PromptedModel(
        tiny_llama, {"t": _prompt(2)}, tokenizer=tokenizer, kind=ScaledSoftPrompt()
    )
    ids, mask = _batch(ROWS)
    with torch.no_grad():  # scale 1: the soft prompt itself
        torch.testing.assert_close(scaled(ids, mask, "t").logits, prompted(ids, mask, "t").logits)
    assert scaled.trainable_parameter_count() == 2 * 32 + 1
    examples = [Example([5, 6, 7], [9], 0, 0), Example([8, 6], [10], 0, 1)] * 4
    config = TrainConfig(
        max_steps=3, per_device_train_batch_size=4, bf16="no", warmup_steps=0, learning_rate=0.1
    )
    Trainer(scaled, examples, config).train()
    assert scaled.kind.scale.item() != 1.0  # the kind's own parameter trained with the prompt
    task = Task("t", Template("{text}"), Verbalizer(["a", "b"], [" fun", " bad"]))
    metrics = evaluate_task(scaled, task, examples, "t")
    assert metrics["n"] == len(examples) and 0.0 <= metrics["accuracy"] <= 1.0


def test_compare_builds_every_prompt_method_from_its_kind_with_the_shared_defaults(tiny_llama):
    from softprompt.training.compare.config import PROMPT_KINDS, TASK, CompareConfig
    from softprompt.training.compare.methods import build_method

    tokenizer = build_tiny_tokenizer()
    config, labels = CompareConfig(), ["negative", "positive"]
    for method, kind in PROMPT_KINDS.items():
        loaded = LoadedModel(tiny_llama, tokenizer, "tiny", "tiny", fingerprint(tiny_llama))
        run = build_method(method, loaded, config, labels)
        assert run.model.kind.name == kind and run.task_name == TASK
        assert run.expected_trainable == run.model.trainable_parameter_count()
        assert run.model.configs[TASK].prompt_tuning_init_text == default_init_text(labels)
        assert config.learning_rate(method) == default_learning_rate(kind)
