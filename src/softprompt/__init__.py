"""softprompt: prompt tuning for frozen causal LMs, with mixed-task batches and a KV prefix cache."""

__version__ = "0.1.0"

from .bank import PromptBank, SavedPrompt  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402
from .prompted import PromptedModel  # noqa: E402
from .prompts import NO_TASK, PromptTuningConfig  # noqa: E402
from .train import TrainConfig, Trainer, train_prompts  # noqa: E402

__all__ = [
    "NO_TASK",
    "LoadedModel",
    "PromptBank",
    "PromptTuningConfig",
    "PromptedModel",
    "SavedPrompt",
    "TrainConfig",
    "Trainer",
    "load_model",
    "train_prompts",
    "__version__",
]
