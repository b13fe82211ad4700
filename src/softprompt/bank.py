"""Prompt files and the prompt bank: one PEFT-compatible folder per task, saved atomically.

A prompt folder holds `adapter_config.json` (PEFT's keys), `adapter_model.safetensors` (the one
tensor `prompt_embeddings`, shape [num_virtual_tokens, token_dim]) and our `softprompt.json`
(template, verbalizer, fingerprint, metrics, ...). PEFT ignores our file; we ignore unknown files.

Layout of a bank folder::

    <root>/<task>                         relative symlink -> .versions/<task>/<version>
    <root>/.versions/<task>/<version>/    the three files of one saved version (and plots/*.png)
    <root>/.locks/<task>.lock             flock that serialises the writers of one task

A save writes a complete new version folder, then swaps the symlink with `os.replace`, so a reader
sees either the old complete version or the new complete one, never a mix. Writers of one task
hold its lock, so the cleanup of old versions can never delete a version that another writer is
about to link. The version linked before the current one is kept as well: a reader that resolved
the old link just before a swap can still finish reading it, and readers retry when a version
vanished under them.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from .atomic import fsync_dir, fsync_file
from .errors import (
    ConfigError,
    IncompatiblePromptError,
    InvalidTaskNameError,
    PromptFileError,
    UnknownTaskError,
    UnsupportedPromptKindError,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock: one writer per task there
    fcntl = None

logger = logging.getLogger(__name__)

TASK_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "softprompt.json"
TENSOR_KEY = "prompt_embeddings"
PLOTS_DIR = "plots"
"""Sub-folder of a saved version holding the training run's PNG plots (loss, validation, ...)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_TASK_NAME_RE = re.compile(TASK_NAME_PATTERN)
_PLOT_NAME_RE = re.compile(r"[a-z0-9_]{1,64}")
_VERSIONS_DIR = ".versions"
_LOCKS_DIR = ".locks"
_TMP_PREFIX = ".tmp-"
_LINK_PREFIX = ".tmp-link-"
_LINK_SEP = "@"  # cannot occur in a task name, so '<name>@<version>' parses unambiguously
_READ_ATTEMPTS = 3
MAX_JSON_DEPTH = 32
"""Deepest nesting accepted in adapter_config.json / softprompt.json (ours is 3 levels deep)."""

# Our init names -> PEFT's PromptTuningInit values. class_labels / from_file have no PEFT
# equivalent; the vector is stored anyway, so PEFT only needs a value it accepts.
_PEFT_INIT = {
    "text": "TEXT",
    "random": "RANDOM",
    "sampled_vocab": "SAMPLE_VOCAB",
    "sample_vocab": "SAMPLE_VOCAB",
    "class_labels": "RANDOM",
    "from_file": "RANDOM",
}


# ----------------------------------------------------------------------------- names and data


def validate_task_name(name: object) -> str:
    """Return `name` if it is a valid task name; raise InvalidTaskNameError otherwise.

    Runs before any disk access, so a name like `../x` can never reach a path.
    """
    if not isinstance(name, str) or _TASK_NAME_RE.fullmatch(name) is None:
        raise InvalidTaskNameError(
            f"invalid task name {name!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass
class SavedPrompt:
    """One task's soft prompt as stored on disk.

    `embeddings` is float32, shape [num_virtual_tokens * num_transformer_submodules, token_dim];
    `config` is the PEFT adapter_config; `meta` is the content of softprompt.json (template,
    verbalizer, fingerprint, metrics, ...), empty for a folder written by PEFT itself.
    """

    name: str
    embeddings: torch.Tensor
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, bytes] = field(default_factory=dict)
    """PNG images saved with the prompt, by name (`loss` -> plots/loss.png): the training run's
    plots travel with its prompt. Written by saves; `load` does not read them (see `read_plot`)."""

    @property
    def num_virtual_tokens(self) -> int:
        """Number of virtual tokens, as PEFT records it."""
        return int(self.config.get("num_virtual_tokens", self.embeddings.shape[0]))

    @property
    def token_dim(self) -> int:
        """Hidden size of the prompt vectors."""
        return int(self.embeddings.shape[-1])

    @property
    def fingerprint(self) -> Any:
        """Base-model fingerprint recorded at training time, or None (e.g. a PEFT import)."""
        return self.meta.get("fingerprint")

    @property
    def kind(self) -> str:
        """'soft' (PEFT PROMPT_TUNING: vectors before the input) or 'deep' (PEFT PREFIX_TUNING:
        keys and values in every layer, rows [n, num_layers * 2 * token_dim])."""
        return PEFT_TYPES[self.config.get("peft_type")]


