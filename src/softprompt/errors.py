"""Errors a user can act on. The CLI and the server map each type to one message / status code."""

from __future__ import annotations


class SoftPromptError(Exception):
    """Base class: every error this package raises on purpose."""

    param: str | None = None
    """The request field at fault, when the error is about one (the server reports it)."""


class ModelLoadError(SoftPromptError):
    """A model name, folder, hub id or GGUF file could not be loaded."""


class UnknownTaskError(SoftPromptError, KeyError):
    """A task name or task id that is not loaded / not in the bank."""

    param = "model"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown task"


class InvalidTaskNameError(SoftPromptError, ValueError):
    """A task name outside `[a-z0-9][a-z0-9._-]{0,63}` (rejected before touching the disk), or a
    reserved one (the base model's name)."""

    param = "model"


class IncompatiblePromptError(SoftPromptError, ValueError):
    """A prompt whose shape, values or base-model fingerprint do not fit the model."""


class PromptFileError(SoftPromptError):
    """A prompt folder that is missing, unreadable or malformed."""


class DataError(SoftPromptError, ValueError):
    """A bad data file or row; names the file, line and field when known."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        self.path, self.line, self.field = path, line, field
        where = ":".join(str(p) for p in (path, line) if p is not None)
        detail = f" (field '{field}')" if field else ""
        super().__init__(f"{where}: {message}{detail}" if where else f"{message}{detail}")


class ConfigError(SoftPromptError, ValueError):
    """An invalid option value (CLI flag, config field)."""


class ContextLengthError(SoftPromptError, ValueError):
    """Input (plus soft prompt plus requested new tokens) longer than the model's context."""


class NoVerbalizerError(SoftPromptError, ValueError):
    """Classification asked of a task whose saved prompt has no verbalizer (labels/targets)."""


class AuthenticationError(SoftPromptError):
    """A missing or wrong API key on an admin route."""


class PermissionDeniedError(SoftPromptError):
    """A valid key that may not do this (a tenant's upload or delete outside its rights)."""


class UploadError(SoftPromptError, ValueError):
    """A prompt upload that is not a readable multipart/form-data body."""


class RequestLimitError(SoftPromptError, ValueError):
    """A request asking for more work than the server's per-request limit allows."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnsupportedPromptKindError(IncompatiblePromptError):
    """A prompt of a kind (e.g. a deep prompt) that this path cannot serve. An IncompatiblePromptError
    (422) like any other misfit; `task` and `kind` let a serving backend say why it cannot."""

    def __init__(self, message: str, *, task: str, kind: str):
        self.task, self.kind = task, kind
        super().__init__(message)


class BackendUnavailableError(SoftPromptError):
    """The model backend (a vLLM server) is not reachable, crashed, or failed the request."""


class BackendTimeoutError(BackendUnavailableError):
    """The model backend did not answer within the request timeout."""


class OverloadedError(BackendUnavailableError):
    """The server's queue of waiting requests is full: retry later (HTTP 503, code `overloaded`)."""
