"""Readers: a path (JSONL / CSV / TSV / parquet / arrow / `save_to_disk` folder, or `builtin:NAME:SPLIT`)
-> [(line, record)]. Every row keeps the number of the line it came from, so a bad row is reported as
`file:line` with the field that is wrong (`DataError`)."""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from softprompt.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


BUILTIN_PREFIX = "builtin:"
"""`builtin:NAME:SPLIT` names a built-in set (builtin.py) wherever a data path is read."""

Record = dict[str, Any]
Rows = list[tuple[int, Record]]

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


OnBadLine = Callable[[DataError], None]
"""Receives the error of a line that cannot be read (the line is then left out)."""


def _raise(error: DataError) -> None:
    raise error


def read_file(
    path: str | Path, *, fmt: str | None = None, on_bad_line: OnBadLine | None = None
) -> Rows:
    """Read a data file into `(line number, record)` pairs.

    `path` is a file or a `save_to_disk` folder (`builtin:NAME:SPLIT` paths are read by
    `builtin.read_records`). Line numbers are physical lines for JSONL, CSV and TSV (the first CSV
    data row is line 2) and row index + 1 for Arrow / Parquet / folders. `fmt` overrides the format
    guessed from the extension (see `FORMATS`). A line that cannot be read as a record (malformed
    JSON, not a JSON object, invalid UTF-8 or Unicode, a wrong number of columns) raises DataError,
    or goes to `on_bad_line` and is left out.
    """
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", path=str(path))
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


def read_csv(p: Path, on_bad_line: OnBadLine = _raise) -> Rows:
    """Rows of a CSV file with a header row, keyed by its column names."""
    return _read_delimited(p, csv.reader(_lines(p)), "CSV", on_bad_line)


def read_tsv(p: Path, on_bad_line: OnBadLine = _raise) -> Rows:
    """Rows of a TSV file with a header row. TSV has no quoting (IANA text/tab-separated-values): one physical line per row."""
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
    "csv": read_csv,
    "tsv": read_tsv,
    "parquet": lambda p, _: _read_parquet(p),
    "arrow": lambda p, _: _read_arrow(p),
    "disk": lambda p, _: _read_disk(p),
}
