"""Errors the engine raises on purpose: each carries a machine code, a human message and the field."""

from __future__ import annotations


class KDError(Exception):
    """Base for every error the engine raises deliberately.

    `code` is stable and machine-readable (the worker maps it to a job's error code),
    `field` names the spec field at fault where there is one.
    """

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class SpecError(KDError):
    """The job spec is invalid; `errors` lists every problem as {field, message}."""

    code = "invalid_spec"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        first = errors[0] if errors else {"field": None, "message": "invalid spec"}
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors), field=first["field"])


class BadInputError(KDError):
    """A user's file (teacher or data) is unreadable, unsafe or not what it claims."""

    code = "bad_input"


class UnsafeFormatError(BadInputError):
    """The file carries code (TorchScript, torch.export, pickle) and the operator has not allowed it."""

    code = "unsafe_format"


class MismatchError(BadInputError):
    """Teacher and data do not fit: input shape, number of classes, labels out of range."""

    code = "teacher_data_mismatch"


class TrainingDivergedError(KDError):
    """The loss became NaN or infinite; retrying the same job would fail the same way."""

    code = "diverged"


class CancelledError(KDError):
    """The run was cancelled through the callback's cancel check."""

    code = "cancelled"
