"""All clipsearch exceptions. Each also inherits a familiar stdlib type so callers can catch either."""

from __future__ import annotations


class ClipsearchError(Exception):
    """Base class. The CLI turns any instance into one line on stderr and exit code 2."""

    #: the CLI option that fixes the problem, if any; appended to the message
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        msg = " ".join(str(self).split())
        return f"{msg} (fix: {self.hint})" if self.hint else msg


class ConfigError(ClipsearchError, ValueError):
    """An option value that is not valid."""


class InputError(ClipsearchError, ValueError):
    """Input data that is missing, unreadable or malformed."""


class OutputExistsError(ClipsearchError, FileExistsError):
    """The output folder exists and holds something that is not ours."""


class ModelLoadError(ClipsearchError, OSError):
    """A CLIP model could not be loaded."""


class IndexBuildError(ClipsearchError, RuntimeError):
    """The index could not be built as asked (e.g. memory budget too small)."""


class UnitFailedError(ClipsearchError, RuntimeError):
    """One or more units of work failed every retry."""
