"""Per-tenant API keys: the keys file, key checks, task patterns, reloads and the audit log.

    access = Access(api_key="admin-secret", keys=KeyTable("keys.json"), audit=AuditLog("keys.audit.jsonl"))

The keys file is JSON, written by `softprompt keys add|revoke` (never by hand, though it may be):

    {"version": 1, "tenants": [{"name": "acme", "key_sha256": "<64 hex>", "tasks": ["acme-*"],
                                "upload": true, "delete": false, "created": "2025-01-01T00:00:00Z"}]}

Only each key's sha256 is stored. The keys are 256 random bits (`secrets.token_urlsafe(32)`), not
passwords, so a plain hash is enough: no salt or slow hash would make guessing one any harder.
A tenant may use the tasks its `tasks` patterns match (`fnmatch` globs) plus the base model, and
upload over / delete them if `upload` / `delete` say so. Anything outside its patterns does not
exist for it: the same 404 as a missing task, so a tenant cannot learn another's task names.
The admin key (`--api-key`, SOFTPROMPT_API_KEY) may do everything.

The HTTP side (app.py) calls `Access.authenticate` before every /v1 route, `Access.check_use`
before a task reaches the backend, and runs each upload and delete inside `Access.admin_action`,
which writes the audit line.

Where a request comes from is the socket peer: the server runs uvicorn with proxy headers off, so
no header can rewrite it. A reverse proxy named in `ProxyConfig.forwarded_allow_ips` may name the
client in X-Forwarded-For; the audit log keeps that as `forwarded_for`, beside the peer's `from`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path

from fastapi import Request

from softprompt.atomic import write_file
from softprompt.bank import TASK_NAME_PATTERN
from softprompt.errors import AuthenticationError, ConfigError, PermissionDeniedError
from softprompt.options import flag as cli_flag
from softprompt.options import opt
from softprompt.serving.registry import unknown_task

log = logging.getLogger(__name__)

KEYS_FORMAT = 1
ACTIONS = ("upload", "delete")
RESERVED_TENANTS = frozenset({"admin", "anonymous"})
"""Names the audit log uses for the admin key and for requests without one."""
RELOAD_CHECK_SECONDS = 1.0
"""How often, at most, a request looks at the keys file's mtime."""
_TENANT_NAME_RE = re.compile(TASK_NAME_PATTERN)
_PATTERN_RE = re.compile(r"[a-z0-9._\-*?\[\]!]{1,128}")  # task-name characters plus glob syntax
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("name", "key_sha256", "tasks", "upload", "delete", "created")


def hash_key(key: str) -> str:
    """The hex sha256 of a key: what the keys file stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- who may do what


@dataclass(frozen=True)
class Tenant:
    """One key's rights: the tasks it may use (globs) and whether it may upload / delete them."""

    name: str
    key_sha256: str
    tasks: tuple[str, ...]
    upload: bool = False
    delete: bool = False
    created: str | None = None
    digest: bytes = field(default=b"", repr=False, compare=False)

    def may_use(self, task: str) -> bool:
        return any(fnmatchcase(task, pattern) for pattern in self.tasks)

    def may(self, action: str, task: str) -> bool:
        return bool(getattr(self, action)) and self.may_use(task)

    def to_json(self) -> dict:
        entry = {
            "name": self.name,
            "key_sha256": self.key_sha256,
            "tasks": list(self.tasks),
            "upload": self.upload,
            "delete": self.delete,
        }
        return entry | ({"created": self.created} if self.created else {})


ADMIN = Tenant("admin", "", ("*",), upload=True, delete=True)
OPEN = Tenant("anonymous", "", ("*",), upload=True, delete=True)
"""A request to a server with no keys at all: everything is open (the server warns at start)."""
READER = Tenant("anonymous", "", ("*",))
"""A request without a key where only the admin routes have one: every task, no admin action."""


# ---------------------------------------------------------------- the keys file


