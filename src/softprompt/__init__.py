"""softprompt: prompt tuning for frozen causal LMs, with mixed-task batches and a KV prefix cache."""

__version__ = "0.1.0"

from softprompt.bank import PromptBank, SavedPrompt  # noqa: E402
from softprompt.model.loading import LoadedModel, load_model  # noqa: E402
from softprompt.prompting.deep import DeepPrompt, DeepPromptModel  # noqa: E402
from softprompt.prompting.kind import PromptKind  # noqa: E402
from softprompt.prompting.prompted import PromptedModel  # noqa: E402
from softprompt.prompting.soft import NO_TASK, PromptTuningConfig, SoftPrompt  # noqa: E402
from softprompt.training.trainer import TrainConfig, Trainer, train_prompts  # noqa: E402

__all__ = [
    "NO_TASK",
    "DeepPrompt",
    "DeepPromptModel",
    "LoadedModel",
    "PromptBank",
    "PromptKind",
    "PromptTuningConfig",
    "PromptedModel",
    "SavedPrompt",
    "SoftPrompt",
    "TrainConfig",
    "Trainer",
    "load_model",
    "train_prompts",
    "__version__",
]
