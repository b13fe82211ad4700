"""What a saved prompt is: `SavedPrompt`, the PEFT adapter configs, and the checks of
a config, its tensor, plots and base-model fingerprint (no disk access here).

A prompt folder holds `adapter_config.json` (PEFT's keys), `adapter_model.safetensors` (the one
tensor `prompt_embeddings`, shape [num_virtual_tokens, token_dim]) and our `softprompt.json`
(template, verbalizer, fingerprint, metrics, ...). PEFT ignores our file; we ignore unknown files.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from softprompt.errors import (
    ConfigError,
    IncompatiblePromptError,
    PromptFileError,
    UnsupportedPromptKindError,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "softprompt.json"
TENSOR_KEY = "prompt_embeddings"
PLOTS_DIR = "plots"
"""Sub-folder of a saved version holding the training run's PNG plots (loss, validation, ...)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PLOT_NAME_RE = re.compile(r"[a-z0-9_]{1,64}")
"""A valid plot name: the PNG files a task keeps beside its prompt."""


# Our init names -> PEFT's PromptTuningInit values. class_labels / from_file have no PEFT
# equivalent; the vector is stored anyway, so PEFT only needs a value it accepts.
_PEFT_INIT = {
    "text": "TEXT",
    "random": "RANDOM",
    "sampled_vocab": "SAMPLE_VOCAB",
    "sample_vocab": "SAMPLE_VOCAB",
    "class_labels": "RANDOM",
    "from_file": "RANDOM",
}


# ----------------------------------------------------------------------------- names and data


@dataclass
class SavedPrompt:
    """One task's soft prompt as stored on disk.

    `embeddings` is float32, shape [num_virtual_tokens * num_transformer_submodules, token_dim];
    `config` is the PEFT adapter_config; `meta` is the content of softprompt.json (template,
    verbalizer, fingerprint, metrics, ...), empty for a folder written by PEFT itself.
    """

    name: str
    embeddings: torch.Tensor
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, bytes] = field(default_factory=dict)
    """PNG images saved with the prompt, by name (`loss` -> plots/loss.png): the training run's
    plots travel with its prompt. Written by saves; `load` does not read them (see `read_plot`)."""

    @property
    def num_virtual_tokens(self) -> int:
        """Number of virtual tokens, as PEFT records it."""
        return int(self.config.get("num_virtual_tokens", self.embeddings.shape[0]))

    @property
    def token_dim(self) -> int:
        """Hidden size of the prompt vectors."""
        return int(self.embeddings.shape[-1])

    @property
    def fingerprint(self) -> Any:
        """Base-model fingerprint recorded at training time, or None (e.g. a PEFT import)."""
        return self.meta.get("fingerprint")

    @property
    def kind(self) -> str:
        """'soft' (PEFT PROMPT_TUNING: vectors before the input) or 'deep' (PEFT PREFIX_TUNING:
        keys and values in every layer, rows [n, num_layers * 2 * token_dim])."""
        return PEFT_TYPES[self.config.get("peft_type")]

    @property
    def num_rows(self) -> int:
        """Rows of the stored tensor (num_virtual_tokens x num_transformer_submodules)."""
        return int(self.embeddings.shape[0])


@dataclass
class PromptHeader:
    """What a saved prompt says about itself without its tensor: its checked PEFT config and its
    softprompt.json, read from one bank version. Enough to list a task and to check it against a
    model (`check_compatible` takes it like a `SavedPrompt`), at the cost of two small files."""

    name: str
    version: str
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    saved_at: float = 0.0
    """When this version was saved (its config file's modification time, seconds since the epoch)."""

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.config["num_virtual_tokens"])

    @property
    def num_rows(self) -> int:
        """Rows the stored tensor has (what `SavedPrompt.num_rows` will be once read)."""
        return self.num_virtual_tokens * _submodules(self.config, self.name)

    @property
    def token_dim(self) -> int:
        """Width of one stored row (deep prompts: num_layers x 2 x token_dim), as in `SavedPrompt`."""
        return _row_width(self.config)

    @property
    def fingerprint(self) -> Any:
        return self.meta.get("fingerprint")

    @property
    def kind(self) -> str:
        return PEFT_TYPES[self.config.get("peft_type")]


# ----------------------------------------------------------------------------- PEFT config


