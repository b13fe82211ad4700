"""The prompt bank: a folder of tasks, one versioned prompt folder each, saved atomically.

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

A writer killed mid-way (`kill -9`) leaves entries that the next open of the bank clears up, each
task under its writer lock: a lock we can take proves that no writer of that task is alive (the
kernel drops a dead holder's lock, on this host or, through the filesystem's locks, another one),
so what such a writer left is abandoned, while a live writer's entries are never touched. Pid- or
age-based guesses could not prove that for replicas on other hosts sharing the bank. Left behind
and cleared up, by the step the writer was killed in:

- `.versions/<task>/.tmp-*` (a version being written, an old one being removed): removed;
- a version newer than the linked one (written, never linked): removed; version ids grow with
  every save of a task (`_next_version_id`), so the one linked before the current is known;
- `<root>/.tmp-link-<task>@<version>` (a new link not yet swapped in): removed;
- `<root>/.tmp-rm-<task>@<id>`: a delete past its commit point (the task's link, moved aside);
  the task's versions are removed, finishing the delete;
- versions with no link to them and no delete under way (a save over a copied-in folder, or a
  task's first save, killed between moving its folder and linking it): the newest complete
  version is linked (a killed first save completes), so a prompt is never lost;
- `<root>/.tmp-export-<id>`: a running export's journal naming its temp folder beside the
  destination, locked while the export runs; that folder is removed once the lock is free.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from softprompt.atomic import fsync_dir
from softprompt.bank.files import (
    encode_saved,
    prompt_from_files,
    read_files,
    read_header,
    read_prompt_dir,
    write_files,
    write_prompt_dir,
)
from softprompt.bank.format import (
    CONFIG_FILE,
    META_FILE,
    PLOT_NAME_RE,
    PLOTS_DIR,
    WEIGHTS_FILE,
    PromptHeader,
    SavedPrompt,
    check_compatible,
    check_fingerprint,
)
from softprompt.data.tasks import TASK_NAME_RE, validate_task_name
from softprompt.errors import IncompatiblePromptError, PromptFileError, UnknownTaskError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock: one writer per task there
    fcntl = None

logger = logging.getLogger(__name__)

_VERSIONS_DIR = ".versions"
_LOCKS_DIR = ".locks"
_TMP_PREFIX = ".tmp-"
_LINK_PREFIX = ".tmp-link-"  # .tmp-link-<task>@<version>: a new link about to replace the task's
_RM_PREFIX = ".tmp-rm-"  # .tmp-rm-<task>@<id>: a deleted task's link, kept until its versions go
_EXPORT_PREFIX = ".tmp-export-"  # a running export's journal, and its temp folder's suffix
_LINK_SEP = "@"  # cannot occur in a task name, so '<name>@<version>' parses unambiguously
_READ_ATTEMPTS = 3


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


def _new_version_id(ns: int | None = None) -> str:
    """Unique across processes and hosts sharing a bank; sorts by creation time (or `ns`)."""
    return f"v{time.time_ns() if ns is None else ns}-{os.getpid()}-{secrets.token_hex(4)}"


def _version_key(version: str) -> tuple[int, str]:
    """Sort key of a version id: its time part (0 for a name `_new_version_id` did not make)."""
    head = version[1:].split("-", 1)[0]
    return (int(head) if version.startswith("v") and head.isdigit() else 0), version


def _next_version_id(existing: list[str]) -> str:
    """A new version id sorting after every one in `existing` (the caller holds the task's lock),
    even when this host's clock is behind the one that wrote them."""
    newest = max((_version_key(entry)[0] for entry in existing), default=0)
    return _new_version_id(max(time.time_ns(), newest + 1))


def _kept_versions(entries: list[str], current: str | None) -> set[str]:
    """The versions of a task readers may use: the linked one (`current`) and the one linked
    before it, which a reader that resolved the link just before the last save may still read.
    Versions newer than the linked one were never linked (a save killed before its link swap)."""
    versions = [entry for entry in entries if not entry.startswith(".")]
    if current not in versions:
        return set(versions)  # the link points elsewhere: keep every version rather than guess
    older = [v for v in versions if _version_key(v) < _version_key(current)]
    return {current, max(older, key=_version_key)} if older else {current}


def _linked_version(link: Path) -> str | None:
    """The version a task's symlink names, or None if it is not a symlink (or just vanished)."""
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def _try_flock(fd: int, *, wait: bool) -> bool:
    """Take an exclusive flock on `fd`; False if `wait` is off and another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# ----------------------------------------------------------------------------- the bank


class PromptBank:
    """A folder of tasks, one PEFT-compatible prompt folder each, with atomic saves.

    Safe for several processes (server replicas, a trainer) sharing one folder: saves of one task
    are serialised by a file lock, last writer wins, and readers never see a half-written task.
    Opening a bank clears up after writers killed mid-way (see the module docstring).
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True):
        self._root = Path(root).expanduser().absolute()
        if self._root.is_dir():
            self._sweep()
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
                if TASK_NAME_RE.fullmatch(entry.name) and (entry.is_symlink() or entry.is_dir()):
                    found.append(entry.name)
        return sorted(found)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or TASK_NAME_RE.fullmatch(name) is None:
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
        return prompt_from_files(read_files(folder, f"{name}/"), name, where=f"{name}/")

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

    def read_header(self, name: str) -> PromptHeader:
        """Task `name`'s config and softprompt.json without its tensor (two small files): what
        listing a task needs. Its version is read first, so a save racing this read at worst
        pairs the older version id with the newer files, and the next read (a new id) corrects it."""
        version = self.version(name)
        if not self._resolve(name).is_dir():
            raise PromptFileError(f"task '{name}': its folder does not exist (a dangling link?)")
        return self._read_current(
            name, lambda folder: read_header(folder, name, version, f"{name}/")
        )

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
        if not isinstance(plot, str) or PLOT_NAME_RE.fullmatch(plot) is None:
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
                    raise PromptFileError(
                        f"task '{name}': a file vanished while being read"
                    ) from None
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
                    check_fingerprint(saved, fingerprint)
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
        config_text, meta_text = encode_saved(saved)  # bad input fails before anything is written
        try:
            with self._writer_lock(name):
                self._adopt_plain_dir(name)
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
                self._adopt_plain_dir(name)
                # The commit point: readers find no task, and the link, moved aside, records
                # that its versions must go until they are gone (a killed delete is finished
                # by the next open of the bank).
                moved = self._root / f"{_RM_PREFIX}{name}{_LINK_SEP}{_new_version_id()}"
                os.rename(link, moved)
                fsync_dir(self._root)
                self._cleanup(name, keep=set())
                _remove_path(self._versions_dir(name))
                _remove_path(moved)
                fsync_dir(self._root)
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
        job = _new_version_id()
        tmp = dest.parent / f".{dest.name}{_EXPORT_PREFIX}{job}"
        with self._export_journal(job, tmp):
            tmp.mkdir()
            try:
                write_prompt_dir(tmp, saved)
                os.replace(tmp, dest)  # POSIX allows renaming a folder over an empty one
            except Exception as exc:
                _remove_path(tmp)
                if isinstance(exc, OSError):
                    raise PromptFileError(
                        f"could not export task '{name}' to {dest}: {exc}"
                    ) from exc
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
    def _writer_lock(self, name: str, *, wait: bool = True) -> Iterator[bool]:
        """Exclusive per-task lock; the kernel drops it if the holder dies. Yields whether it was
        taken (always, when `wait`; without `wait`, False if another process holds it).

        The lock file is never deleted: writers that opened an unlinked lock file would no longer
        exclude each other.
        """
        locks = self._root / _LOCKS_DIR
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            yield _try_flock(fd, wait=wait)
        finally:
            os.close(fd)  # closing releases the lock

    def _write_version(
        self, name: str, saved: SavedPrompt, config_text: str, meta_text: str
    ) -> str:
        """Write a complete new version folder (via a temp folder) and return its id."""
        versions = self._versions_dir(name)
        versions.mkdir(parents=True, exist_ok=True)
        version = _next_version_id(_listdir(versions))
        tmp = versions / f"{_TMP_PREFIX}{version}"
        tmp.mkdir()
        try:
            write_files(tmp, saved, config_text, meta_text)
            os.rename(tmp, versions / version)
        except Exception:
            _remove_path(tmp)  # an ordinary error leaves nothing; a killed process is cleaned later
            raise
        fsync_dir(versions)
        return version

    def _swap_link(self, name: str, version: str) -> str | None:
        """Point `<root>/<name>` at `version` atomically; return the version it pointed at before."""
        link = self._root / name
        previous = _linked_version(link)
        tmp_link = self._root / f"{_LINK_PREFIX}{name}{_LINK_SEP}{version}"
        os.symlink(os.path.join(_VERSIONS_DIR, name, version), tmp_link)
        os.replace(tmp_link, link)  # the commit point: readers see the old or the new version
        fsync_dir(self._root)
        return previous

    def _adopt_plain_dir(self, name: str) -> None:
        """Turn a real folder at `<root>/<name>` (e.g. a copied PEFT folder) into a linked version.

        A symlink cannot replace a folder atomically: the folder moves into .versions, then is
        linked; a writer killed in between leaves versions with no link, which the next open of
        the bank links again (`_recover`).
        """
        path = self._root / name
        if path.is_symlink() or not path.is_dir():
            return
        versions = self._versions_dir(name)
        versions.mkdir(parents=True, exist_ok=True)
        version = _next_version_id(_listdir(versions))
        os.rename(path, versions / version)
        self._swap_link(name, version)
        logger.info("moved plain folder %s into %s", path, versions / version)

    def _cleanup(self, name: str, keep: set[str | None]) -> None:
        """Remove versions and temp entries of `name` other than `keep` (we hold its lock)."""
        versions = self._versions_dir(name)
        for entry in _listdir(versions):
            if entry.startswith(_TMP_PREFIX):
                _remove_path(versions / entry)  # no reader ever opens a temp folder
            elif entry not in keep:
                _retire(versions / entry)
        for stale_link in self._root_temps(name, _LINK_PREFIX):
            _remove_path(stale_link)

    def _root_temps(self, name: str, prefix: str) -> list[Path]:
        """Entries `<root>/<prefix><name>@...` (links a writer of `name` stages or moves aside)."""
        start = f"{prefix}{name}{_LINK_SEP}"
        return [self._root / e for e in _listdir(self._root) if e.startswith(start)]

    # -- clearing up after killed writers (see the module docstring)

    def _sweep(self) -> None:
        """Clear up after writers killed mid-way, each task under its lock, skipping tasks whose
        writer is alive; best effort: a bank we may only read is still opened."""
        if fcntl is None:
            return  # without flock nothing proves a writer dead: leave everything
        try:
            for name in sorted(self._littered_tasks()):
                with self._writer_lock(name, wait=False) as locked:
                    if locked:
                        self._recover(name)
            for entry in _listdir(self._root):
                if entry.startswith(_EXPORT_PREFIX):
                    _drop_abandoned_export(self._root / entry, entry[len(_EXPORT_PREFIX) :])
        except OSError as exc:
            logger.warning(
                "could not clear up after killed writers in bank %s: %s", self._root, exc
            )

    def _littered_tasks(self) -> set[str]:
        """Tasks a killed writer may have left entries of (cheap: folder listings and links)."""
        found = set()
        for entry in _listdir(self._root):
            for prefix in (_LINK_PREFIX, _RM_PREFIX):
                if entry.startswith(prefix):
                    found.add(entry[len(prefix) :].split(_LINK_SEP, 1)[0])
        for name in _listdir(self._root / _VERSIONS_DIR):
            entries = _listdir(self._versions_dir(name))
            current = _linked_version(self._root / name)
            if current is None or set(entries) - _kept_versions(entries, current):
                found.add(name)
        return {name for name in found if TASK_NAME_RE.fullmatch(name)}

    def _recover(self, name: str) -> None:
        """Bring task `name` to what a finished save or delete leaves; we hold its lock, so the
        writer that left these entries is dead. Never removes the version its link names."""
        link, versions = self._root / name, self._versions_dir(name)
        deletes = self._root_temps(name, _RM_PREFIX)
        for stale_link in self._root_temps(name, _LINK_PREFIX):
            _remove_path(stale_link)
        if not os.path.lexists(link) and not deletes:
            self._relink_newest(name)
        current = _linked_version(link)
        if current is not None:
            self._cleanup(name, keep=_kept_versions(_listdir(versions), current))
        else:  # deleted (finish it), or a plain folder: no version folder is in use
            _remove_path(versions)
        for moved in deletes:
            _remove_path(moved)
        fsync_dir(self._root)
        logger.info("cleared up after a killed writer of task '%s' in bank %s", name, self._root)

    def _relink_newest(self, name: str) -> None:
        """Link the newest complete version of a task that has versions but no link."""
        complete = [e for e in _listdir(self._versions_dir(name)) if not e.startswith(".")]
        if complete:
            newest = max(complete, key=_version_key)
            self._swap_link(name, newest)
            logger.warning(
                "task '%s' had versions but no link: linked its newest, %s", name, newest
            )

    @contextlib.contextmanager
    def _export_journal(self, job: str, tmp: Path) -> Iterator[None]:
        """Record a running export's temp folder `tmp` (beside its destination, outside the bank)
        in `<root>/.tmp-export-<job>`, locked while the export runs, so that the next open of the
        bank removes the folder if the export is killed. A bank we may not write to gets no
        journal: a killed export then leaves its temp folder, as any writer there would."""
        journal = self._root / f"{_EXPORT_PREFIX}{job}"
        try:
            fd = os.open(journal, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            logger.debug("no export journal in bank %s: %s", self._root, exc)
            fd = None
        try:
            if fd is not None:
                _try_flock(fd, wait=True)
                os.write(fd, os.fsencode(tmp))
            yield
        finally:
            if fd is not None:
                _remove_path(journal)  # before the lock goes: a sweep never sees a done export
                os.close(fd)


def _drop_abandoned_export(journal: Path, job: str) -> None:
    """Remove a killed export's temp folder and its journal; nothing while the export runs."""
    try:
        fd = os.open(journal, os.O_RDWR)
    except FileNotFoundError:
        return  # finished meanwhile
    try:
        if not _try_flock(fd, wait=False):
            return  # the export is running
        tmp = Path(os.fsdecode(os.read(fd, 1 << 16)))
        # Only the folder this journal's export made, whatever else the file might say. Empty:
        # the export was killed (or is starting) before it named its folder, so it made none.
        if tmp.is_absolute() and tmp.name.endswith(f"{_EXPORT_PREFIX}{job}"):
            _remove_path(tmp)
        _remove_path(journal)
    finally:
        os.close(fd)


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