def read_keys(path: str | Path) -> tuple[Tenant, ...]:
    """The tenants in a keys file; ConfigError naming the file (and entry, field) if it is bad."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"keys file {path} does not exist (create it with "
            f"'softprompt keys add {path} --tenant NAME --tasks PATTERN')"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"keys file {path} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"keys file {path} is not valid JSON: {exc}") from None
    return parse_keys(data, str(path))


def parse_keys(data: object, where: str) -> tuple[Tenant, ...]:
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
        raise ConfigError(f"keys file {where} must hold a JSON object with a 'tenants' list")
    if data.get("version", KEYS_FORMAT) != KEYS_FORMAT:
        raise ConfigError(
            f"keys file {where}: version {data['version']!r} is not supported (this "
            f"softprompt reads version {KEYS_FORMAT})"
        )
    tenants = tuple(
        _parse_tenant(entry, f"keys file {where}, tenant #{i + 1}")
        for i, entry in enumerate(data["tenants"])
    )
    for attribute in ("name", "key_sha256"):
        seen: set[str] = set()
        for i, tenant in enumerate(tenants):
            value = getattr(tenant, attribute)
            if value in seen:
                raise ConfigError(
                    f"keys file {where}, tenant #{i + 1} ('{tenant.name}'): "
                    f"{attribute} is the same as an earlier tenant's"
                )
            seen.add(value)
    return tenants


def _parse_tenant(entry: object, where: str) -> Tenant:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a JSON object, not {type(entry).__name__}")
    name = entry.get("name")
    if isinstance(name, str) and _TENANT_NAME_RE.fullmatch(name):
        where = f"{where} ('{name}')"
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field '{unknown[0]}' (fields: {', '.join(_FIELDS)})")
    _check_tenant_name(name, where)
    digest = entry.get("key_sha256")
    if not isinstance(digest, str) or not _HASH_RE.fullmatch(digest):
        raise ConfigError(
            f"{where}: field 'key_sha256' must be 64 lowercase hex digits (a key's sha256)"
        )
    tasks = entry.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{where}: field 'tasks' must be a non-empty list of task name patterns")
    for pattern in tasks:
        _check_pattern(pattern, f"{where}: field 'tasks'")
    for flag in ACTIONS:
        if not isinstance(entry.get(flag, False), bool):
            raise ConfigError(f"{where}: field '{flag}' must be true or false")
    created = entry.get("created")
    if created is not None and not isinstance(created, str):
        raise ConfigError(f"{where}: field 'created' must be a string")
    return Tenant(
        name,
        digest,
        tuple(tasks),
        upload=entry.get("upload", False),
        delete=entry.get("delete", False),
        created=created,
        digest=bytes.fromhex(digest),
    )


def _check_tenant_name(name: object, where: str) -> None:
    if not isinstance(name, str) or not _TENANT_NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: field 'name' must match {TASK_NAME_PATTERN}, not {name!r}")
    if name in RESERVED_TENANTS:
        raise ConfigError(
            f"{where}: tenant name '{name}' is reserved (the audit log's name for "
            f"{'the admin key' if name == 'admin' else 'requests without a key'})"
        )


def _check_pattern(pattern: object, where: str) -> None:
    if not isinstance(pattern, str) or not _PATTERN_RE.fullmatch(pattern):
        raise ConfigError(
            f"{where}: {pattern!r} is not a task name pattern (task-name characters "
            "a-z 0-9 . _ - and the globs * ? [...])"
        )


def write_keys(path: str | Path, tenants: Iterable[Tenant]) -> None:
    """Replace the keys file atomically (temp file, fsync, rename), readable by its owner only."""
    path = Path(path)
    text = (
        json.dumps({"version": KEYS_FORMAT, "tenants": [t.to_json() for t in tenants]}, indent=2)
        + "\n"
    )
    write_file(path, text, mode=0o600)


@contextlib.contextmanager
def _editing(path: Path):
    """Hold an exclusive lock for a read-modify-write of the keys file (two `keys add` at once
    must not lose one). The lock is a sibling file: the keys file itself is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def add_tenant(
    path: str | Path, name: str, tasks: list[str], *, upload: bool = False, delete: bool = False
) -> str:
    """Add a tenant with a new random key; returns the key, which is stored nowhere (only its hash)."""
    path = Path(path)
    where = f"tenant '{name}'"
    _check_tenant_name(name, where)
    if not tasks:
        raise ConfigError(f"{where}: give at least one task pattern (--tasks)")
    for pattern in tasks:
        _check_pattern(pattern, f"{where}: --tasks")
    with _editing(path):
        tenants = read_keys(path) if path.exists() else ()
        if any(t.name == name for t in tenants):
            raise ConfigError(
                f"tenant '{name}' is already in {path}; revoke it first to give it a new key"
            )
        key = secrets.token_urlsafe(32)
        new = Tenant(
            name, hash_key(key), tuple(tasks), upload=upload, delete=delete, created=utc_now()
        )
        write_keys(path, (*tenants, new))
    return key