def peft_prompt_config(
    *,
    num_virtual_tokens: int,
    token_dim: int,
    num_layers: int,
    num_attention_heads: int,
    prompt_tuning_init: str = "RANDOM",
    prompt_tuning_init_text: str | None = None,
    tokenizer_name_or_path: str | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The adapter_config dict PEFT 0.21.2 writes for a causal-LM prompt-tuning adapter.

    Built by PEFT itself so the keys cannot drift; our init names are mapped to PEFT's (the caller
    keeps the exact one in meta["prompt_tuning_init"]).
    """
    from peft import PromptTuningConfig  # imported here: it costs seconds and few callers need it

    init = _peft_init_value(prompt_tuning_init, prompt_tuning_init_text, tokenizer_name_or_path)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        token_dim=token_dim,
        num_transformer_submodules=1,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        prompt_tuning_init=init,
        prompt_tuning_init_text=prompt_tuning_init_text,
        tokenizer_name_or_path=tokenizer_name_or_path,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,  # what PEFT's save_pretrained records
    )
    return _json_safe(config.to_dict())


def peft_prefix_config(
    *,
    num_virtual_tokens: int,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The adapter_config of a causal-LM prefix-tuning adapter (a deep prompt) holding the prefix
    itself: the keys PEFT 0.21.2 reads to load it (`PeftModel.from_pretrained` gives the same
    logits; tests/unit/test_deep_prompt.py). `token_dim` is one layer's key width, kv_heads x
    head_dim, so a stored row is num_layers x (key, value) x token_dim."""
    kv_width = kv_heads * head_dim
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": kv_width,
        "num_layers": num_layers,
        "num_attention_heads": kv_heads,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": kv_width,
        "prefix_projection": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }


def _peft_init_value(init: object, text: str | None, tokenizer: str | None) -> str:
    """Map our (or PEFT's) init name to a PromptTuningInit value PEFT accepts."""
    key = str(getattr(init, "value", init)).lower()
    if key not in _PEFT_INIT:
        raise ConfigError(
            f"unknown prompt_tuning_init {init!r}; expected one of {', '.join(sorted(_PEFT_INIT))}"
        )
    value = _PEFT_INIT[key]
    if value == "TEXT" and not (text and tokenizer):
        # PEFT rejects TEXT without both; the trained vector is stored, so RANDOM loses nothing.
        logger.debug("prompt_tuning_init 'text' without text and tokenizer: recording RANDOM")
        return "RANDOM"
    return value


