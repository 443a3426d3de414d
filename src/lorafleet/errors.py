"""The project's own exceptions: what a user can cause, said in one line."""

from __future__ import annotations


class LorafleetError(ValueError):
    """A problem the user can fix (bad config, missing file, unknown name).

    The CLI prints ``str(err)`` as one line and exits non-zero, without a traceback.
    """


class ConfigError(LorafleetError):
    """A config field has a value that is not allowed.

    Args:
        field: dotted path of the field, e.g. ``lora.rank``.
        message: what is wrong and what is allowed.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"config error: {field}: {message}")


class UpdateRejected(LorafleetError):
    """A client update failed validation; the round aggregates the others."""

    def __init__(self, client: int, reason: str) -> None:
        self.client = client
        self.reason = reason
        super().__init__(f"update from client {client} rejected: {reason}")
