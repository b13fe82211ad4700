"""Model loading by name: local folders, bad paths, cache location, freezing and fingerprints."""

from __future__ import annotations

import pytest

from softprompt.errors import ModelLoadError
from softprompt.model.loading import describe, load_model, resolve_model_source, softprompt_home


def test_frozen_local_folder_loads_with_fingerprint(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    assert all(not p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    assert loaded.fingerprint["architecture"] == "LlamaForCausalLM"
    assert (loaded.fingerprint["hidden_size"], loaded.fingerprint["vocab_size"]) == (32, 128)
    assert load_model(tiny_model_dir).fingerprint == loaded.fingerprint  # deterministic
    assert describe(loaded)["trainable_parameters"] == 0


def test_bad_input_model_paths_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_source(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="neither a model folder"):
        resolve_model_source("./no/such/folder")


def test_hub_ids_pass_through_to_from_pretrained():
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )


def test_cache_home_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path))
    assert softprompt_home() == tmp_path
