"""Task (template + verbalizer, or a free-form target) and Example: records -> tokenised rows.

An Example holds the tokenised input (the rendered template, with the tokenizer's own special
tokens) and the target ids (the verbalizer's words for the label, or a free-form target).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.data.builtin import BuiltinSpec, read_records
from softprompt.data.readers import Record, is_valid_unicode
from softprompt.data.templates import Template, Verbalizer, encode_plain, is_empty
from softprompt.errors import ConfigError, DataError, InvalidTaskNameError, NoVerbalizerError

logger = logging.getLogger(__name__)


TASK_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
"""The one task-name rule (docs/architecture.md): a task name is also its folder name in the prompt
bank, a request's `model` value and a pattern target for tenants' keys."""
TASK_NAME_RE = re.compile(TASK_NAME_PATTERN)
"""A valid task name (whole string, with `fullmatch`)."""


def validate_task_name(name: object) -> str:
    """Return `name` if it is a valid task name; raise InvalidTaskNameError otherwise.

    Runs before any disk access, so a name like `../x` can never reach a path.
    """
    if not isinstance(name, str) or TASK_NAME_RE.fullmatch(name) is None:
        raise InvalidTaskNameError(
            f"invalid task name {name!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass
class Task:
    """What to ask the model and what it should answer, for one soft prompt."""

    name: str
    """Task name: `[a-z0-9][a-z0-9._-]{0,63}` (also the prompt's folder name in the bank)."""
    template: Template
    """Prompt template rendered from each record (a str is turned into a Template)."""
    verbalizer: Verbalizer | None
    """Label names -> target strings; None for free-form generation from `target_column`."""
    label_column: str = "label"
    """Column holding the class label (classification tasks)."""
    target_column: str | None = None
    """Column holding the target text (free-form tasks)."""
    add_eos_to_target: bool = False
    """Append the tokenizer's EOS to each target (so generation learns to stop)."""

    def __post_init__(self) -> None:
        validate_task_name(self.name)
        if isinstance(self.template, str):
            self.template = Template(self.template)

    @property
    def is_classification(self) -> bool:
        """True when the task has a verbalizer (fixed label set)."""
        return self.verbalizer is not None


@dataclass
class Example:
    """One tokenised row: the model reads `input_ids` and is trained to produce `target_ids`."""

    input_ids: list[int]
    """Rendered template, with the tokenizer's default special tokens (e.g. BOS)."""
    target_ids: list[int]
    """Verbalizer target of the label, or the free-form target (empty when there is none)."""
    task_id: int
    """Row of the prompt table this example uses."""
    label: int | None
    """Class index for classification tasks, else None."""
    line: int | None = None
    """Line (or row) of the source file, for messages."""

    @property
    def length(self) -> int:
        """Tokens in the joined sequence (input + target), without the soft prompt."""
        return len(self.input_ids) + len(self.target_ids)


def make_classification_task(
    name: str, template: str | Template, labels: Sequence[str], targets: Sequence[str] | None = None
) -> Task:
    """A classification Task from a template string and label names (targets default ' label')."""
    tmpl = template if isinstance(template, Template) else Template(template)
    return Task(name=name, template=tmpl, verbalizer=Verbalizer(labels, targets))


def builtin_task(spec: BuiltinSpec, name: str | None = None) -> Task:
    """The classification task of a built-in set: its default template and labels."""
    return make_classification_task(name or spec.name, spec.template, list(spec.labels))


def task_from_meta(name: str, meta: Mapping[str, Any]) -> Task:
    """The classification Task a saved prompt was trained with, from its `softprompt.json`
    (template and verbalizer). The one reading of that meta: `softprompt eval`, the built-in
    engine and the vLLM gateway all render and score through the Task it returns, so they agree."""
    verbalizer = meta.get("verbalizer")
    if not isinstance(verbalizer, Mapping):
        raise NoVerbalizerError(
            f"task {name!r} has no verbalizer: it cannot classify (save it with "
            "meta['verbalizer'] = {'labels': [...], 'targets': [...]})"
        )
    labels, targets = verbalizer.get("labels"), verbalizer.get("targets")
    if not (_string_list(labels) and (targets is None or _string_list(targets))):
        raise ConfigError(
            f"task {name!r}: verbalizer needs a list of label strings and optionally one "
            f"target string per label, got {dict(verbalizer)!r}"
        )
    template = template_from_meta(name, meta)
    try:
        return Task(name, template, Verbalizer(labels, targets))
    except ConfigError as exc:
        raise ConfigError(f"task {name!r}: {exc}") from None


def template_from_meta(name: str, meta: Mapping[str, Any]) -> Template:
    """A saved prompt's template (`{text}` when it has none)."""
    text = meta.get("template") or "{text}"
    if not isinstance(text, str):
        raise ConfigError(f"task {name!r}: template must be a string, not {type(text).__name__}")
    try:
        return Template(text)
    except ConfigError as exc:
        raise ConfigError(f"task {name!r}: {exc}") from None


def _string_list(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, str) and is_valid_unicode(v) for v in values
    )


