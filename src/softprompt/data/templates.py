"""Template (`{any column}` placeholders -> the model's input text) and Verbalizer (label ->
target words)."""

from __future__ import annotations

import logging
import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from softprompt.data.readers import is_valid_unicode
from softprompt.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


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
                if is_empty(value):
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
        raise ConfigError(
            f"bad template {text!r}: conversions like !{conversion} are not supported; {plain}"
        )
    if spec:
        raise ConfigError(
            f"bad template {text!r}: format specs like :{spec} are not supported; {plain}"
        )
    if "." in name or "[" in name:
        raise ConfigError(
            f"bad template {text!r}: attribute or index access like {{{name}}} is not supported; {plain}"
        )


def is_empty(value: Any) -> bool:
    """A missing field value: None, a blank string or NaN (how pandas and Arrow write a gap)."""
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
        ids = [encode_plain(tokenizer, t) for t in self.targets]
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


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` alone, without the special tokens the tokenizer would add."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
