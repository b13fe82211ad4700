"""One source of truth for options: config dataclasses whose fields carry help strings.

The CLI builds its flags from them (`--per-device-train-batch-size` from
`per_device_train_batch_size`), so a new field is a new documented flag with no second list.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field


def opt(default, help: str, **kwargs):
    """A dataclass field with a help string."""
    if isinstance(default, list | dict):
        return field(
            default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs
        )
    return field(default=default, metadata={"help": help}, **kwargs)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser,
    config_type,
    *,
    skip: tuple[str, ...] = (),
    defaults: dict | None = None,
) -> None:
    """Add one flag per field of `config_type` (bools become --x / --no-x)."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, _default(f))
        kind = hints[f.name]
        help_text = f.metadata.get("help", "") + " (default: %(default)s)"
        if kind is bool:
            parser.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]  # list[int] flags give ints
            parser.add_argument(
                flag(f.name),
                type=lambda s, item=item: [item(x) for x in s.split(",") if x],
                default=default,
                help=help_text + " Comma-separated.",
            )
        else:
            parser.add_argument(
                flag(f.name), type=_scalar_type(kind), default=default, help=help_text
            )


def from_args(config_type, args: argparse.Namespace, **overrides):
    """Build `config_type` from parsed flags (fields missing from args keep their default)."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config_type)
        if hasattr(args, f.name)
    }
    return config_type(**{**values, **overrides})


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _scalar_type(kind):
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind
