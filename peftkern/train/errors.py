"""The errors a training run raises for what a user can fix. The CLI prints their message alone
(``peftkern sft: error: ...``, exit status 2); anything else is a bug and keeps its traceback.

Every message names what is wrong and where: the file and line, the setting, the path, the step."""
from __future__ import annotations


class TrainError(Exception):
    """Base of every error below."""


class ConfigError(TrainError, ValueError):
    """A setting that is missing, of the wrong type or out of range (``file: key: expected ..., got ...``)."""


class DataError(TrainError, ValueError):
    """A training record that does not fit its trainer's format; the message says where and why."""


class PathError(TrainError, FileNotFoundError):
    """A model, tokenizer, data or output path that does not exist or is not what it must be."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be resumed from (damaged, another model, another trainer, another run)."""


class OutputDirError(TrainError):
    """``--out`` is in use by another run, holds another run, or cannot be written."""


class SaveError(TrainError, OSError):
    """A checkpoint or output that could not be written (full disk, I/O error, permission)."""


class NonFiniteError(TrainError, FloatingPointError):
    """Too many optimizer steps in a row with a non-finite loss or gradient."""


class RunWarning(UserWarning):
    """Something a run did on its own that the user should know (a damaged checkpoint skipped, a
    stale lock taken over, a setting changed on resume)."""
