"""PromptedModel: inits, PEFT interop both ways (docs/architecture.md 5), round trips (6), bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from softprompt.bank import PromptBank, SavedPrompt, read_prompt_dir
from softprompt.errors import (
    ConfigError,
    IncompatiblePromptError,
    PromptFileError,
    UnknownTaskError,
)
from softprompt.prompting.prompted import PromptedModel
from softprompt.prompting.soft import PromptTuningConfig, init_prompt

from ..conftest import build_tiny_model

TEXT = "classify if this text is positive or negative :"


@pytest.fixture
def prompted(tiny_model, tiny_tokenizer):
    config = PromptTuningConfig(
        num_virtual_tokens=5, prompt_tuning_init="text", prompt_tuning_init_text=TEXT
    )
    return PromptedModel(tiny_model, {"sentiment": config}, tokenizer=tiny_tokenizer)


def _right_padded(tokenizer, texts):
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True)


# ---------------------------------------------------------------- frozen + inits


def test_frozen_trainable_count_equals_tasks_times_tokens_times_dim(tiny_model, tiny_tokenizer):
    configs = {
        f"t{i}": PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="random", seed=i)
        for i in range(3)
    }
    prompted = PromptedModel(tiny_model, configs, tokenizer=tiny_tokenizer)
    assert prompted.trainable_parameter_count() == 3 * 6 * 32
    assert all(not p.requires_grad for p in prompted.model.parameters())
    assert all(p.dtype == torch.float32 for p in prompted.table.parameters())


def test_init_text_tiles_token_embeddings_like_peft(tiny_model, tiny_tokenizer):
    config = PromptTuningConfig(
        num_virtual_tokens=12, prompt_tuning_init="text", prompt_tuning_init_text="great movie"
    )
    values = init_prompt(config, tiny_model, tiny_tokenizer)
    ids = tiny_tokenizer("great movie", add_special_tokens=False)["input_ids"] * 6
    expected = tiny_model.get_input_embeddings()(torch.tensor(ids)).detach()
    torch.testing.assert_close(values, expected)  # Gemma's scale included: the module's own output


def test_init_random_matches_embedding_statistics(tiny_model, tiny_tokenizer):
    values = init_prompt(
        PromptTuningConfig(num_virtual_tokens=256, prompt_tuning_init="random"),
        tiny_model,
        tiny_tokenizer,
    )
    embeds = tiny_model.get_input_embeddings()(torch.arange(128)).detach()
    assert abs(values.std().item() - embeds.std().item()) < 0.25 * embeds.std().item()


def test_init_sampled_vocab_and_class_labels_are_real_token_rows(tiny_model, tiny_tokenizer):
    embeds = tiny_model.get_input_embeddings()(torch.arange(128)).detach()
    sampled = init_prompt(
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="sampled_vocab"),
        tiny_model,
        tiny_tokenizer,
    )
    labels = init_prompt(
        PromptTuningConfig(
            num_virtual_tokens=3,
            prompt_tuning_init="class_labels",
            init_labels=["negative", "positive"],
        ),
        tiny_model,
        tiny_tokenizer,
    )
    for row in torch.cat([sampled, labels]):
        assert torch.isclose(embeds, row).all(1).any()
    neg = tiny_tokenizer("negative", add_special_tokens=False)["input_ids"][0]
    torch.testing.assert_close(labels[0], embeds[neg])
    torch.testing.assert_close(labels[2], embeds[neg])  # tiled


def test_init_from_file_starts_from_a_saved_prompt(prompted, tmp_path):
    path = prompted.save_task("sentiment", tmp_path / "bank")
    config = PromptTuningConfig(
        num_virtual_tokens=5, prompt_tuning_init="from_file", init_file=str(path)
    )
    torch.testing.assert_close(
        init_prompt(config, prompted.model, prompted.tokenizer),
        prompted.table.get("sentiment").detach(),
    )


def test_bad_input_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="text")
    with pytest.raises(ConfigError, match="one of"):
        PromptTuningConfig(prompt_tuning_init="zeros")
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=0, prompt_tuning_init="random")


# ---------------------------------------------------------------- PEFT interop


def _peft_logits(peft_model, enc, n_virtual):
    with torch.no_grad():
        logits = peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return logits[:, n_virtual:]  # PEFT prepends the prompt to every row


def test_peft_interop_our_saved_prompt_loads_in_peft_with_same_logits(prompted, tmp_path):
    from peft import PeftModel

    with torch.no_grad():
        prompted.table.get("sentiment").add_(0.1 * torch.randn(5, 32))  # "trained"
    path = prompted.save_task("sentiment", tmp_path / "bank")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(prompted.model), str(path)).eval()
    enc = _right_padded(prompted.tokenizer, ["great movie", "the plot was very boring and bad"])
    ours = prompted(enc["input_ids"], enc["attention_mask"], "sentiment").logits
    theirs = _peft_logits(peft_model, enc, 5)
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-5, rtol=0)


def test_peft_interop_peft_trained_adapter_loads_here_with_same_logits(
    tiny_model, tiny_tokenizer, tmp_path
):
    from peft import PromptTuningConfig as PeftConfig
    from peft import get_peft_model

    base = copy.deepcopy(tiny_model)
    peft_model = get_peft_model(tiny_model, PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    enc = _right_padded(tiny_tokenizer, ["great movie", "bad plot !"])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    out = peft_model(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["input_ids"]
    )
    out.loss.backward()
    optimizer.step()
    peft_model.save_pretrained(tmp_path / "peft")
    prompted = PromptedModel(base, tokenizer=tiny_tokenizer)
    prompted.load_task(str(tmp_path / "peft"), name="imported")
    ours = prompted(enc["input_ids"], enc["attention_mask"], "imported").logits
    theirs = _peft_logits(peft_model.eval(), enc, 4)
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- round trip


def test_roundtrip_save_load_bit_exact(prompted, tmp_path):
    prompted.save_task("sentiment", tmp_path / "bank", meta={"template": "Review: {text}"})
    saved = PromptBank(tmp_path / "bank").load("sentiment")
    assert torch.equal(saved.embeddings, prompted.table.get("sentiment").detach())
    assert (
        saved.meta["fingerprint"] == prompted.fingerprint
        and saved.meta["template"] == "Review: {text}"
    )
    again = PromptedModel(prompted.model, tokenizer=prompted.tokenizer)
    again.add_task("sentiment", saved)
    assert torch.equal(again.table.get("sentiment"), prompted.table.get("sentiment"))


def test_roundtrip_crash_mid_save_keeps_previous_prompt(prompted, tmp_path, monkeypatch):
    from softprompt.bank import files as bank_files

    bank = PromptBank(tmp_path / "bank")
    prompted.save_task("sentiment", bank)
    good = bank.load("sentiment").embeddings.clone()
    with torch.no_grad():
        prompted.table.get("sentiment").mul_(2)

    def crash(path, tensor):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(bank_files, "_write_tensor", crash)
    with pytest.raises(Exception, match="disk full"):
        prompted.save_task("sentiment", bank)
    assert torch.equal(PromptBank(tmp_path / "bank").load("sentiment").embeddings, good)


# ---------------------------------------------------------------- bad input


def _saved(values, fingerprint=None):
    return SavedPrompt(
        "x",
        values,
        {
            "peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": values.shape[0],
            "token_dim": values.shape[-1],
        },
        {"fingerprint": fingerprint} if fingerprint else {},
    )


def test_bad_input_wrong_hidden_size(prompted):
    with pytest.raises(IncompatiblePromptError, match="hidden size 64"):
        prompted.add_task("x", _saved(torch.zeros(4, 64)))


def test_bad_input_nan_values(prompted):
    values = torch.zeros(4, 32)
    values[1, 3] = float("nan")
    with pytest.raises(IncompatiblePromptError, match="NaN"):
        prompted.add_task("x", values)


def test_bad_input_unknown_task_name_and_id(prompted, tiny_tokenizer):
    enc = _right_padded(tiny_tokenizer, ["great movie"])
    with pytest.raises(UnknownTaskError, match="'nope'.*sentiment"):
        prompted(enc["input_ids"], enc["attention_mask"], "nope")
    with pytest.raises(UnknownTaskError, match=r"\[3\]"):
        prompted(enc["input_ids"], enc["attention_mask"], torch.tensor([3]))


def test_bad_input_missing_prompt_folder(prompted, tmp_path):
    with pytest.raises(PromptFileError, match="does-not-exist"):
        prompted.load_task(str(tmp_path / "does-not-exist"))


def test_bad_input_prompt_made_for_another_base_model(prompted, tmp_path):
    other = PromptedModel(build_tiny_model("llama", seed=7), tokenizer=prompted.tokenizer)
    other.add_task("other", torch.zeros(3, 32))
    path = other.save_task("other", tmp_path / "bank")
    with pytest.raises(IncompatiblePromptError, match="embedding_sha256"):
        prompted.load_task(str(path))
    assert read_prompt_dir(path).fingerprint == other.fingerprint


# ---------------------------------------------------------------- generation API


def test_generate_strings_mixed_tasks_equal_alone(prompted):
    prompted.add_task("other", torch.randn(3, 32))
    texts = ["great movie", "the plot was boring"]
    mixed = prompted.generate(texts, ["sentiment", "other"], max_new_tokens=5)
    assert mixed[0] == prompted.generate(texts[:1], "sentiment", max_new_tokens=5)[0]
    assert mixed[1] == prompted.generate(texts[1:], "other", max_new_tokens=5)[0]
