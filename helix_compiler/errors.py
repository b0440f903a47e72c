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
    """A rank failed or timed out while running a stage program.

    The optional fields say where: ``rank`` (the rank raising), ``peer`` (the other rank
    involved, if any), ``fold`` (the fold the request was filed under), ``tag`` (the
    message's tag, e.g. ``"fwd A3 m5"``: instruction and micro batch) and ``waiting_for``
    (what was being waited for, in words). They are keyword-only so ``RuntimeFailure(msg)``
    keeps working, and the exception pickles (its ``__dict__`` travels with it)."""

    def __init__(
        self,
        message: str = "",
        *,
        rank: int | None = None,
        peer: int | None = None,
        fold: int | None = None,
        waiting_for: str | None = None,
        tag: str | None = None,
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.peer = peer
        self.fold = fold
        self.waiting_for = waiting_for
        self.tag = tag