def revoke_tenant(path: str | Path, name: str) -> None:
    """Remove a tenant (and so its key); a running server drops it at its next reload."""
    path = Path(path)
    with _editing(path):
        tenants = read_keys(path)
        if not any(t.name == name for t in tenants):
            raise ConfigError(
                f"no tenant '{name}' in {path} (tenants: "
                f"{', '.join(t.name for t in tenants) or 'none'})"
            )
        write_keys(path, (t for t in tenants if t.name != name))


# ---------------------------------------------------------------- the live table


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file does: an atomic replace gives a new inode even within one mtime tick."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class KeyTable:
    """The tenants of a keys file, re-read when it changes (checked at most once a second) or on
    request (SIGHUP). A bad file at start raises; a bad file at reload is logged and the old table
    kept. The table is swapped whole, so a request sees the old table or the new, never a mix."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._signature = _signature(self.path)
        self._tenants = read_keys(self.path)
        self._checked_at = time.monotonic()
        self._reload_requested = False
        self._lock = threading.Lock()

    def request_reload(self) -> None:
        """Re-read the file before the next key check (safe to call from a signal handler)."""
        self._reload_requested = True

    def tenants(self) -> tuple[Tenant, ...]:
        """The current table, re-read first if the file changed or a reload was requested."""
        if self._reload_requested or time.monotonic() - self._checked_at >= RELOAD_CHECK_SECONDS:
            with self._lock:
                self._maybe_reload()
        return self._tenants

    def _maybe_reload(self) -> None:
        forced, self._reload_requested = self._reload_requested, False
        self._checked_at = time.monotonic()
        signature = _signature(self.path)
        if not forced and signature == self._signature:
            return
        self._signature = signature  # a bad file is reported once, not on every request
        try:
            tenants = read_keys(self.path)
        except ConfigError as exc:
            log.error("keeping the previous keys (%d tenants): %s", len(self._tenants), exc)
            return
        self._tenants = tenants
        log.info("reloaded %s: %d tenants", self.path, len(tenants))


def reload_on_sighup(table: KeyTable) -> None:
    """SIGHUP makes `table` re-read its file (call from the main thread, before serving)."""
    signal.signal(signal.SIGHUP, lambda signum, frame: table.request_reload())


# ---------------------------------------------------------------- the audit log


class AuditLog:
    """Append-only JSON lines, one per admin action. Each line is one write() under an exclusive
    flock, then fsynced: writers in this process or in other replicas never interleave lines."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:  # refuse to start rather than serve without the log
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        except OSError as exc:
            raise ConfigError(f"audit log {self.path} cannot be written: {exc.strerror}") from None

    def write(self, record: dict) -> None:
        line = memoryview(
            (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        )
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                while line:
                    line = line[os.write(fd, line) :]
                os.fsync(fd)
            finally:
                os.close(fd)


def default_audit_path(keys_path: str | Path) -> Path:
    """Next to the keys file: keys.json -> keys.audit.jsonl."""
    keys_path = Path(keys_path)
    return keys_path.with_name(f"{keys_path.stem}.audit.jsonl")


# ---------------------------------------------------------------- where a request comes from

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ANY = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


@dataclass
class ProxyConfig:
    """Which peers are reverse proxies trusted to name the client. None by default: otherwise any
    client could write an address into X-Forwarded-For and the audit log would believe it."""

    forwarded_allow_ips: str = opt(
        "",
        "Reverse proxies trusted to name the client in X-Forwarded-For: comma-separated IP "
        "addresses or CIDR networks, or '*' for every peer. The audit log's 'from' is always the "
        "connecting peer; the client a trusted proxy names is logged as 'forwarded_for'. Empty: "
        "no proxy is trusted (uvicorn's FORWARDED_ALLOW_IPS is not read).",
    )

    def __post_init__(self):
        self._trusted = _parse_trusted(self.forwarded_allow_ips)

    def trusts(self, host: str | None) -> bool:
        address = _ip(host)
        return address is not None and any(address in network for network in self._trusted)

    def forwarded_for(self, peer: str | None, forwarded: list[str]) -> str | None:
        """The client a trusted `peer` names in its X-Forwarded-For header values; None if the peer
        is not trusted or names nobody. Each proxy appends the address it saw, so the client is the
        last hop not itself a trusted proxy (the first hop if every one is)."""
        if not self.trusts(peer):
            return None
        hops = [hop.strip() for value in forwarded for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.trusts(_hop_host(hop)):
                return _hop_host(hop)
        return _hop_host(hops[0]) if hops else None


def _parse_trusted(value: str) -> tuple[_Network, ...]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if "*" in items:
        return _ANY
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"{cli_flag('forwarded_allow_ips')}: {item!r} is not an IP address or CIDR network "
                "(e.g. 10.0.0.1,192.168.0.0/16, or '*' for every peer)"
            ) from None
    return tuple(networks)


def _ip(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an address (an IPv4-mapped IPv6 peer, as a dual-stack socket reports, as IPv4)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _hop_host(hop: str) -> str:
    """An X-Forwarded-For entry without its port: '[::1]:80' -> '::1', '10.0.0.1:80' -> '10.0.0.1'."""
    if hop.startswith("[") and "]" in hop:
        return hop[1 : hop.index("]")]
    return hop.rsplit(":", 1)[0] if hop.count(":") == 1 else hop


# ---------------------------------------------------------------- the HTTP side

_ADMIN_METHODS = {"PUT": "upload", "DELETE": "delete"}
_OUTCOMES = {401: "refused", 403: "refused", 499: "client_closed"}
"""The audit outcome of a failed action by its status (any other: "failed")."""


class Access:
    """Who a request is and what it may touch. Without a keys table, exactly the single-key
    server: inference open, admin routes behind `api_key` (open too when there is none)."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        keys: KeyTable | None = None,
        audit: AuditLog | None = None,
        base_names: Iterable[str] = (),
        status_of: Callable[[Exception], int] = lambda exc: 500,
        proxies: ProxyConfig | None = None,
    ):
        self.keys, self.audit = keys, audit
        self.proxies = proxies or ProxyConfig()
        self._admin_digest = (
            hashlib.sha256(api_key.encode()).digest() if api_key is not None else None
        )
        self._base_names = frozenset(base_names) | {""}
        self._status_of = status_of

    # ------------------------------------------------------------ who

    async def authenticate(self, request: Request) -> Tenant | None:
        """The FastAPI dependency of every route: who sends a /v1 request (401 if nobody)."""
        if not request.url.path.startswith("/v1/"):
            return None
        try:
            caller = self._identify(request)
        except AuthenticationError as exc:
            action = _ADMIN_METHODS.get(request.method)
            if action is not None:
                await self._record(request, None, action, request.path_params.get("task", ""), exc)
            raise
        request.state.caller = caller
        return caller

    def _identify(self, request: Request) -> Tenant:
        if self.keys is None:
            if self._admin_digest is None:
                return OPEN
            if request.method not in _ADMIN_METHODS:
                return READER
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        caller = self._match(header[7:].strip())
        if caller is None:
            raise AuthenticationError("invalid API key")
        return caller

    def _match(self, key: str) -> Tenant | None:
        """The key's owner, in time independent of which one (or none) it is: every stored hash is
        compared, with no early exit."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        candidates = [(ADMIN, self._admin_digest)] if self._admin_digest is not None else []
        candidates += [(t, t.digest) for t in (self.keys.tenants() if self.keys else ())]
        found = None
        for tenant, stored in candidates:
            if hmac.compare_digest(digest, stored) and found is None:
                found = tenant
        return found

    def caller(self, request: Request) -> Tenant:
        cached = getattr(request.state, "caller", None)
        return cached if cached is not None else self._identify(request)

    def health_viewer(self, request: Request) -> Tenant | None:
        """Who may see /health's details (the model, the backend, the tasks it may use): anyone
        without a keys file; with one, only a valid key's owner. None: up/down only. A missing or
        wrong key is not refused, so a load balancer's probe always gets its answer."""
        if self.keys is None:
            return OPEN
        try:
            return self._identify(request)
        except AuthenticationError:
            return None

    def origin(self, request: Request) -> dict:
        """Where the request comes from, for the audit log: the socket peer (`from`), plus the
        client a trusted proxy names (`forwarded_for`), only when there is one."""
        peer = request.client.host if request.client else None
        forwarded = self.proxies.forwarded_for(peer, request.headers.getlist("x-forwarded-for"))
        return {"from": peer} | ({"forwarded_for": forwarded} if forwarded else {})

    # ------------------------------------------------------------ what

    def may_use(self, request: Request, task: str) -> bool:
        return task in self._base_names or self.caller(request).may_use(task)

    def check_use(self, request: Request, task: str) -> None:
        """404, word for word a missing task's, for a task outside the caller's patterns."""
        if not self.may_use(request, task):
            raise unknown_task(task)  # the very 404 of a missing task: no existence leak

    @contextlib.asynccontextmanager
    async def admin_action(self, request: Request, action: str, task: str):
        """Check the caller may do `action` on `task`, run the block, audit the outcome (refusals
        and failures too). The block may set `outcome["version"]`. The refusal is the same whether
        or not the task exists."""
        caller = self.caller(request)
        outcome: dict = {}
        try:
            if not caller.may(action, task):
                raise PermissionDeniedError(f"this key may not {action} task '{task}'")
            yield outcome
        except Exception as exc:
            await self._record(request, caller, action, task, exc)
            raise
        await self._record(request, caller, action, task, None, outcome.get("version"))

    async def _record(
        self,
        request: Request,
        caller: Tenant | None,
        action: str,
        task: str,
        error: Exception | None,
        version: str | None = None,
    ) -> None:
        if self.audit is None:
            return
        record = {
            "time": utc_now(),
            "who": caller.name if caller else None,
            "action": action,
            "task": task,
            **self.origin(request),
        }
        if error is None:
            record |= {"outcome": "ok", "status": 200, "version": version}
        else:
            status = self._status_of(error)
            record |= {
                "outcome": _OUTCOMES.get(status, "failed"),
                "status": status,
                "error": str(error) or type(error).__name__,
            }
        try:
            await asyncio.to_thread(self.audit.write, record)
        except OSError as exc:  # the action has happened; say loudly that its record is missing
            log.error("audit log %s: could not record %s: %s", self.audit.path, record, exc)


def build_access(
    *,
    api_key: str | None,
    keys: str | Path | None,
    audit_log: str | Path | None,
    base_names: Iterable[str],
    status_of: Callable[[Exception], int],
    proxies: ProxyConfig | None = None,
) -> Access:
    """The server's Access from its flags; the audit log defaults to next to the keys file."""
    table = KeyTable(keys) if keys is not None else None
    audit_path = (
        audit_log
        if audit_log is not None
        else (default_audit_path(keys) if keys is not None else None)
    )
    audit = AuditLog(audit_path) if audit_path is not None else None
    return Access(
        api_key=api_key,
        keys=table,
        audit=audit,
        base_names=base_names,
        status_of=status_of,
        proxies=proxies,
    )


__all__ = [
    "Access",
    "AuditLog",
    "KeyTable",
    "ProxyConfig",
    "Tenant",
    "add_tenant",
    "build_access",
    "default_audit_path",
    "hash_key",
    "read_keys",
    "reload_on_sighup",
    "revoke_tenant",
    "write_keys",
]
