"""The engine's tasks: name -> validated prompt (soft or deep) in memory, following a bank.

Tasks live in memory as `LoadedTask` entries (prompt [n, d] fp32 on the model's device, its bank
version, its metadata and, once used, its KV prefix). A task is read from the bank on its first
request, never before: starting the server reads no prompt, and listing tasks (`listing`, a page
at a time) reads only their two small metadata files, cached by bank version. Before a request
runs, the engine asks the bank for its task's version (one `readlink`), so a prompt saved,
changed or deleted by any replica is seen on the very next request. One load path (bank read ->
compatibility check -> tensor check) and one save path (the bank's atomic save), for uploads too.

Memory tiers (`TierConfig`; docs/architecture.md, invariant 11). The bank on disk holds every
task. The *loaded* tier is the `LoadedTask` entries: at most `max_loaded_tasks`, least recently
used dropped first, read again from the bank (the one load path) when next asked for. The
*resident* tier is the entries whose KV prefix is computed: at most `max_resident_tasks`, least
recently used prefix dropped first, computed again on next use. Why this split: a prompt's rows
are small ([n, d]: 37 KB for 16 tokens on SmolLM2) while a soft prompt's KV prefix is ~20x that
(0.74 MB), so the prefix is the per-task cost worth bounding separately; the rows stay where the
model is (on CPU host and device are one memory) so a batch injects them without a copy. A
deep prompt's rows are its KV already, so for it both tiers bound the same order of memory.

Pinned tasks (and tasks added in memory, which the bank cannot give back) are never evicted. A
task in use is never evicted either: each request's prepared pieces keep a `TaskSnapshot`, and
while one is alive its tasks count as in use. The use ends when the pieces are garbage (a weakref
finalizer), so no path that drops a request (a failed limit check, a cancelled stream, the vLLM
gateway) has to remember to release it and none can leak it; a request failing while it is
prepared releases at once. When every entry over a bound is pinned or in use, the tier holds more
until a request ends (at most the tasks of the requests in flight, which `--max-queue` bounds).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from softprompt.bank import (
    CONFIG_FILE,
    META_FILE,
    WEIGHTS_FILE,
    PromptBank,
    PromptHeader,
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
from softprompt.options import flag, opt
from softprompt.prompting import inject

log = logging.getLogger(__name__)

PROMPT_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE)


@dataclass
class TierConfig:
    """How many tasks the engine keeps in memory (the bank keeps them all)."""

    max_loaded_tasks: int | None = opt(
        None,
        "builtin: tasks held in memory (prompt rows, metadata) at most; the least recently used "
        "is dropped first and read again from the bank when asked for. Unset: no bound.",
    )
    max_resident_tasks: int | None = opt(
        None,
        "builtin: tasks whose KV prefix is kept on the model's device at most (least recently "
        "used dropped first, computed again on next use); at most --max-loaded-tasks. Unset: "
        "no bound.",
    )
    pin: list[str] = opt(
        [],
        "builtin: tasks loaded at start-up and never evicted from either tier (each must be in "
        "the bank).",
    )

    def __post_init__(self):
        for name in ("max_loaded_tasks", "max_resident_tasks"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(
                    f"{flag(name)} must be an integer >= 1 (or unset: no bound), not {value!r}"
                )
        loaded, resident = self.max_loaded_tasks, self.max_resident_tasks
        if loaded is not None and resident is not None and resident > loaded:
            raise ConfigError(
                f"--max-resident-tasks ({resident}) exceeds --max-loaded-tasks ({loaded}): a KV "
                "prefix belongs to a loaded task, so at most the loaded ones can be resident"
            )
        for name in self.pin:
            try:
                validate_task_name(name)
            except InvalidTaskNameError as exc:
                raise ConfigError(f"--pin: {exc}") from None
        self.pin = list(dict.fromkeys(self.pin))  # a task named twice is pinned once
        for name in ("max_loaded_tasks", "max_resident_tasks"):
            bound = getattr(self, name)
            if bound is not None and len(self.pin) > bound:
                raise ConfigError(
                    f"--pin names {len(self.pin)} tasks but {flag(name)} is {bound}: pinned "
                    "tasks are never evicted, so the bound must hold them all"
                )


class TaskSnapshot(dict):
    """name -> LoadedTask as one request resolved it (all its rows use one prompt version).

    Every task in it is in use, never evicted, while the snapshot is alive: the request's prepared
    pieces keep it, so its tasks are released when the last piece is gone, or at once by
    `release()` (a request that failed while being prepared)."""

    def __init__(self):
        super().__init__()
        self.releases: list[weakref.finalize] = []  # one per task held; each runs once

    def release(self) -> None:
        for release in self.releases:
            release()


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


@dataclass
class TaskPage:
    """One page of a task listing, in name order."""

    infos: list[TaskInfo]
    """The servable tasks of the page; for a bank task `loaded_at` is when it was saved."""
    unavailable: dict[str, str]
    """Tasks met on this page that cannot be served: name -> why."""
    has_more: bool
    """Whether a servable task follows the last of `infos`."""


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
    users: int = 0  # live TaskSnapshots holding it (registry lock): in use, not evictable

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
        tiers: TierConfig | None = None,
    ):
        self.bank, self.kinds, self.fingerprint = bank, kinds, fingerprint
        self.reserved_names, self._row_width = reserved_names, row_width
        self.context_length, self.device = context_length, device
        self.tiers = tiers or TierConfig()
        self._tasks: OrderedDict[str, LoadedTask] = OrderedDict()  # least recently used first
        self._resident: OrderedDict[str, LoadedTask] = OrderedDict()  # entries with a KV prefix
        self._bad: dict[str, tuple[str, SoftPromptError]] = {}  # name -> (version, error)
        # What listing read of each bank task (metadata only): name -> (version, info or error).
        self._listed: dict[str, tuple[str, TaskInfo | SoftPromptError]] = {}
        self._tasks_lock = threading.RLock()
        self._counts = {"hits": 0, "misses": 0, "evictions": 0, "prefix_evictions": 0, "loads": 0}
        self._load_seconds = 0.0

    def load_pinned(self) -> None:
        """Load the pinned tasks (start-up): each must be in the bank and usable, else a
        ConfigError naming --pin."""
        if self.tiers.pin and self.bank is None:
            raise ConfigError("--pin needs a bank to load the pinned tasks from")
        for name in self.tiers.pin:
            try:
                self._activate(name)
            except UnknownTaskError:
                raise ConfigError(
                    f"--pin: task '{name}' is not in the bank {self.bank.root}"
                ) from None
            except SoftPromptError as exc:
                raise ConfigError(f"--pin: task '{name}' cannot be served: {exc}") from None

    def stats(self) -> dict:
        """The tiers' counters (for /health): tasks loaded and resident now, their bounds, and
        since start: hits and misses of requests, evictions of each tier, bank loads and time."""
        with self._tasks_lock:
            loads, seconds = self._counts["loads"], self._load_seconds
            return {
                "loaded": len(self._tasks),
                "resident": len(self._resident),
                "in_use": sum(1 for t in self._tasks.values() if t.users),
                "pinned": len(self.tiers.pin),
                "max_loaded_tasks": self.tiers.max_loaded_tasks,
                "max_resident_tasks": self.tiers.max_resident_tasks,
                **self._counts,
                "load_seconds_total": round(seconds, 6),
                "load_seconds_mean": round(seconds / loads, 6) if loads else None,
            }

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

    def names(self) -> list[str]:
        """Every task name there is, served or not: the bank's entries (a folder scan, no file
        read) and the tasks added in memory; sorted."""
        with self._tasks_lock:
            found = {name for name, task in self._tasks.items() if task.version is None}
        return sorted(found.union(self.bank.names() if self.bank is not None else ()))

    def listing(
        self, limit: int, after: str | None = None, visible: Callable[[str], bool] | None = None
    ) -> TaskPage:
        """Up to `limit` servable tasks whose names sort after `after`, in name order, with their
        bank metadata: no prompt tensor is read, so a page costs the same in a bank of ten
        thousand tasks as in one of ten. `after` is a position, not a lookup: it need not name a
        task (one deleted between two pages leaves the paging intact). `visible` filters the
        names first (a tenant's tasks), so every page is full."""
        if after is not None:
            validate_task_name(after)
        names = self.names()
        infos: list[TaskInfo] = []
        unavailable: dict[str, str] = {}
        for name in names[bisect.bisect_right(names, after) if after is not None else 0 :]:
            if visible is not None and not visible(name):
                continue
            try:
                info = self._listed_info(name)
            except UnknownTaskError:
                continue  # deleted since the folder scan
            except SoftPromptError as exc:
                unavailable[name] = str(exc)
                continue
            if len(infos) == limit:  # one more servable task exists: the next page starts here
                unavailable = {n: why for n, why in unavailable.items() if n < infos[-1].name}
                return TaskPage(infos, unavailable, True)
            infos.append(info)
        return TaskPage(infos, unavailable, False)

    def _listed_info(self, name: str) -> TaskInfo:
        """A task as listing shows it: from memory if added there, else from its bank metadata at
        the current version (read once per version); raises why it cannot be served."""
        self._check_name(name)
        with self._tasks_lock:
            entry = self._tasks.get(name)
        if entry is not None and entry.version is None:
            return entry.info()
        if self.bank is None:
            raise unknown_task(name)
        version = self.bank.version(name)
        with self._tasks_lock:
            bad, listed = self._bad.get(name), self._listed.get(name)
        if bad is not None and bad[0] == version:
            raise bad[1]  # its tensor was read and refused
        if listed is None or listed[0] != version:
            listed = self._read_listed(name)
        if isinstance(listed[1], SoftPromptError):
            raise listed[1]
        return dataclasses.replace(listed[1], meta=dict(listed[1].meta))

    def _read_listed(self, name: str) -> tuple[str, TaskInfo | SoftPromptError]:
        try:
            header = self.bank.read_header(name)
        except UnknownTaskError:
            raise
        except SoftPromptError as exc:
            return self.bank.version(name), exc  # not cached: the version may be gone already
        try:
            self._check(header)
            listed = (header.version, _header_info(header))
        except SoftPromptError as exc:
            listed = (header.version, exc)
        with self._tasks_lock:
            self._listed[name] = listed
        return listed

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

    def acquire(self, name: str, snapshot: TaskSnapshot) -> LoadedTask:
        """`name` at the bank's current version, in use (not evictable) while `snapshot` lives.

        Counts a hit when it is in memory, a miss when it had to be read from the bank."""
        entry = self._activate(name, holder=snapshot)
        snapshot[name] = entry
        return entry

    def resident_prefix(
        self, task: LoadedTask, compute: Callable[[LoadedTask], inject.PromptPrefix]
    ) -> inject.PromptPrefix:
        """The task's KV prefix: kept one (now most recently used), or `compute(task)` kept in the
        resident tier, dropping the least recently used other prefixes over the bound."""
        with self._tasks_lock:
            if task.prefix is not None:
                if self._resident.get(task.name) is task:
                    self._resident.move_to_end(task.name)
                return task.prefix
        prefix = compute(task)  # outside the registry lock: model work (the caller's model lock)
        with self._tasks_lock:
            task.prefix = prefix
            if self._tasks.get(task.name) is task:  # else: dropped meanwhile; it dies with its rows
                self._resident[task.name] = task
                self._resident.move_to_end(task.name)
                self._evict_prefixes()
        return prefix

    def deactivate(self, name: str) -> None:
        """Drop a task (and its KV prefix) from memory; the bank is untouched."""
        with self._tasks_lock:
            self._tasks.pop(name, None)
            self._resident.pop(name, None)
            self._bad.pop(name, None)

    def refresh(self) -> dict[str, str]:
        """Follow the bank for the tasks in memory: reload changed ones, drop deleted ones. A task
        not in memory is not read: it is loaded on its first request.

        Cheap when nothing changed (a folder scan and one `readlink` per task in memory). Bad
        entries are logged and skipped; returns {name: error message} for them.
        """
        if self.bank is None:
            return {}
        names = set(self.bank.names())
        with self._tasks_lock:
            gone = [n for n, t in self._tasks.items() if t.version is not None and n not in names]
            loaded = [n for n, t in self._tasks.items() if t.version is not None and n in names]
            for name in set(self._listed) - names:
                del self._listed[name]
        for name in gone:
            log.info("task '%s' left the bank; dropping it", name)
            self.deactivate(name)
        errors = {}
        for name in loaded:  # least recently used first: touching each in turn keeps the order
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

    def _activate(self, name: str, holder: TaskSnapshot | None = None) -> LoadedTask:
        """`name` in memory at the bank's current version (most recently used now); with a
        `holder`, in use until it is gone, and counted as a hit or a miss."""
        self._check_name(name)
        with self._tasks_lock:
            entry = self._tasks.get(name)
        if entry is not None and (entry.version is None or self.bank is None):
            return self._use(entry, holder)  # added in memory: pinned
        if self.bank is None:
            raise unknown_task(name)
        try:
            version = self.bank.version(name)
        except UnknownTaskError:
            self.deactivate(name)  # another replica deleted it: a 404 for this request alone
            raise unknown_task(name) from None
        if entry is not None and entry.version == version:
            return self._use(entry, holder)
        if holder is not None:
            self._count("misses")
        try:
            return self._load(name, version, holder)
        except UnknownTaskError:
            self.deactivate(name)  # deleted between the version read and the load
            raise unknown_task(name) from None

    def _load(self, name: str, version: str, holder: TaskSnapshot | None) -> LoadedTask:
        """Read `name` from the bank (version read first: a racing save only causes a reload)."""
        bad = self._bad.get(name)
        if bad is not None and bad[0] == version:
            raise bad[1]  # same broken version as before: do not read it again
        started = time.perf_counter()
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
                self._resident.pop(name, None)
            raise
        seconds = time.perf_counter() - started
        with self._tasks_lock:
            self._counts["loads"] += 1
            self._load_seconds += seconds
        log.info(
            "loaded task '%s' (version %s, %d virtual tokens) in %.1f ms",
            name,
            version,
            entry.length,
            seconds * 1e3,
        )
        return self._store(entry, holder)

    def _check(self, saved: SavedPrompt | PromptHeader) -> None:
        """Whether the engine can serve `saved`: a header (no tensor) is checked as far as its
        config and metadata go, a loaded prompt's values too."""
        if isinstance(saved, SavedPrompt):
            check_prompt_rows(saved.embeddings, f"prompt '{saved.name}'")
        check_compatible(
            saved,
            token_dim=self._row_width(saved.kind),
            fingerprint=self.fingerprint,
            kinds=self.kinds,
        )
        if saved.num_rows >= self.context_length:
            raise IncompatiblePromptError(
                f"prompt '{saved.name}' has {saved.num_rows} "
                f"virtual tokens; the model's context is {self.context_length}"
            )

    def _entry(
        self, name: str, values: torch.Tensor, version: str | None, meta: dict, kind: str
    ) -> LoadedTask:
        return LoadedTask(
            name, values.detach().float().to(self.device).clone(), version, dict(meta), kind=kind
        )

    def _store(self, entry: LoadedTask, holder: TaskSnapshot | None = None) -> LoadedTask:
        """Keep `entry` (most recently used), then evict down to the bound. A concurrent load of
        the same version may have stored one first: that one is kept (it may be in use)."""
        with self._tasks_lock:
            current = self._tasks.get(entry.name)
            if current is None or entry.version is None or current.version != entry.version:
                self._tasks[entry.name] = entry
                if self._resident.get(entry.name) is not entry:
                    self._resident.pop(entry.name, None)  # the old version's prefix
                current = entry
            self._tasks.move_to_end(entry.name)
            self._bad.pop(entry.name, None)
            self._hold(current, holder)
            self._evict_loaded()
        return current

    def _use(self, entry: LoadedTask, holder: TaskSnapshot | None) -> LoadedTask:
        """A task found in memory: most recently used now; held (a hit) for a request."""
        with self._tasks_lock:
            if self._tasks.get(entry.name) is entry:
                self._tasks.move_to_end(entry.name)
            if holder is not None:
                self._counts["hits"] += 1
                self._hold(entry, holder)
        return entry

    def _hold(self, entry: LoadedTask, holder: TaskSnapshot | None) -> None:
        """`entry` in use until `holder` is garbage (callers hold the registry lock)."""
        if holder is not None:
            entry.users += 1
            holder.releases.append(weakref.finalize(holder, self._release, entry))

    def _release(self, entry: LoadedTask) -> None:
        with self._tasks_lock:
            entry.users -= 1
            if not entry.users:  # the tiers may have held more while it was in use
                self._evict_loaded()
                self._evict_prefixes()

    def _count(self, counter: str) -> None:
        with self._tasks_lock:
            self._counts[counter] += 1

    def _evictable(self, entry: LoadedTask) -> bool:
        """Its KV prefix may go: neither pinned nor in use (callers hold the lock)."""
        return entry.name not in self.tiers.pin and not entry.users

    def _evict_loaded(self) -> None:
        """Drop least recently used entries over --max-loaded-tasks (callers hold the lock)."""
        bound = self.tiers.max_loaded_tasks
        if bound is None or len(self._tasks) <= bound:
            return
        # a task added in memory stays too: the bank cannot give it back
        for entry in [e for e in self._tasks.values() if e.version and self._evictable(e)]:
            if len(self._tasks) <= bound:
                break
            if self._tasks.get(entry.name) is not entry:
                continue  # gone meanwhile (a release run by the garbage collector evicted it)
            del self._tasks[entry.name]
            self._resident.pop(entry.name, None)
            self._counts["evictions"] += 1
            log.debug("evicted task '%s' (over --max-loaded-tasks %d)", entry.name, bound)

    def _evict_prefixes(self) -> None:
        """Drop least recently used KV prefixes over --max-resident-tasks (callers hold the lock)."""
        bound = self.tiers.max_resident_tasks
        if bound is None or len(self._resident) <= bound:
            return
        for entry in [e for e in self._resident.values() if self._evictable(e)]:
            if len(self._resident) <= bound:
                break
            if self._resident.get(entry.name) is not entry:
                continue  # gone meanwhile (a release run by the garbage collector evicted it)
            del self._resident[entry.name]
            entry.prefix = None
            self._counts["prefix_evictions"] += 1

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


def _header_info(header: PromptHeader) -> TaskInfo:
    """A bank task as listed: from its metadata, `loaded_at` being when it was saved."""
    return TaskInfo(
        header.name,
        header.num_rows,
        header.version,
        header.saved_at,
        isinstance(header.meta.get("verbalizer"), dict),
        header.kind,
        dict(header.meta),
    )


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
