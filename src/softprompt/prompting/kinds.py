"""The prompt kinds there are, by name (`--prompt-type`, `SavedPrompt.kind`), and the model for a
saved prompt of any of them. What a kind is: kind.py."""

from __future__ import annotations

from softprompt.bank import SavedPrompt
from softprompt.errors import ConfigError
from softprompt.model.loading import LoadedModel
from softprompt.prompting.deep import DeepPrompt
from softprompt.prompting.kind import PromptKind
from softprompt.prompting.prompted import PromptedModel
from softprompt.prompting.soft import SoftPrompt

KINDS: dict[str, type] = {kind.name: kind for kind in (SoftPrompt, DeepPrompt)}
"""Each kind's class by its name; `kind_named` makes one."""


def kind_class(name: str) -> type:
    """The class of kind `name`; an unknown name is a ConfigError listing the kinds."""
    if name not in KINDS:
        raise ConfigError(f"unknown prompt kind {name!r}; choose from {', '.join(sorted(KINDS))}")
    return KINDS[name]


def kind_named(name: str, **options) -> PromptKind:
    """A fresh kind `name` (options: the kind's own, e.g. DeepPrompt's `reparam_hidden`)."""
    return kind_class(name)(**options)


def default_learning_rate(name: str) -> float:
    """The peak learning rate a prompt of kind `name` trains with unless told."""
    return kind_class(name).default_learning_rate


def model_for_saved(
    loaded: LoadedModel, saved: SavedPrompt, name: str | None = None
) -> PromptedModel:
    """A PromptedModel of the saved prompt's own kind on `loaded`, holding `saved` under `name`
    (default: its own name): what eval, generate and inspect load a bank task into."""
    prompted = PromptedModel(loaded, kind=kind_named(saved.kind))
    prompted.add_task(name or saved.name, saved)
    return prompted


__all__ = ["KINDS", "default_learning_rate", "kind_class", "kind_named", "model_for_saved"]
