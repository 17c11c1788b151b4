"""The exception tree of torch-integrity.

Every error the package raises on purpose derives from :class:`IntegrityError`.
Two branches matter to callers and to the CLI's exit codes:

* :class:`VerificationFailure` (exit code 1): the evidence does not hold up.
  Something was tampered with, a digest does not match, a replay diverged, an
  approval is missing. These are findings about the run, not about the caller.
* :class:`InputError` (exit code 2): the caller asked for something that cannot
  be done: a bad argument, an unreadable or malformed file, a refused path.

Tests can therefore tell tampering from a typo by type alone.
"""

from __future__ import annotations


class IntegrityError(Exception):
    """Root of every error raised by torch-integrity."""


# --- integrity failures (exit code 1) -------------------------------------------------


class VerificationFailure(IntegrityError):
    """The recorded evidence and the thing checked disagree."""


class TamperedError(VerificationFailure):
    """Bytes that were recorded have been changed, removed, added or reordered."""


class DigestMismatchError(VerificationFailure):
    """A computed digest differs from the expected one.

    Attributes:
        subject: what was hashed (a file, a tensor name, a record).
        expected: the digest that was recorded.
        computed: the digest computed now.
        differing: names of the tensors that differ, where known.
    """

    def __init__(
        self,
        subject: str,
        expected: object,
        computed: object,
        *,
        differing: tuple[str, ...] = (),
    ) -> None:
        self.subject = subject
        self.expected = expected
        self.computed = computed
        self.differing = differing
        detail = f"{subject}: expected {expected}, computed {computed}"
        if differing:
            shown = ", ".join(differing[:10])
            more = f" and {len(differing) - 10} more" if len(differing) > 10 else ""
            detail += f"; differing tensors: {shown}{more}"
        super().__init__(detail)


class TruncatedError(VerificationFailure):
    """The ledger is shorter than a head that was taken earlier, or lost its end."""


class MissingFileError(VerificationFailure):
    """A file the ledger records is not in the run directory."""


class UnsafePathError(VerificationFailure):
    """A path in a run directory is a symlink or points outside the directory."""


class DivergenceError(VerificationFailure):
    """A replay did not reproduce the recorded training."""


class ApprovalError(VerificationFailure):
    """Signatures, seals or approvals do not satisfy what was asked for."""


# --- bad input (exit code 2) ---------------------------------------------------------


class InputError(IntegrityError):
    """The request cannot be carried out as given."""


class UsageError(InputError):
    """A bad argument or configuration."""


class MalformedFileError(InputError):
    """A file cannot be parsed safely (malformed safetensors, pickle, bad JSON, ...)."""


class ReplayEnvironmentError(InputError):
    """Replay cannot start: code, environment or inputs do not allow it."""
