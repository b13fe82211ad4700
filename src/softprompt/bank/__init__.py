"""Prompt files and the prompt bank: one PEFT-compatible folder per task, saved atomically.

format.py   `SavedPrompt`, the PEFT adapter configs, checks of a config, its tensor,
            plots and base-model fingerprint (`check_compatible`); no disk access
files.py    one prompt folder: encoding and writing its files (each fsynced), parsing them back
            (`prompt_from_files` for folders and uploads alike, `read_prompt_dir`, `write_prompt_dir`)
store.py    `PromptBank`: versioned folders behind a symlink swapped atomically, per-task writer
            locks, readers that retry when a version vanished under them; opening a bank clears
            up after writers killed mid-way
"""

from softprompt.bank.files import (
    MAX_JSON_DEPTH,
    parse_json_object,
    prompt_from_files,
    read_prompt_dir,
    write_prompt_dir,
)
from softprompt.bank.format import (
    CONFIG_FILE,
    META_FILE,
    PEFT_TYPES,
    PLOTS_DIR,
    PNG_SIGNATURE,
    TENSOR_KEY,
    WEIGHTS_FILE,
    PromptHeader,
    SavedPrompt,
    check_compatible,
    check_prompt_rows,
    check_width,
    peft_prefix_config,
    peft_prompt_config,
)
from softprompt.bank.store import PromptBank
from softprompt.data.tasks import TASK_NAME_PATTERN, validate_task_name

__all__ = [
    "CONFIG_FILE",
    "MAX_JSON_DEPTH",
    "META_FILE",
    "PEFT_TYPES",
    "PLOTS_DIR",
    "PNG_SIGNATURE",
    "TASK_NAME_PATTERN",
    "TENSOR_KEY",
    "WEIGHTS_FILE",
    "PromptBank",
    "PromptHeader",
    "SavedPrompt",
    "check_compatible",
    "check_prompt_rows",
    "check_width",
    "parse_json_object",
    "peft_prefix_config",
    "peft_prompt_config",
    "prompt_from_files",
    "read_prompt_dir",
    "validate_task_name",
    "write_prompt_dir",
]
