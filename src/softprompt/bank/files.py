"""Reading and writing one prompt folder: encoding a `SavedPrompt` to its files (each fsynced), and
the one parser of prompt files, for folders on disk and uploads alike. The bank (store.py) builds
each version folder with these; `write_prompt_dir` / `read_prompt_dir` serve export and import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from softprompt.atomic import fsync_dir, fsync_file
from softprompt.bank.format import (
    CONFIG_FILE,
    META_FILE,
    PLOTS_DIR,
    TENSOR_KEY,
    WEIGHTS_FILE,
    PromptHeader,
    SavedPrompt,
    check_config,
    check_plots,
    check_tensor,
)
from softprompt.errors import PromptFileError

MAX_JSON_DEPTH = 32
"""Deepest nesting accepted in adapter_config.json / softprompt.json (ours is 3 levels deep)."""


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


def encode_saved(saved: SavedPrompt) -> tuple[str, str]:
    """Check `saved` and return (config JSON, meta JSON); touches no disk."""
    where = f"prompt '{saved.name}'"
    check_config(saved.config, where)
    check_tensor(saved.embeddings, saved.config, where)
    check_plots(saved.plots, where)
    # sort_keys for the config: the same byte layout PEFT writes.
    return _dumps(saved.config, f"{where} config", sort_keys=True), _dumps(
        saved.meta, f"{where} meta"
    )


def write_files(folder: Path, saved: SavedPrompt, config_text: str, meta_text: str) -> None:
    """Write the three prompt files of `saved` into `folder` (texts from `encode_saved`)."""
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
    config_text, meta_text = encode_saved(saved)
    if not folder.is_dir():
        raise PromptFileError(f"prompt folder {folder} does not exist")
    if any(folder.iterdir()):
        raise PromptFileError(f"prompt folder {folder} is not empty")
    write_files(folder, saved, config_text, meta_text)


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
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
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
    check_config(config, where + CONFIG_FILE)
    weights = _required(files, WEIGHTS_FILE, where)
    embeddings = _tensor_from_bytes(weights, where + WEIGHTS_FILE)  # (n_virtual * n_sub, d)
    check_tensor(embeddings, config, where + WEIGHTS_FILE)
    meta = parse_json_object(files[META_FILE], where + META_FILE) if META_FILE in files else {}
    return SavedPrompt(name=name, embeddings=embeddings, config=config, meta=meta)


def _required(files: dict[str, bytes], file_name: str, where: str) -> bytes:
    if file_name not in files:
        raise PromptFileError(f"{where}{file_name} is missing")
    return files[file_name]


def read_files(folder: Path, where: str) -> dict[str, bytes]:
    """The prompt files present in `folder` (PEFT's own folders have no softprompt.json); errors
    name each file as `where` + its name."""
    files = {}
    for file_name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        try:
            files[file_name] = (folder / file_name).read_bytes()
        except FileNotFoundError:
            if file_name == WEIGHTS_FILE and (folder / "adapter_model.bin").exists():
                raise PromptFileError(
                    f"{where}{file_name} is missing (adapter_model.bin is not "
                    "supported: save with safetensors)"
                ) from None
        except OSError as exc:
            raise PromptFileError(f"{where}{file_name} cannot be read: {exc.strerror}") from None
    return files


def read_header(folder: Path, name: str, version: str, where: str) -> PromptHeader:
    """The config and softprompt.json of the prompt in `folder`, checked as a load checks them,
    without reading its tensor. A FileNotFoundError means `folder` itself vanished (a writer
    retired it): the caller reads the task's current folder again."""
    files, saved_at = {}, 0.0
    for file_name in (CONFIG_FILE, META_FILE):
        path = folder / file_name
        try:
            files[file_name] = path.read_bytes()
            if file_name == CONFIG_FILE:
                saved_at = path.stat().st_mtime
        except FileNotFoundError:
            if not folder.is_dir():
                raise
        except OSError as exc:
            raise PromptFileError(f"{where}{file_name} cannot be read: {exc.strerror}") from None
    config = parse_json_object(_required(files, CONFIG_FILE, where), where + CONFIG_FILE)
    check_config(config, where + CONFIG_FILE)
    meta = parse_json_object(files[META_FILE], where + META_FILE) if META_FILE in files else {}
    return PromptHeader(name, version, config, meta, saved_at)


def read_prompt_dir(path: str | os.PathLike[str], name: str | None = None) -> SavedPrompt:
    """Read and check a prompt folder (ours, or one written by PEFT's save_pretrained).

    `name` defaults to the folder name. Errors name the file at fault.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise PromptFileError(f"prompt folder {folder} does not exist or is not a folder")
    where = f"{folder}{os.sep}"
    return prompt_from_files(read_files(folder, where), name or folder.name, where=where)
