"""One exception family for everything that stops bncheck from checking a checkpoint or running a command.

Each class carries a stable short ``code`` that the JSON report exposes as ``error.code``; codes are part of the
output contract and never change meaning. Only the subclasses are raised: the base class has no code of its own.
"""

from __future__ import annotations

from typing import ClassVar


class BncheckError(Exception):
    """Base class: a checkpoint, an argument or a setting could not be read, understood or written."""

    code: ClassVar[str]


class CheckpointNotFoundError(BncheckError):
    code = "not-found"


class UnreadableFileError(BncheckError):
    """The operating system (or the server) refused to give the bytes (permissions, a special file, no Range)."""

    code = "unreadable"


class UnsupportedFormatError(BncheckError):
    """The bytes are not a checkpoint format bncheck knows (empty, text, an unrelated archive...)."""

    code = "unsupported-format"


class CorruptCheckpointError(BncheckError):
    """The file claims a known format but its structure is broken or truncated."""

    code = "corrupt"


class NoDataError(BncheckError):
    """A tensor the file names holds no values: an uninitialised lazy buffer, a meta-device tensor, a storage
    resized to zero (inspection reports these as BN018; reading their values, to recompute, cannot work)."""

    code = "no-data"


class UnsupportedDtypeError(BncheckError):
    """A BatchNorm tensor's dtype has no numpy equivalent (float8, quantised types)."""

    code = "unsupported-dtype"


class NoSuchEntryError(BncheckError):
    """An entry asked for by name (``--source``, ``--source-a``) holds no BatchNorm layers."""

    code = "no-such-entry"


class TorchRequiredError(BncheckError):
    """A feature that runs torch (recomputation, ``--unsafe-load``) was asked for and torch is not installed."""

    code = "needs-torch"


class MissingDependencyError(BncheckError):
    """An optional dependency (fsspec and its backend for URLs) is not installed."""

    code = "missing-dependency"


class ModelError(BncheckError):
    """The model spec cannot be turned into a module, the checkpoint does not fit it, or it fails on the data."""

    code = "bad-model"


class DataError(BncheckError):
    """The data spec cannot be turned into batches."""

    code = "bad-data"


class ConfigError(BncheckError):
    """A settings file or a flag holds an unknown key or a bad value."""

    code = "bad-config"


class WriteError(BncheckError):
    """recalibrate could not (or must not) write its output."""

    code = "cannot-write"


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (tracebacks and torch's multi-line
    messages never reach a report)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class BatchNormCheckError(RuntimeError):
    """Not a BncheckError: the check ran, and a training-loop callback (bncheck.integrations) stopped training
    because the model's BatchNorm statistics fail it. The message is the concise report."""