def encode_example(
    tokenizer: Any,
    task: Task,
    record: Mapping[str, Any],
    task_id: int,
    *,
    path: str | None = None,
    line: int | None = None,
    max_length: int | None = None,
    require_target: bool = True,
) -> Example:
    """Tokenise one record. `max_length` bounds input + target; the input loses tokens on the
    left (the end, nearest the answer, is kept; leading special tokens stay). With
    `require_target=False` a row without a label / target column gets empty `target_ids`."""
    class_targets = task.verbalizer.target_token_ids(tokenizer) if task.verbalizer else None
    return _encode(
        tokenizer,
        task,
        record,
        task_id,
        class_targets,
        path=path,
        line=line,
        max_length=max_length,
        require_target=require_target,
    )


def _encode(
    tokenizer: Any,
    task: Task,
    record: Mapping[str, Any],
    task_id: int,
    class_targets: list[list[int]] | None,
    *,
    path: str | None,
    line: int | None,
    max_length: int | None,
    require_target: bool,
) -> Example:
    input_ids = list(tokenizer(task.template.render(record, path, line))["input_ids"])
    label, target_ids = _target(
        tokenizer, task, record, class_targets, path=path, line=line, require_target=require_target
    )
    if max_length is not None and len(input_ids) + len(target_ids) > max_length:
        input_ids = _truncate_left(
            tokenizer, task, input_ids, max_length - len(target_ids), path=path, line=line
        )
    return Example(input_ids, target_ids, task_id, label, line)


def _target(
    tokenizer: Any,
    task: Task,
    record: Mapping[str, Any],
    class_targets: list[list[int]] | None,
    *,
    path: str | None,
    line: int | None,
    require_target: bool,
) -> tuple[int | None, list[int]]:
    """(class index or None, target ids) of a record."""
    column = task.label_column if task.verbalizer else task.target_column
    if column is None:
        if require_target:
            raise ConfigError(
                f"task '{task.name}' has no verbalizer and no target_column: nothing to train on"
            )
        return None, []
    value = record.get(column)
    if is_empty(value):
        if not require_target and column not in record:
            return None, []
        raise DataError(
            "missing column" if column not in record else "empty value",
            path=path,
            line=line,
            field=column,
        )
    if task.verbalizer is not None:
        label = task.verbalizer.index_of(value, path, line, field=column)
        targets = class_targets or task.verbalizer.target_token_ids(tokenizer)
        return label, list(targets[label]) + _eos(tokenizer, task)
    ids = encode_plain(tokenizer, str(value))
    if not ids:
        raise DataError("target encodes to no tokens", path=path, line=line, field=column)
    return None, ids + _eos(tokenizer, task)


