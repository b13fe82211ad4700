"""Building each method: the trainable object, its expected parameter count, and how its task saves and loads."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from softprompt.model.loading import LoadedModel
from softprompt.prompting.soft import PromptTuningConfig, default_init_text
from softprompt.training.compare.config import PROMPT_KINDS, TASK, CompareConfig, MethodRun

log = logging.getLogger(__name__)


def build_method(
    method: str, loaded: LoadedModel, config: CompareConfig, labels: list[str]
) -> MethodRun:
    """The trainable object of `method` on `loaded` (which it may modify: pass a fresh load)."""
    return _BUILDERS[method](loaded, config, labels)


def _prompt_config(config: CompareConfig, labels: list[str]) -> PromptTuningConfig:
    return PromptTuningConfig(
        num_virtual_tokens=config.num_virtual_tokens,
        prompt_tuning_init=config.prompt_tuning_init,
        prompt_tuning_init_text=config.prompt_tuning_init_text or default_init_text(labels),
        init_labels=list(labels),
        seed=config.seed,
    )


def _build_zero_shot(loaded, config, labels) -> MethodRun:
    from softprompt.prompting.prompted import PromptedModel

    return MethodRun("zero_shot", PromptedModel(loaded), None, 0)


def _prompt_builder(method: str) -> Callable[..., MethodRun]:
    """The builder of a method that trains a prompt of one kind (`PROMPT_KINDS`): every kind is
    built, counted, saved and switched to the same way."""

    def build(loaded, config, labels) -> MethodRun:
        from softprompt.bank import PromptBank
        from softprompt.prompting.kinds import kind_named
        from softprompt.prompting.prompted import PromptedModel

        kind = kind_named(PROMPT_KINDS[method])
        prompted = PromptedModel(loaded, {TASK: _prompt_config(config, labels)}, kind=kind)
        return MethodRun(
            method,
            prompted,
            TASK,
            config.num_virtual_tokens * prompted.row_width,
            save=lambda folder: Path(
                os.path.realpath(prompted.save_task(TASK, PromptBank(folder)))
            ),
            load=lambda folder: prompted.load_task(folder, "switched"),
        )

    return build


def _build_lora(loaded, config, labels) -> MethodRun:
    from peft import LoraConfig, get_peft_model

    from softprompt.prompting.prompted import PromptedModel

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    expected = sum(
        config.lora_r * (m.in_features + m.out_features)
        for name, m in loaded.model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules
    )
    peft_model = get_peft_model(loaded.model, lora)
    prompted = PromptedModel(peft_model, tokenizer=loaded.tokenizer)  # freezes everything ...
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name)  # ... then only the adapter trains

    def load(folder: Path) -> str:
        name = f"switch{len(peft_model.peft_config)}"
        peft_model.load_adapter(str(folder), adapter_name=name)
        peft_model.set_adapter(name, inference_mode=True)
        return name

    def release(name: str) -> None:
        peft_model.set_adapter("default", inference_mode=True)
        peft_model.delete_adapter(name)

    return MethodRun(
        "lora",
        prompted,
        None,
        expected,
        save=lambda folder: _save_pretrained(peft_model, folder),
        load=load,
        release=release,
    )


def _build_full(loaded, config, labels) -> MethodRun:
    from transformers import AutoModelForCausalLM

    from softprompt.prompting.prompted import PromptedModel

    prompted = PromptedModel(loaded)
    prompted.model.requires_grad_(
        True
    )  # every weight trains (eval mode kept: no dropout, as for the others)

    def load(folder: Path):
        device = prompted.model.get_input_embeddings().weight.device  # where training left it
        return AutoModelForCausalLM.from_pretrained(folder).to(device)

    return MethodRun(
        "full",
        prompted,
        None,
        sum(p.numel() for p in prompted.model.parameters()),
        save=lambda folder: _save_pretrained(prompted.model, folder),
        load=load,
    )


def _save_pretrained(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


_BUILDERS = {
    "zero_shot": _build_zero_shot,
    **{method: _prompt_builder(method) for method in PROMPT_KINDS},
    "lora": _build_lora,
    "full": _build_full,
}
