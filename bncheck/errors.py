"""One exception family for everything that stops bncheck from reading a checkpoint.

Each class carries a stable short ``code`` that the JSON report exposes as ``error.code``; codes are part of the
output contract and never change meaning.
"""

from __future__ import annotations


class BncheckError(Exception):
    """Base class: a checkpoint (or an argument) could not be read or understood."""

    code = "error"


class CheckpointNotFoundError(BncheckError):
    code = "not-found"


class UnreadableFileError(BncheckError):
    """The operating system refused to read the path (permissions, a special file)."""

    code = "unreadable"


class UnsupportedFormatError(BncheckError):
    """The bytes are not a checkpoint format bncheck knows (empty, text, an unrelated archive...)."""

    code = "unsupported-format"


class CorruptCheckpointError(BncheckError):
    """The file claims a known format but its structure is broken or truncated."""

    code = "corrupt"


class UnsupportedDtypeError(BncheckError):
    code = "unsupported-dtype"


class TorchRequiredError(BncheckError):
    """The file can only be read by torch itself (legacy format) and torch is not installed."""

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
