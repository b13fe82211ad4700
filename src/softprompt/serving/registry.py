"""The engine's tasks: name -> validated prompt (soft or deep) in memory, following a bank.

Tasks live in memory as `LoadedTask` entries (prompt [n, d] fp32 on the model's device, its bank
version, its metadata and, once used, its KV prefix). Before a request runs, the engine asks the
bank for its task's version (one `readlink`), so a prompt saved, changed or deleted by any replica
is seen on the very next request. One load path (bank read -> compatibility check -> tensor
check) and one save path (the bank's atomic save), for uploads too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from softprompt.bank import (
    CONFIG_FILE,
    META_FILE,
    WEIGHTS_FILE,
    PromptBank,
    SavedPrompt,
    check_compatible,
    check_prompt_rows,
    prompt_from_files,
    validate_task_name,
)
from softprompt.data import task_from_meta, template_from_meta
from softprompt.errors import (
    ConfigError,
    IncompatiblePromptError,
    InvalidTaskNameError,
    NoVerbalizerError,
    PromptFileError,
    SoftPromptError,
    UnknownTaskError,
)
from softprompt.prompting import inject

log = logging.getLogger(__name__)

PROMPT_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE)


@dataclass
class TaskInfo:
    """What the engine holds for one task in memory."""

    name: str
    num_virtual_tokens: int
    version: str | None
    """Bank version it was loaded from; None for a task added in memory only."""
    loaded_at: float
    has_verbalizer: bool
    kind: str = "soft"
    """'soft' (vectors before the input) or 'deep' (keys and values in every layer)."""
    meta: dict = field(default_factory=dict)
    """Its softprompt.json (template, verbalizer, metrics, ...), as loaded."""


@dataclass(eq=False)
class LoadedTask:
    """A task the engine can run: its prompt on the model's device, bank version and metadata."""

    name: str
    prompt: torch.Tensor  # (n, d) fp32 on the model's device
    version: str | None
    meta: dict
    loaded_at: float = field(default_factory=time.time)
    prefix: inject.PromptPrefix | None = None  # computed on first use, under the model lock
    classifier: tuple | None = None  # (data.Task, target ids), parsed on first use
    kind: str = "soft"  # 'deep': `prompt` holds KV rows [n, layers * 2 * kv_heads * head_dim]

    @property
    def length(self) -> int:
        return self.prompt.shape[0]

    def info(self) -> TaskInfo:
        return TaskInfo(
            self.name,
            self.length,
            self.version,
            self.loaded_at,
            isinstance(self.meta.get("verbalizer"), dict),
            self.kind,
            dict(self.meta),
        )