# ----------------------------------------------------------------------------- PEFT config


def peft_prompt_config(
    *,
    num_virtual_tokens: int,
    token_dim: int,
    num_layers: int,
    num_attention_heads: int,
    prompt_tuning_init: str = "RANDOM",
    prompt_tuning_init_text: str | None = None,
    tokenizer_name_or_path: str | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The adapter_config dict PEFT 0.21.2 writes for a causal-LM prompt-tuning adapter.

    Built by PEFT itself so the keys cannot drift; our init names are mapped to PEFT's (the caller
    keeps the exact one in meta["prompt_tuning_init"]).
    """
    from peft import PromptTuningConfig  # imported here: it costs seconds and few callers need it

    init = _peft_init_value(prompt_tuning_init, prompt_tuning_init_text, tokenizer_name_or_path)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        token_dim=token_dim,
        num_transformer_submodules=1,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        prompt_tuning_init=init,
        prompt_tuning_init_text=prompt_tuning_init_text,
        tokenizer_name_or_path=tokenizer_name_or_path,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,  # what PEFT's save_pretrained records
    )
    return _json_safe(config.to_dict())


def _peft_init_value(init: object, text: str | None, tokenizer: str | None) -> str:
    """Map our (or PEFT's) init name to a PromptTuningInit value PEFT accepts."""
    key = str(getattr(init, "value", init)).lower()
    if key not in _PEFT_INIT:
        raise ConfigError(
            f"unknown prompt_tuning_init {init!r}; expected one of {', '.join(sorted(_PEFT_INIT))}"
        )
    value = _PEFT_INIT[key]
    if value == "TEXT" and not (text and tokenizer):
        # PEFT rejects TEXT without both; the trained vector is stored, so RANDOM loses nothing.
        logger.debug("prompt_tuning_init 'text' without text and tokenizer: recording RANDOM")
        return "RANDOM"
    return value


def _json_safe(value: Any) -> Any:
    """Enums -> their values, sets -> sorted lists, tuples -> lists, recursively."""
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_json_safe(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- checks


PEFT_TYPES = {"PROMPT_TUNING": "soft", "PREFIX_TUNING": "deep"}
"""The PEFT adapter types a bank holds, and the prompt kind each one is."""


def _check_config(config: object, where: str) -> None:
    """Raise PromptFileError unless `config` is a prompt- or prefix-tuning adapter config we can use."""
    if not isinstance(config, dict):
        raise PromptFileError(f"{where}: adapter config must be a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise PromptFileError(
            f"{where}: peft_type is {peft_type!r}, expected 'PROMPT_TUNING' (a soft prompt) "
            "or 'PREFIX_TUNING' (a deep prompt)"
        )
    for key in ("num_virtual_tokens", "token_dim"):
        _require_positive_int(config.get(key), key, where)
    _submodules(config, where)
    if peft_type == "PREFIX_TUNING":
        _require_positive_int(config.get("num_layers"), "num_layers", where)
        if config.get("prefix_projection"):
            raise PromptFileError(f"{where}: prefix_projection (an MLP kept in the file) is not "
                                  "supported; save the prefix itself")


def _row_width(config: dict[str, Any]) -> int:
    """Columns of the stored tensor: token_dim (soft), or num_layers x (key, value) x token_dim (deep)."""
    if config["peft_type"] == "PREFIX_TUNING":
        return config["num_layers"] * 2 * config["token_dim"]
    return config["token_dim"]


def _require_positive_int(value: object, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PromptFileError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _submodules(config: dict[str, Any], where: str) -> int:
    """num_transformer_submodules (1 for causal LMs; PEFT may leave it null)."""
    value = config.get("num_transformer_submodules")
    return 1 if value is None else _require_positive_int(value, "num_transformer_submodules", where)


def _check_tensor(tensor: object, config: dict[str, Any], where: str) -> None:
    """Raise IncompatiblePromptError unless the tensor's shape and values fit the config."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise IncompatiblePromptError(
            f"{where}: {TENSOR_KEY} must be a 2-D tensor [num_virtual_tokens, token_dim], got {shape}"
        )
    rows, cols = tensor.shape
    n_virtual, n_sub = config["num_virtual_tokens"], _submodules(config, where)
    if rows != n_virtual * n_sub:
        raise IncompatiblePromptError(
            f"{where}: {TENSOR_KEY} has {rows} rows but num_virtual_tokens * "
            f"num_transformer_submodules = {n_virtual} * {n_sub} = {n_virtual * n_sub}"
        )
    if cols != _row_width(config):
        expected = ("num_layers * 2 * token_dim" if config["peft_type"] == "PREFIX_TUNING"
                    else "token_dim")
        raise IncompatiblePromptError(
            f"{where}: {TENSOR_KEY} has {cols} columns but {expected} is {_row_width(config)}"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise IncompatiblePromptError(f"{where}: {TENSOR_KEY} contains NaN/inf")


def check_compatible(saved: SavedPrompt, *, token_dim: int, fingerprint: Any = None,
                     kinds: tuple[str, ...] = ("soft",)) -> None:
    """Raise IncompatiblePromptError if `saved` cannot be used with a model of this kind.

    Checks the prompt kind against the `kinds` the caller serves, the width of its rows
    (`token_dim` = what one row must hold), and, when both sides have a fingerprint, every field
    they share.
    """
    if saved.kind not in kinds:
        raise UnsupportedPromptKindError(
            f"prompt '{saved.name}' is a {saved.kind} prompt; this path serves "
            f"{' and '.join(kinds)} prompts only",
            task=saved.name, kind=saved.kind,
        )
    if saved.token_dim != token_dim:
        raise IncompatiblePromptError(
            f"prompt '{saved.name}' has hidden size {saved.token_dim} but the model has {token_dim}"
        )
    _check_fingerprint(saved, fingerprint)


def _check_fingerprint(saved: SavedPrompt, fingerprint: Any) -> None:
    if saved.fingerprint is None:
        logger.warning(
            "prompt '%s' has no base-model fingerprint (a PEFT import?); "
            "cannot verify it was made for this model",
            saved.name,
        )
        return
    if fingerprint is None:
        return
    diffs = _fingerprint_diffs(saved.fingerprint, fingerprint)
    if diffs:
        detail = "; ".join(
            f"{key}: prompt {ours!r} vs model {theirs!r}" for key, ours, theirs in diffs
        )
        raise IncompatiblePromptError(
            f"prompt '{saved.name}' was made for another base model ({detail})"
        )


def _fingerprint_diffs(ours: Any, theirs: Any) -> list[tuple[str, Any, Any]]:
    """(field, prompt value, model value) for every shared field that differs."""
    if not (isinstance(ours, dict) and isinstance(theirs, dict)):
        return [] if ours == theirs else [("fingerprint", ours, theirs)]
    # A field only one side has (an older or newer fingerprint format) cannot be compared.
    shared = sorted(ours.keys() & theirs.keys())
    if not shared and (ours or theirs):
        logger.warning("fingerprints share no field; cannot verify the base model")
    return [(key, ours[key], theirs[key]) for key in shared if ours[key] != theirs[key]]


# ----------------------------------------------------------------------------- file io


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_tensor(path: Path, tensor: torch.Tensor) -> None:
    """Write the prompt tensor as float32 safetensors and fsync it."""
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    safetensors.torch.save_file({TENSOR_KEY: data}, str(path), metadata={"format": "pt"})
    fsync_file(path)


def _dumps(obj: object, where: str, *, sort_keys: bool = False) -> str:
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a dict, got {type(obj).__name__}")
    try:
        return json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"
    except (TypeError, ValueError) as exc:
        raise PromptFileError(f"{where}: cannot be written as JSON: {exc}") from exc


def _encode(saved: SavedPrompt) -> tuple[str, str]:
    """Check `saved` and return (config JSON, meta JSON); touches no disk."""
    where = f"prompt '{saved.name}'"
    _check_config(saved.config, where)
    _check_tensor(saved.embeddings, saved.config, where)
    _check_plots(saved.plots, where)
    # sort_keys for the config: the same byte layout PEFT writes.
    return _dumps(saved.config, f"{where} config", sort_keys=True), _dumps(
        saved.meta, f"{where} meta"
    )


def _check_plots(plots: dict[str, bytes], where: str) -> None:
    for name, data in plots.items():
        if not isinstance(name, str) or _PLOT_NAME_RE.fullmatch(name) is None:
            raise PromptFileError(f"{where}: invalid plot name {name!r} (use a-z, 0-9 and '_')")
        if not isinstance(data, bytes) or not data.startswith(PNG_SIGNATURE):
            raise PromptFileError(f"{where}: plot '{name}' is not a PNG image")


def _write_files(folder: Path, saved: SavedPrompt, config_text: str, meta_text: str) -> None:
    _write_text(folder / CONFIG_FILE, config_text)
    _write_tensor(folder / WEIGHTS_FILE, saved.embeddings)
    _write_text(folder / META_FILE, meta_text)
    if saved.plots:
        (folder / PLOTS_DIR).mkdir()
        for name, data in saved.plots.items():
            _write_bytes(folder / PLOTS_DIR / f"{name}.png", data)
        fsync_dir(folder / PLOTS_DIR)
    fsync_dir(folder)


def write_prompt_dir(path: str | os.PathLike[str], saved: SavedPrompt) -> None:
    """Write the three prompt files into the existing empty folder `path`, each fsynced."""
    folder = Path(path)
    config_text, meta_text = _encode(saved)
    if not folder.is_dir():
        raise PromptFileError(f"prompt folder {folder} does not exist")
    if any(folder.iterdir()):
        raise PromptFileError(f"prompt folder {folder} is not empty")
    _write_files(folder, saved, config_text, meta_text)


def parse_json_object(data: bytes | str, where: str) -> dict[str, Any]:
    """A JSON object from untrusted text; anything else is a PromptFileError naming `where`.

    Also refused: nesting deeper than `MAX_JSON_DEPTH` (it would overflow the stack when written
    back) and integers with more digits than Python converts (a ValueError from `json`).
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{where} is not UTF-8 text: {exc.reason}") from None
    except RecursionError:
        raise PromptFileError(f"{where} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
        raise PromptFileError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PromptFileError(f"{where} must hold a JSON object, got {type(value).__name__}")
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise PromptFileError(f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative: the value may be deeper than the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _tensor_from_bytes(data: bytes, where: str) -> torch.Tensor:
    """`prompt_embeddings` from the bytes of a safetensors file, as float32."""
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # a malformed header raises several types (SafetensorError, ...)
        raise PromptFileError(f"{where} is not a readable safetensors file: {exc}") from None
    if TENSOR_KEY not in tensors:
        found = ", ".join(tensors) or "none"
        raise PromptFileError(f"{where} has no tensor '{TENSOR_KEY}' (found: {found})")
    return tensors[TENSOR_KEY].to(dtype=torch.float32, copy=True)


def prompt_from_files(files: dict[str, bytes], name: str, *, where: str = "") -> SavedPrompt:
    """Parse and check a prompt from its files' bytes (config, weights, optional meta).

    The one parser of prompt files, for folders on disk and for uploads alike. Errors name each
    file as `where` + its name, so an upload's errors show only the file names the client sent.
    """
    config = parse_json_object(_required(files, CONFIG_FILE, where), where + CONFIG_FILE)
    _check_config(config, where + CONFIG_FILE)
    weights = _required(files, WEIGHTS_FILE, where)
    embeddings = _tensor_from_bytes(weights, where + WEIGHTS_FILE)  # (n_virtual * n_sub, d)
    _check_tensor(embeddings, config, where + WEIGHTS_FILE)
    meta = parse_json_object(files[META_FILE], where + META_FILE) if META_FILE in files else {}
    return SavedPrompt(name=name, embeddings=embeddings, config=config, meta=meta)


def _required(files: dict[str, bytes], file_name: str, where: str) -> bytes:
    if file_name not in files:
        raise PromptFileError(f"{where}{file_name} is missing")
    return files[file_name]


def _read_files(folder: Path, where: str) -> dict[str, bytes]:
    """The prompt files present in `folder` (PEFT's own folders have no softprompt.json); errors
    name each file as `where` + its name."""
    files = {}
    for file_name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        try:
            files[file_name] = (folder / file_name).read_bytes()
        except FileNotFoundError:
            if file_name == WEIGHTS_FILE and (folder / "adapter_model.bin").exists():
                raise PromptFileError(f"{where}{file_name} is missing (adapter_model.bin is not "
                                      "supported: save with safetensors)") from None
        except OSError as exc:
            raise PromptFileError(f"{where}{file_name} cannot be read: {exc.strerror}") from None
    return files


def read_prompt_dir(path: str | os.PathLike[str], name: str | None = None) -> SavedPrompt:
    """Read and check a prompt folder (ours, or one written by PEFT's save_pretrained).

    `name` defaults to the folder name. Errors name the file at fault.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise PromptFileError(f"prompt folder {folder} does not exist or is not a folder")
    where = f"{folder}{os.sep}"
    return prompt_from_files(_read_files(folder, where), name or folder.name, where=where)


def _remove_path(path: Path) -> None:
    """Best-effort removal of a file, link or folder (cleanup must never fail a save)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        logger.debug("could not remove %s: %s", path, exc)


def _retire(path: Path) -> None:
    """Remove a version folder readers may be reading.

    Renaming it away first makes all its files vanish at once, so a reader that still finds the
    folder afterwards (`_still_there`) knows it read one whole version.
    """
    trash = path.with_name(f"{_TMP_PREFIX}trash-{_new_version_id()}")
    try:
        os.rename(path, trash)
    except OSError as exc:
        logger.debug("could not retire %s: %s", path, exc)
        return
    _remove_path(trash)


def _still_there(folder: Path) -> bool:
    """True if `folder` (a resolved version folder) was neither retired nor replaced by a link."""
    return folder.is_dir() and os.path.realpath(folder) == str(folder)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _new_version_id() -> str:
    """Unique across processes and hosts sharing a bank; sorts by creation time."""
    return f"v{time.time_ns()}-{os.getpid()}-{secrets.token_hex(4)}"


# ----------------------------------------------------------------------------- the bank


class PromptBank:
    """A folder of tasks, one PEFT-compatible prompt folder each, with atomic saves.

    Safe for several processes (server replicas, a trainer) sharing one folder: saves of one task
    are serialised by a file lock, last writer wins, and readers never see a half-written task.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True):
        self._root = Path(root).expanduser().absolute()
        if self._root.is_dir():
            return
        if not create or self._root.exists():
            raise PromptFileError(f"bank folder {self._root} does not exist or is not a folder")
        self._root.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        """The bank folder (absolute)."""
        return self._root

    def __repr__(self) -> str:
        return f"PromptBank({str(self._root)!r})"

    # -- reading

    def names(self) -> list[str]:
        """Sorted task names present; hidden, temporary and invalid entries are ignored."""
        found = []
        with os.scandir(self._root) as entries:
            for entry in entries:
                # A symlink counts even when dangling, so load_all reports it instead of hiding it.
                if _TASK_NAME_RE.fullmatch(entry.name) and (entry.is_symlink() or entry.is_dir()):
                    found.append(entry.name)
        return sorted(found)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or _TASK_NAME_RE.fullmatch(name) is None:
            return False
        return os.path.lexists(self._root / name)

    def load(self, name: str) -> SavedPrompt:
        """Read one task; raises UnknownTaskError, PromptFileError or IncompatiblePromptError."""
        validate_task_name(name)
        for attempt in range(1, _READ_ATTEMPTS + 1):
            target = self._resolve(name)
            try:
                saved = self._read_version(name, target)
            except (PromptFileError, IncompatiblePromptError):
                # A writer may have swapped the link and retired `target` while we read; retry
                # only then, so a genuinely broken task still fails at once.
                if attempt == _READ_ATTEMPTS or self._resolve(name) == target:
                    raise
            else:
                if _still_there(target):
                    return saved
            logger.debug("task '%s' changed while reading it (attempt %d)", name, attempt)
        raise PromptFileError(f"task '{name}' kept changing while being read")

    @staticmethod
    def _read_version(name: str, folder: Path) -> SavedPrompt:
        """Errors name files relative to the bank (`<name>/<file>`): no server path in them."""
        if not folder.is_dir():
            raise PromptFileError(f"task '{name}': its folder does not exist (a dangling link?)")
        return prompt_from_files(_read_files(folder, f"{name}/"), name, where=f"{name}/")

    def version(self, name: str) -> str:
        """A cheap id of the task's current content; it changes on every save."""
        path = self._root / validate_task_name(name)
        try:
            if path.is_symlink():
                return os.path.basename(os.readlink(path))
            if path.is_dir():
                return _dir_version(path)
        except FileNotFoundError:
            pass  # deleted while we looked
        raise UnknownTaskError(self._unknown_message(name))

    def stored_files(self, name: str) -> dict[str, int]:
        """Size in bytes of each file of the task's current version, by path relative to it
        (`adapter_config.json`, ..., `plots/loss.png`): what the task occupies on disk."""
        def sizes(folder: Path) -> dict[str, int]:
            found = {}
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    found[path.relative_to(folder).as_posix()] = path.stat().st_size
            return found

        return self._read_current(name, sizes)

    def read_plot(self, name: str, plot: str) -> bytes | None:
        """The PNG bytes of plot `plot` saved with task `name`, or None if it has no such plot."""
        validate_task_name(name)
        if not isinstance(plot, str) or _PLOT_NAME_RE.fullmatch(plot) is None:
            return None

        def read(folder: Path) -> bytes | None:
            path = folder / PLOTS_DIR / f"{plot}.png"
            return path.read_bytes() if path.is_file() else None

        return self._read_current(name, read)

    def _read_current(self, name: str, read):
        """`read(folder)` on the task's current version folder, retried when a writer retires
        that version while it is read (as `load` does)."""
        validate_task_name(name)
        for attempt in range(1, _READ_ATTEMPTS + 1):
            target = self._resolve(name)
            try:
                result = read(target)
            except FileNotFoundError:
                if attempt == _READ_ATTEMPTS or self._resolve(name) == target:  # no server path:
                    raise PromptFileError(f"task '{name}': a file vanished while being read") from None
            else:
                if _still_there(target):
                    return result
        raise PromptFileError(f"task '{name}' kept changing while being read")

    def load_all(
        self, *, token_dim: int | None = None, fingerprint: Any = None
    ) -> tuple[dict[str, SavedPrompt], dict[str, str]]:
        """Load every task: (good prompts by name, error message by name for the bad ones).

        With `token_dim` (and `fingerprint`) each prompt is also checked against the model.
        """
        good: dict[str, SavedPrompt] = {}
        bad: dict[str, str] = {}
        for name in self.names():
            try:
                saved = self.load(name)
                if token_dim is not None:
                    check_compatible(saved, token_dim=token_dim, fingerprint=fingerprint)
                elif fingerprint is not None:
                    _check_fingerprint(saved, fingerprint)
            except UnknownTaskError:
                continue  # deleted between names() and load()
            except Exception as exc:  # one broken entry must never hide the others
                logger.warning("skipping task '%s' in bank %s: %s", name, self._root, exc)
                bad[name] = str(exc)
            else:
                good[name] = saved
        return good, bad

    # -- writing

    def save(self, saved: SavedPrompt) -> Path:
        """Store `saved` under its name atomically (replacing any previous version); return its path."""
        name = validate_task_name(saved.name)
        config_text, meta_text = _encode(saved)  # bad input fails before anything is written
        try:
            with self._writer_lock(name):
                version = self._write_version(name, saved, config_text, meta_text)
                previous = self._swap_link(name, version)
                self._cleanup(name, keep={version, previous})
        except OSError as exc:
            raise PromptFileError(
                f"could not save task '{name}' in bank {self._root}: {exc}"
            ) from exc
        logger.info("saved task '%s' (version %s) in bank %s", name, version, self._root)
        return self._root / name

    def delete(self, name: str) -> None:
        """Remove a task and all its versions; UnknownTaskError when absent."""
        link = self._root / validate_task_name(name)
        if not os.path.lexists(link):
            raise UnknownTaskError(self._unknown_message(name))
        try:
            with self._writer_lock(name):
                if not os.path.lexists(link):
                    raise UnknownTaskError(self._unknown_message(name))
                if self._adopt_plain_dir(name) is None:
                    link.unlink()
                fsync_dir(self._root)
                self._cleanup(name, keep=set())
                _remove_path(self._versions_dir(name))
        except OSError as exc:
            raise PromptFileError(
                f"could not delete task '{name}' in bank {self._root}: {exc}"
            ) from exc
        logger.info("deleted task '%s' from bank %s", name, self._root)

    def import_peft(
        self, src_dir: str | os.PathLike[str], name: str, *, meta: dict[str, Any] | None = None
    ) -> SavedPrompt:
        """Read a PEFT prompt-tuning adapter folder and store it as task `name`."""
        validate_task_name(name)
        source = read_prompt_dir(src_dir, name)
        saved = SavedPrompt(
            name=name,
            embeddings=source.embeddings,
            config=source.config,
            meta={**source.meta, **(meta or {})},
        )
        self.save(saved)
        logger.info("imported PEFT adapter %s as task '%s'", src_dir, name)
        return saved

    def export(self, name: str, dest_dir: str | os.PathLike[str]) -> Path:
        """Write task `name` as a plain PEFT-loadable folder `dest_dir` (absent or empty)."""
        saved = self.load(name)
        dest = Path(dest_dir).expanduser().absolute()
        if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
            raise PromptFileError(f"export destination {dest} exists and is not an empty folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}{_TMP_PREFIX}{_new_version_id()}"
        tmp.mkdir()
        try:
            write_prompt_dir(tmp, saved)
            os.replace(tmp, dest)  # POSIX allows renaming a folder over an empty one
        except Exception as exc:
            _remove_path(tmp)
            if isinstance(exc, OSError):
                raise PromptFileError(f"could not export task '{name}' to {dest}: {exc}") from exc
            raise
        fsync_dir(dest.parent)
        logger.info("exported task '%s' to %s", name, dest)
        return dest

    # -- internals

    def _versions_dir(self, name: str) -> Path:
        return self._root / _VERSIONS_DIR / name

    def _unknown_message(self, name: str) -> str:
        available = ", ".join(self.names()) or "(none)"
        return f"unknown task '{name}' in bank {self._root}; available: {available}"

    def _resolve(self, name: str) -> Path:
        """The concrete folder holding the task now; read all files from it, not via the link."""
        link = self._root / name
        if not os.path.lexists(link):
            raise UnknownTaskError(self._unknown_message(name))
        return Path(os.path.realpath(link))

    @contextlib.contextmanager
    def _writer_lock(self, name: str) -> Iterator[None]:
        """Exclusive per-task lock; the kernel drops it if the holder dies.

        The lock file is never deleted: writers that opened an unlinked lock file would no longer
        exclude each other.
        """
        locks = self._root / _LOCKS_DIR
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write_version(self, name: str, saved: SavedPrompt, config_text: str, meta_text: str) -> str:
        """Write a complete new version folder (via a temp folder) and return its id."""
        versions = self._versions_dir(name)
        versions.mkdir(parents=True, exist_ok=True)
        version = _new_version_id()
        tmp = versions / f"{_TMP_PREFIX}{version}"
        tmp.mkdir()
        try:
            _write_files(tmp, saved, config_text, meta_text)
            os.rename(tmp, versions / version)
        except Exception:
            _remove_path(tmp)  # an ordinary error leaves nothing; a killed process is cleaned later
            raise
        fsync_dir(versions)
        return version

    def _swap_link(self, name: str, version: str) -> str | None:
        """Point `<root>/<name>` at `version` atomically; return the version it pointed at before."""
        link = self._root / name
        previous = self._adopt_plain_dir(name)
        if previous is None and link.is_symlink():
            previous = os.path.basename(os.readlink(link))
        tmp_link = self._root / f"{_LINK_PREFIX}{name}{_LINK_SEP}{version}"
        os.symlink(os.path.join(_VERSIONS_DIR, name, version), tmp_link)
        os.replace(tmp_link, link)  # the commit point: readers see the old or the new version
        fsync_dir(self._root)
        return previous

    def _adopt_plain_dir(self, name: str) -> str | None:
        """Move a real folder at `<root>/<name>` (e.g. a copied PEFT folder) into .versions.

        A symlink cannot replace a folder atomically, so the task is briefly absent here.
        """
        path = self._root / name
        if path.is_symlink() or not path.is_dir():
            return None
        version = _new_version_id()
        versions = self._versions_dir(name)
        versions.mkdir(parents=True, exist_ok=True)
        os.rename(path, versions / version)
        logger.info("moved plain folder %s into %s", path, versions / version)
        return version

    def _cleanup(self, name: str, keep: set[str | None]) -> None:
        """Remove versions and temp entries of `name` other than `keep` (we hold its lock)."""
        versions = self._versions_dir(name)
        for entry in _listdir(versions):
            if entry.startswith(_TMP_PREFIX):
                _remove_path(versions / entry)  # no reader ever opens a temp folder
            elif entry not in keep:
                _retire(versions / entry)
        stale_link_prefix = f"{_LINK_PREFIX}{name}{_LINK_SEP}"
        for entry in _listdir(self._root):
            if entry.startswith(stale_link_prefix):
                _remove_path(self._root / entry)


def _dir_version(path: Path) -> str:
    """Version id of a plain (non-bank) folder, from the stat data of the folder and its files."""
    parts = []
    for item in (path, path / CONFIG_FILE, path / WEIGHTS_FILE, path / META_FILE):
        try:
            st = item.stat()
            parts.append(f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")
        except FileNotFoundError:
            parts.append("-")
    return "dir-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