def _eos(tokenizer: Any, task: Task) -> list[int]:
    if not task.add_eos_to_target:
        return []
    if tokenizer.eos_token_id is None:
        raise ConfigError("add_eos_to_target is set but the tokenizer has no EOS token")
    return [tokenizer.eos_token_id]


_warned_truncation: set[str] = set()


def _truncate_left(
    tokenizer: Any,
    task: Task,
    input_ids: list[int],
    budget: int,
    *,
    path: str | None,
    line: int | None,
) -> list[int]:
    """Keep leading special tokens (BOS) and the last tokens of the text, `budget` in all."""
    special = set(getattr(tokenizer, "all_special_ids", ()))
    n_lead = next((i for i, t in enumerate(input_ids) if t not in special), len(input_ids))
    keep = budget - n_lead
    if keep < 1:
        raise DataError(
            f"max_length leaves {budget} token(s) for the input after the target; "
            f"need at least {n_lead + 1}",
            path=path,
            line=line,
            field=task.target_column or task.label_column,
        )
    if task.name not in _warned_truncation:
        _warned_truncation.add(task.name)
        logger.warning(
            "task %s: inputs longer than max_length are cut on the left (first at "
            "%s:%s, %d -> %d tokens); further cuts are not logged",
            task.name,
            path,
            line,
            len(input_ids),
            budget,
        )
    return input_ids[:n_lead] + input_ids[len(input_ids) - keep :]


def load_examples(
    path: str | Path,
    task: Task,
    tokenizer: Any,
    task_id: int = 0,
    *,
    text_column: str | None = None,
    skip_bad_rows: bool = False,
    max_length: int | None = None,
    fmt: str | None = None,
    require_target: bool = True,
) -> tuple[list[Example], int]:
    """Read and tokenise a data file for `task`: returns (examples, number of rows skipped).

    A bad row (a line that is not a record, a missing column, empty text, unknown label, empty
    target) raises DataError naming the file, line and field, unless `skip_bad_rows`: then it is
    dropped, counted and logged.
    `text_column` names the column that fills the template's `{text}`.
    """
    if text_column is not None and "text" not in task.template.fields:
        raise ConfigError(
            f"text_column={text_column!r} given but the template has no {{text}}: "
            f"{task.template.text!r}"
        )
    where = str(path)
    class_targets = task.verbalizer.target_token_ids(tokenizer) if task.verbalizer else None
    examples: list[Example] = []
    reasons: list[str] = []
    skip = (lambda e: reasons.append(str(e))) if skip_bad_rows else None
    for line, record in read_records(path, fmt=fmt, on_bad_line=skip):
        try:
            record = _rename_text(record, text_column, where, line)
            examples.append(
                _encode(
                    tokenizer,
                    task,
                    record,
                    task_id,
                    class_targets,
                    path=where,
                    line=line,
                    max_length=max_length,
                    require_target=require_target,
                )
            )
        except DataError as e:
            if not skip_bad_rows:
                raise
            reasons.append(str(e))
    return examples, _report_skipped(where, examples, reasons)


def _rename_text(record: Record, text_column: str | None, path: str, line: int) -> Record:
    if text_column is None or text_column == "text":
        return record
    if text_column not in record:
        raise DataError("missing column", path=path, line=line, field=text_column)
    return {**record, "text": record[text_column]}


def _report_skipped(path: str, examples: list[Example], reasons: list[str]) -> int:
    if not examples:
        first = f"; first: {reasons[0]}" if reasons else ""
        raise DataError(f"no usable rows ({len(reasons)} bad{first})", path=path)
    if reasons:
        logger.warning(
            "%s: skipped %d bad row(s) of %d; first: %s",
            path,
            len(reasons),
            len(reasons) + len(examples),
            " | ".join(reasons[:3]),
        )
    logger.info("%s: %d examples", path, len(examples))
    return len(reasons)