class TaskRegistry:
    """The tasks one engine serves: loaded from `bank` (or added in memory), checked against the
    engine's model (its fingerprint, row widths, context) before they can be used."""

    def __init__(
        self,
        bank: PromptBank | None,
        *,
        kinds: tuple[str, ...],
        fingerprint: str,
        reserved_names: set[str],
        row_width: Callable[[str], int],
        context_length: int,
        device: torch.device,
    ):
        self.bank, self.kinds, self.fingerprint = bank, kinds, fingerprint
        self.reserved_names, self._row_width = reserved_names, row_width
        self.context_length, self.device = context_length, device
        self._tasks: dict[str, LoadedTask] = {}
        self._bad: dict[str, tuple[str, SoftPromptError]] = {}  # name -> (version, error)
        self._tasks_lock = threading.RLock()

    def tasks(self) -> list[str]:
        """Names of the tasks in memory."""
        with self._tasks_lock:
            return sorted(self._tasks)

    def task_infos(self) -> list[TaskInfo]:
        """What is in memory, one consistent snapshot (sorted by name)."""
        with self._tasks_lock:
            return [self._tasks[name].info() for name in sorted(self._tasks)]

    def task_info(self, name: str) -> TaskInfo:
        with self._tasks_lock:
            if name not in self._tasks:
                raise UnknownTaskError(f"task '{name}' is not active")
            return self._tasks[name].info()

    def add_task(
        self, name: str, prompt: SavedPrompt | torch.Tensor, meta: dict | None = None
    ) -> TaskInfo:
        """Put a task in memory directly (not from the bank); it stays until deactivated."""
        self._check_name(name)
        if not isinstance(prompt, SavedPrompt):  # a bare tensor is a soft prompt [n, d]
            prompt = SavedPrompt(name, prompt, {"peft_type": "PROMPT_TUNING"})
        self._check(prompt)
        entry = self._entry(
            name, prompt.embeddings, None, {**prompt.meta, **(meta or {})}, prompt.kind
        )
        return self._store(entry).info()

    def prompt_values(self, name: str) -> torch.Tensor:
        """A CPU float32 copy of the task's prompt rows at the bank's current version (soft: [n, d];
        deep: [n, layers * 2 * kv_heads * head_dim]), e.g. for `inspect`."""
        return self._activate(name).prompt.detach().float().cpu().clone()

    def activate(self, name: str) -> TaskInfo:
        """Have `name` in memory at the bank's current version (microseconds if it already is)."""
        return self._activate(name).info()

    def deactivate(self, name: str) -> None:
        """Drop a task (and its KV prefix) from memory; the bank is untouched."""
        with self._tasks_lock:
            self._tasks.pop(name, None)
            self._bad.pop(name, None)

    def refresh(self) -> dict[str, str]:
        """Follow the bank: load new tasks, reload changed ones, drop deleted ones.

        Cheap when nothing changed (a folder scan and one `readlink` per task). Bad entries are
        logged and skipped; returns {name: error message} for them.
        """
        if self.bank is None:
            return {}
        names = set(self.bank.names())
        with self._tasks_lock:
            gone = [n for n, t in self._tasks.items() if t.version is not None and n not in names]
        for name in gone:
            log.info("task '%s' left the bank; dropping it", name)
            self.deactivate(name)
        errors = {}
        for name in sorted(names):
            try:
                self._activate(name)  # refuses a bank task named like the base model
            except UnknownTaskError:
                self.deactivate(name)  # deleted while we looked
            except SoftPromptError as exc:
                errors[name] = str(exc)
        return errors

    def _check_name(self, name: str) -> None:
        validate_task_name(name)
        if name in self.reserved_names:
            raise InvalidTaskNameError(f"task name '{name}' is reserved: it names a base model")

    def _activate(self, name: str) -> LoadedTask:
        self._check_name(name)
        with self._tasks_lock:
            entry = self._tasks.get(name)
        if entry is not None and (entry.version is None or self.bank is None):
            return entry  # added in memory: pinned
        if self.bank is None:
            raise unknown_task(name)
        try:
            version = self.bank.version(name)
        except UnknownTaskError:
            self.deactivate(name)
            raise unknown_task(name) from None
        if entry is not None and entry.version == version:
            return entry
        return self._load(name, version)

    def _load(self, name: str, version: str) -> LoadedTask:
        """Read `name` from the bank (version read first: a racing save only causes a reload)."""
        bad = self._bad.get(name)
        if bad is not None and bad[0] == version:
            raise bad[1]  # same broken version as before: do not read it again
        try:
            saved = self.bank.load(name)
            self._check(saved)
            entry = self._entry(name, saved.embeddings, version, saved.meta, saved.kind)
        except UnknownTaskError:
            raise
        except SoftPromptError as exc:
            log.warning("task '%s' in bank %s is unusable: %s", name, self.bank.root, exc)
            with self._tasks_lock:
                self._bad[name] = (version, exc)
                self._tasks.pop(name, None)
            raise
        log.info("loaded task '%s' (version %s, %d virtual tokens)", name, version, entry.length)
        return self._store(entry)

    def _check(self, saved: SavedPrompt) -> None:
        check_prompt_rows(saved.embeddings, f"prompt '{saved.name}'")
        check_compatible(
            saved,
            token_dim=self._row_width(saved.kind),
            fingerprint=self.fingerprint,
            kinds=self.kinds,
        )
        if saved.embeddings.shape[0] >= self.context_length:
            raise IncompatiblePromptError(
                f"prompt '{saved.name}' has {saved.embeddings.shape[0]} "
                f"virtual tokens; the model's context is {self.context_length}"
            )

    def _entry(
        self, name: str, values: torch.Tensor, version: str | None, meta: dict, kind: str
    ) -> LoadedTask:
        return LoadedTask(
            name, values.detach().float().to(self.device).clone(), version, dict(meta), kind=kind
        )

    def _store(self, entry: LoadedTask) -> LoadedTask:
        with self._tasks_lock:
            self._tasks[entry.name] = entry
            self._bad.pop(entry.name, None)
        return entry

    # ------------------------------------------------------------ admin (upload / delete)

    def install(self, name: str, files: Mapping[str, bytes]) -> TaskInfo:
        """Validate an uploaded prompt folder like a bank load, save it atomically, activate it.

        `files` maps file names (adapter_config.json, adapter_model.safetensors, optional
        softprompt.json; others are ignored) to their bytes.
        """
        self._check_name(name)
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in files]
        if missing:
            raise PromptFileError(f"upload of task '{name}' lacks {', '.join(missing)}")
        saved = prompt_from_files({f: files[f] for f in PROMPT_FILES if f in files}, name)
        self._check(saved)
        _check_meta(saved)
        if self.bank is None:
            return self.add_task(name, saved)
        try:
            self.bank.save(saved)
        except PromptFileError as exc:
            if not isinstance(exc.__cause__, OSError):
                raise
            log.error("saving uploaded task '%s' failed: %s", name, exc)  # its paths stay here
            raise PromptFileError(f"could not save task '{name}' on the server") from None
        return self.activate(name)

    def remove(self, name: str) -> None:
        """Delete a task from the bank (UnknownTaskError if absent) and from memory."""
        validate_task_name(name)
        if self.bank is None:
            with self._tasks_lock:
                if name not in self._tasks:
                    raise unknown_task(name)
        else:
            try:
                self.bank.delete(name)
            except UnknownTaskError:
                raise unknown_task(name) from None
        self.deactivate(name)


def unknown_task(name: str) -> UnknownTaskError:
    """The error for a task that is not there. It names only what the client sent: listing the
    tasks is /v1/models' job (which per-tenant keys will filter), the bank's path nobody's. Every
    404 for a task (tenants' hidden tasks, the console) is this one, so they cannot differ."""
    return UnknownTaskError(f"unknown task '{name}'")


def _check_meta(saved: SavedPrompt) -> None:
    """An uploaded prompt's verbalizer and template must be usable (refused at upload)."""
    try:
        if saved.meta.get("verbalizer") is not None:
            task_from_meta(
                saved.name, saved.meta
            )  # template and verbalizer, as classify reads them
        else:  # a generation task: its template alone
            template_from_meta(saved.name, saved.meta)
    except (NoVerbalizerError, ConfigError) as exc:
        raise PromptFileError(f"{META_FILE} of '{saved.name}': {exc}") from exc
