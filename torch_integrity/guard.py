"""WeightGuard: keep proving that a served model still has the weights that were approved.

The guard re-hashes the live model's state dict in place with
:func:`torch_integrity.digest.digest_state_dict` (CPU tensors are read where they lie,
CUDA tensors are copied to the host 64 MiB at a time, never whole) and compares the
Merkle root with the expected one. On a mismatch it names the tensors that differ.

Example:
    >>> import torch
    >>> from torch_integrity.digest import digest_state_dict
    >>> model = torch.nn.Linear(4, 2)
    >>> guard = WeightGuard(model, digest_state_dict(model.state_dict()))
    >>> guard.check().tensors
    2
    >>> with torch.no_grad():
    ...     model.bias.view(torch.int32)[0] ^= 1  # flip one bit in place
    >>> guard.check()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    torch_integrity.errors.DigestMismatchError: served model weights: expected ...; differing tensors: bias

In a server, check every five minutes in a background thread and page someone::

    with WeightGuard(model, expected, interval=300, on_mismatch=alert):
        serve(model)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from torch_integrity.digest import STATE_ALGORITHM, Digest, StateDigest, digest_state_dict, root_of
from torch_integrity.errors import DigestMismatchError, IntegrityError, UsageError, VerificationFailure

_LOG = logging.getLogger(__name__)

MismatchHandler = Callable[[IntegrityError], object]


@dataclass(frozen=True)
class GuardCheck:
    """One successful check.

    Attributes:
        root: the Merkle root computed (equal to the expected one).
        tensors: number of tensors hashed.
        nbytes: bytes hashed.
        seconds: wall time of the check.
        checked_at: when it finished (``time.time()``).
    """

    root: Digest
    tensors: int
    nbytes: int
    seconds: float
    checked_at: float


def _expected_digest(expected: StateDigest | Digest, tensor_digests: Mapping[str, Digest] | None) -> StateDigest:
    if isinstance(expected, StateDigest):
        if tensor_digests is not None:
            raise UsageError("give tensor_digests only with a root Digest, not with a StateDigest")
        state = expected
    elif isinstance(expected, Digest):
        state = StateDigest(root=expected, tensors=dict(sorted((tensor_digests or {}).items())))
    else:
        raise UsageError(f"expected must be a StateDigest or a Digest, got {type(expected).__name__}")
    if state.root.algorithm != STATE_ALGORITHM:
        raise UsageError(f"expected root must be a {STATE_ALGORITHM} digest, got {state.root}")
    if state.tensors and root_of(state.tensors) != state.root:
        raise UsageError(f"the per-tensor digests do not combine to the expected root {state.root}")
    return state


class WeightGuard:
    """Re-hash a live model's weights on demand or periodically, and flag any change.

    Args:
        model: the served ``nn.Module`` (its ``state_dict()`` is taken afresh at every
            check, so replaced parameters are seen too), or a mapping of name -> tensor.
        expected: the approved :class:`~torch_integrity.digest.StateDigest` (e.g.
            ``open_run(run).checkpoint_at(step).model``), or just its root
            :class:`~torch_integrity.digest.Digest`; with a root alone give
            ``tensor_digests`` too, or mismatches cannot name the tensor.
        interval: seconds between background checks (needed for :meth:`start`).
        on_mismatch: called from the background thread with the error when a check
            fails (default: log it at ERROR level). It is called once per distinct
            bad state, not again at every interval while nothing changes.
        tensor_digests: per-tensor digests to go with a root ``expected``.
        threads: hashing threads per check (default: one per CPU).

    Thread safety:
        * Checks are serialized by an internal lock; :meth:`check` may be called from
          any thread, also while the background thread runs.
        * A check only reads the tensors, so it is safe alongside inference. Anything
          that *writes* weights while a check reads them (training, ``load_state_dict``)
          can make that check see a mix and report a mismatch: wrap deliberate updates
          in ``with guard.paused():`` and call :meth:`update_expected` inside it.
        * ``on_mismatch`` runs on the guard's thread: keep it short and thread-safe.
          It may call :meth:`stop`. Exceptions it raises are logged and swallowed.
        * A background check that cannot hash the model at all fails closed: the
          handler gets the error (a UsageError for, say, a tensor turned sparse or
          meta; a VerificationFailure wrapping anything unexpected).
        * The background thread is a daemon: it never keeps the process alive.
    """

    def __init__(
        self,
        model: torch.nn.Module | Mapping[str, torch.Tensor],
        expected: StateDigest | Digest,
        *,
        interval: float | None = None,
        on_mismatch: MismatchHandler | None = None,
        tensor_digests: Mapping[str, Digest] | None = None,
        threads: int | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module | Mapping):
            raise UsageError(f"model must be an nn.Module or a state dict, got {type(model).__name__}")
        if interval is not None and not interval > 0:
            raise UsageError(f"interval must be a positive number of seconds, got {interval!r}")
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be at least 1, got {threads}")
        self.model = model
        self.interval = interval
        self.on_mismatch = on_mismatch
        self.threads = threads
        self._expected = _expected_digest(expected, tensor_digests)
        self._lock = threading.RLock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reported: str | None = None
        self.last_check: GuardCheck | None = None
        self.last_error: IntegrityError | None = None
        self.checks = 0

    @property
    def expected(self) -> StateDigest:
        """The digest the weights must have."""
        return self._expected

    def update_expected(
        self, expected: StateDigest | Digest, *, tensor_digests: Mapping[str, Digest] | None = None
    ) -> None:
        """Switch to newly approved weights (call inside :meth:`paused` while swapping)."""
        state = _expected_digest(expected, tensor_digests)
        with self._lock:
            self._expected = state
            self._last_reported = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold off every check (on demand and background) while the block runs."""
        with self._lock:
            yield

    def _state(self) -> Mapping[str, torch.Tensor]:
        if isinstance(self.model, torch.nn.Module):
            return self.model.state_dict()
        return self.model

    def check(self) -> GuardCheck:
        """Hash the live weights now and compare them with the expected digest.

        Returns:
            A :class:`GuardCheck` on success.

        Raises:
            DigestMismatchError: the weights differ; ``differing`` names the tensors
                changed, added or removed (when per-tensor digests are known).
        """
        with self._lock:
            started = time.perf_counter()
            state = self._state()
            computed = digest_state_dict(state, threads=self.threads)
            seconds = time.perf_counter() - started
            self.checks += 1
            expected = self._expected
            if computed.root != expected.root:
                differing = computed.differing(expected) if expected.tensors else []
                error = DigestMismatchError(
                    "served model weights", expected.root, computed.root, differing=tuple(differing)
                )
                self.last_error = error
                raise error
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            result = GuardCheck(computed.root, len(computed.tensors), nbytes, seconds, time.time())
            self.last_check = result
            return result

    # --- background checking ----------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> WeightGuard:
        """Check now and then every ``interval`` seconds in a daemon thread."""
        if self.interval is None:
            raise UsageError("WeightGuard.start() needs interval= (seconds between checks)")
        if self.running:
            raise UsageError("this WeightGuard is already running")
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="torch-integrity-weight-guard", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background thread (waits for a check in progress to finish)."""
        self._stop_event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def __enter__(self) -> WeightGuard:
        if self.interval is not None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        stop = self._stop_event
        while not stop.is_set():
            self._background_check()
            if stop.wait(self.interval):
                return

    def _background_check(self) -> None:
        try:
            self.check()
            self._last_reported = None
            return
        except DigestMismatchError as exc:
            error: IntegrityError = exc
            key = str(exc.computed)
        except IntegrityError as exc:
            error, key = exc, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # fail closed: a guard that cannot hash proves nothing
            error = VerificationFailure(f"weight guard could not hash the model: {exc!r}")
            error.__cause__ = exc
            key = repr(exc)
        self.last_error = error
        if key == self._last_reported:
            return
        self._last_reported = key
        try:
            if self.on_mismatch is None:
                _LOG.error("torch-integrity WeightGuard: %s", error)
            else:
                self.on_mismatch(error)
        except Exception:
            _LOG.exception("torch-integrity WeightGuard: the on_mismatch handler raised")
