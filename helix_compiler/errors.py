"""Error types. User mistakes raise ``HelixError`` subclasses (all are ``ValueError``s) whose
message names the value seen and the fix; ``assert`` is kept for internal invariants."""

from __future__ import annotations


class HelixError(ValueError):
    """Base class for every error caused by user input or an unsupported model."""


class CaptureError(HelixError):
    """The model could not be captured as one graph."""


class UnsupportedModelError(HelixError):
    """The graph was captured but does not have a shape the compiler can pipeline."""


class ScheduleError(HelixError):
    """An invalid schedule request, or a schedule that fails validation."""


class RuntimeFailure(RuntimeError):
    """A rank failed or timed out while running a stage program."""
