"""Errors a user can cause. The CLI prints these without a traceback and exits non-zero."""

from __future__ import annotations

import re

ERROR_COL = "error"
"""The output column where a row's error goes (null for rows that ran)."""


SECRET_PARAMS = frozenset({"secret_key", "session_token", "access_key", "sas_token", "account_key", "password"})
"""URI query parameters that carry credentials (pyarrow's S3, GCS and Azure file systems take them)."""

_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)([^/\s@'\"]*@)")
_SECRET_QUERY = re.compile(r"(?i)\b(" + "|".join(sorted(SECRET_PARAMS)) + r")=([^&\s'\"]*)")


def scrub_secrets(text: str) -> str:
    """``text`` with the credentials of any URI in it masked: the user part (``s3://KEY:SECRET@``
    -> ``s3://***@``) and secret query parameters (``secret_key=***``). The last guard before a
    line reaches the terminal or a log: no rayinfer line should ever hold a secret."""
    text = _USERINFO.sub(lambda m: m.group(1) + "***@", text)
    return _SECRET_QUERY.sub(lambda m: m.group(1) + "=***", text)


class RayInferError(Exception):
    """Base of every error a user can fix (bad spec, unknown task, missing model, ...).

    Its text is ``message``, kept apart from ``args``: Ray Data appends its retry advice to the
    args of an exception raised in a task, and the user should read rayinfer's line alone."""

    exit_code = 2

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(message, *args)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SpecError(RayInferError):
    """The job spec is malformed or inconsistent."""


class PluginError(RayInferError):
    """A plugin failed to load or registered something invalid."""


class UnknownTaskError(RayInferError):
    """The spec names a task no loaded plugin provides."""


class InputError(RayInferError):
    """The input dataset is missing, unreadable or lacks a named column."""


class ModelError(RayInferError):
    """The model (or adapter) cannot be found or does not fit the task."""


class OutputError(RayInferError):
    """The output location exists, cannot be written, or holds something else."""


class RunError(RayInferError):
    """The run was aborted (error rate over the limit, no GPUs, ...)."""

    exit_code = 3


class RunFailed(RunError):
    """A run stopped part-way (a failure in Ray, an error budget spent): its committed parts are
    kept and ``--resume`` goes on from them."""


class Stopped(RunError):
    """A run stopped on request (Ctrl-C, SIGTERM, ``rayinfer stop``) after its actors committed
    the rows they held: ``--resume`` goes on from there."""

    exit_code = 130


class UnreadableInput(RunError):
    """Part of an input file cannot be read at run time (a damaged row group), and
    ``input.on_unreadable`` is ``fail``."""


class RowError(Exception):
    """Raised or returned by a task for one row it cannot process.

    The row gets ``message`` in its ``error`` column and null outputs; the run goes on.
    ``kind`` groups errors in the run report (e.g. ``empty_input``, ``too_long``).
    """

    def __init__(self, message: str, kind: str = "row") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind

    def __repr__(self) -> str:
        return f"RowError({self.message!r}, kind={self.kind!r})"