def _json_safe(value: Any) -> Any:
    """Enums -> their values, sets -> sorted lists, tuples -> lists, recursively."""
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_json_safe(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- checks


PEFT_TYPES = {"PROMPT_TUNING": "soft", "PREFIX_TUNING": "deep"}
"""The PEFT adapter types a bank holds, and the prompt kind each one is."""


def check_config(config: object, where: str) -> None:
    """Raise PromptFileError unless `config` is a prompt- or prefix-tuning adapter config we can use."""
    if not isinstance(config, dict):
        raise PromptFileError(f"{where}: adapter config must be a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise PromptFileError(
            f"{where}: peft_type is {peft_type!r}, expected 'PROMPT_TUNING' (a soft prompt) "
            "or 'PREFIX_TUNING' (a deep prompt)"
        )
    for key in ("num_virtual_tokens", "token_dim"):
        _require_positive_int(config.get(key), key, where)
    _submodules(config, where)
    if peft_type == "PREFIX_TUNING":
        _require_positive_int(config.get("num_layers"), "num_layers", where)
        if config.get("prefix_projection"):
            raise PromptFileError(
                f"{where}: prefix_projection (an MLP kept in the file) is not "
                "supported; save the prefix itself"
            )


def _row_width(config: dict[str, Any]) -> int:
    """Columns of the stored tensor: token_dim (soft), or num_layers x (key, value) x token_dim (deep)."""
    if config["peft_type"] == "PREFIX_TUNING":
        return config["num_layers"] * 2 * config["token_dim"]
    return config["token_dim"]


def _require_positive_int(value: object, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PromptFileError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _submodules(config: dict[str, Any], where: str) -> int:
    """num_transformer_submodules (1 for causal LMs; PEFT may leave it null)."""
    value = config.get("num_transformer_submodules")
    return 1 if value is None else _require_positive_int(value, "num_transformer_submodules", where)


def check_prompt_rows(values: object, where: str) -> torch.Tensor:
    """The one check every prompt tensor passes, wherever it comes from (a bank file, an upload,
    a tensor handed to the engine or to the prompt table): 2-D [virtual tokens, width], at least
    one row, finite. `where` names it in the message ("prompt 'x'", a file)."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        shape = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise IncompatiblePromptError(
            f"{where} must be a 2-D tensor [num_virtual_tokens, width], got {shape}"
        )
    if values.shape[0] < 1:
        raise IncompatiblePromptError(f"{where} has no rows (virtual tokens)")
    if not bool(torch.isfinite(values).all()):
        raise IncompatiblePromptError(f"{where} contains NaN/inf")
    return values


def check_width(name: str, width: int, model_width: int) -> None:
    """The one message for a prompt whose rows do not fit the model."""
    if width != model_width:
        raise IncompatiblePromptError(
            f"prompt '{name}' has hidden size {width} but the model has {model_width}"
        )


def check_tensor(tensor: object, config: dict[str, Any], where: str) -> None:
    """Raise IncompatiblePromptError unless the tensor's shape and values fit the config."""
    check_prompt_rows(tensor, f"{where}: {TENSOR_KEY}")
    rows, cols = tensor.shape
    n_virtual, n_sub = config["num_virtual_tokens"], _submodules(config, where)
    if rows != n_virtual * n_sub:
        raise IncompatiblePromptError(
            f"{where}: {TENSOR_KEY} has {rows} rows but num_virtual_tokens * "
            f"num_transformer_submodules = {n_virtual} * {n_sub} = {n_virtual * n_sub}"
        )
    if cols != _row_width(config):
        expected = (
            "num_layers * 2 * token_dim" if config["peft_type"] == "PREFIX_TUNING" else "token_dim"
        )
        raise IncompatiblePromptError(
            f"{where}: {TENSOR_KEY} has {cols} columns but {expected} is {_row_width(config)}"
        )


def check_compatible(
    saved: SavedPrompt | PromptHeader,
    *,
    token_dim: int,
    fingerprint: Any = None,
    kinds: tuple[str, ...] = ("soft",),
) -> None:
    """Raise IncompatiblePromptError if `saved` cannot be used with a model of this kind.

    Checks the prompt kind against the `kinds` the caller serves, the width of its rows
    (`token_dim` = what one row must hold), and, when both sides have a fingerprint, every field
    they share.
    """
    if saved.kind not in kinds:
        raise UnsupportedPromptKindError(
            f"prompt '{saved.name}' is a {saved.kind} prompt; this path serves "
            f"{' and '.join(kinds)} prompts only",
            task=saved.name,
            kind=saved.kind,
        )
    check_width(saved.name, saved.token_dim, token_dim)
    check_fingerprint(saved, fingerprint)


def check_fingerprint(saved: SavedPrompt | PromptHeader, fingerprint: Any) -> None:
    """Raise IncompatiblePromptError if `saved` was made for another base model than `fingerprint`
    (warn when the prompt has no fingerprint; None for `fingerprint` checks nothing)."""
    if saved.fingerprint is None:
        logger.warning(
            "prompt '%s' has no base-model fingerprint (a PEFT import?); "
            "cannot verify it was made for this model",
            saved.name,
        )
        return
    if fingerprint is None:
        return
    diffs = _fingerprint_diffs(saved.fingerprint, fingerprint)
    if diffs:
        detail = "; ".join(
            f"{key}: prompt {ours!r} vs model {theirs!r}" for key, ours, theirs in diffs
        )
        trained_on = saved.meta.get("base_model")  # the name it was trained under, when recorded
        if trained_on:
            detail = f"trained on {trained_on!r}; {detail}"
        raise IncompatiblePromptError(
            f"prompt '{saved.name}' was made for another base model ({detail})"
        )


def _fingerprint_diffs(ours: Any, theirs: Any) -> list[tuple[str, Any, Any]]:
    """(field, prompt value, model value) for every shared field that differs."""
    if not (isinstance(ours, dict) and isinstance(theirs, dict)):
        return [] if ours == theirs else [("fingerprint", ours, theirs)]
    # A field only one side has (an older or newer fingerprint format) cannot be compared.
    shared = sorted(ours.keys() & theirs.keys())
    if not shared and (ours or theirs):
        logger.warning("fingerprints share no field; cannot verify the base model")
    return [(key, ours[key], theirs[key]) for key in shared if ours[key] != theirs[key]]


def check_plots(plots: dict[str, bytes], where: str) -> None:
    """Raise PromptFileError unless every plot has a plain name and is a PNG image."""
    for name, data in plots.items():
        if not isinstance(name, str) or PLOT_NAME_RE.fullmatch(name) is None:
            raise PromptFileError(f"{where}: invalid plot name {name!r} (use a-z, 0-9 and '_')")
        if not isinstance(data, bytes) or not data.startswith(PNG_SIGNATURE):
            raise PromptFileError(f"{where}: plot '{name}' is not a PNG image")
