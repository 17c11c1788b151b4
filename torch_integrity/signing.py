"""Ledger seals, and the helpers every signed record shares (time, folders).

Everything torch-integrity signs is a DSSE envelope (:mod:`torch_integrity.dsse`)
whose body is canonical JSON (:mod:`torch_integrity.canonical`).

**Seals.** ``seal_run`` signs the ledger's current head (run id, record count, last
record hash, time, key id) and stores the envelope at
``RUN_DIR/seals/<key id>-<count>.json``. A ledger can always be truncated into a
shorter valid chain; a seal held by someone who trusts the public key turns that into
a detected failure: :func:`check_seals` requires the sealed head to still be a prefix
of the ledger. Keep a copy of the seal outside the run directory (or in a log) if the
run directory's owner might delete seal files: a deleted seal proves nothing.

Approvals live in :mod:`torch_integrity.approvals`; ``signing.check_approvals`` and the
other approval names are re-exported here for convenience.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torch_integrity.canonical import canonical_json, strict_loads
from torch_integrity.dsse import (
    Envelope,
    EnvelopeSignature,
    SignatureCheck,
    pae,
    sign_envelope,
    verified_key_ids,
)
from torch_integrity.errors import (
    ApprovalError,
    MalformedFileError,
    MissingFileError,
    TamperedError,
    TruncatedError,
    UnsafePathError,
    UsageError,
)
from torch_integrity.fsutil import atomic_write_bytes
from torch_integrity.keys import KeySource, PrivateKey, PublicKey, load_public_keys
from torch_integrity.ledger import LedgerHead, verify_ledger
from torch_integrity.rundir import CheckpointEntry, RunHistory, open_run

if TYPE_CHECKING:  # re-exported lazily below: approvals imports this module
    from torch_integrity.approvals import ApprovalReport, Policy, approve, check_approvals, load_policy

__all__ = [
    "SEALS_DIR", "SEAL_PAYLOAD_TYPE", "ApprovalReport", "Envelope", "EnvelopeSignature", "Policy", "Seal",
    "SealCheck", "SealReport", "SignatureCheck", "approve", "check_approvals", "check_seals", "load_policy",
    "pae", "seal_run", "sign_envelope", "verified_key_ids",
]

SEALS_DIR = "seals"
SEAL_PAYLOAD_TYPE = "application/vnd.torch-integrity.seal+json"
SEAL_FORMAT = "torch-integrity-seal-v1"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# --- time ------------------------------------------------------------------------------


def utc_now() -> dt.datetime:
    """The current time in UTC, to the second (the precision everything signed uses)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def format_time(moment: dt.datetime) -> str:
    """``2025-01-02T03:04:05Z`` (UTC; naive datetimes are refused)."""
    if moment.tzinfo is None:
        raise UsageError("times must be timezone-aware")
    return moment.astimezone(dt.UTC).strftime(TIME_FORMAT)


def parse_time(text: Any, *, what: str) -> dt.datetime:
    """Parse the form written by :func:`format_time`, strictly."""
    if not isinstance(text, str) or not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text):
        raise MalformedFileError(f"{what}: not a UTC time like 2025-01-02T03:04:05Z: {text!r}")
    try:
        return dt.datetime.strptime(text, TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        raise MalformedFileError(f"{what}: invalid time {text!r}") from None


def verified_model_state(history: RunHistory, entry: CheckpointEntry) -> dict[str, torch.Tensor]:
    """Load a checkpoint's model weights, verified before anything is signed about them.

    The whole file must match the SHA-256 the ledger recorded (so every byte, optimizer
    state included, is the recorded one) and the model state dict must have the recorded
    Merkle root. Works for checkpoints written by the capture callback (Lightning's
    ``state_dict`` key) and for plain ``{"model": state_dict}`` checkpoints.

    Raises:
        DigestMismatchError: the file or the weights differ from the ledger.
        TamperedError: the checkpoint holds no model state or belongs to another run.
    """
    return history.load_model_state(entry)


def safe_key_name(key_id: str) -> str:
    """A key id as a file-name part (``ed25519:ab..`` -> ``ed25519-ab..``)."""
    return key_id.replace(":", "-")


def ensure_folder(run_dir: Path, name: str) -> Path:
    """``run_dir/name``, created if missing; a symlink there is refused."""
    folder = run_dir / name
    if folder.is_symlink():
        raise UnsafePathError(f"{folder} is a symlink; refusing to write through it")
    folder.mkdir(exist_ok=True)
    return folder


def signed_files(run_dir: Path, name: str) -> list[Path]:
    """The ``*.json`` files of ``run_dir/name``, sorted; none if the folder is absent."""
    folder = run_dir / name
    if folder.is_symlink():
        raise UnsafePathError(f"{folder} is a symlink; run directories must hold real folders")
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith("."))


# --- seals -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seal:
    """A signed ledger head.

    Attributes:
        run_id: the run the ledger belongs to.
        head: the sealed head (record count and last record hash).
        sealed_at: when it was signed (UTC).
        key_id: the signer.
        path: the seal file.
    """

    run_id: str
    head: LedgerHead
    sealed_at: dt.datetime
    key_id: str
    path: Path | None = None

    def to_payload(self) -> dict[str, Any]:
        """The signed body."""
        return {
            "format": SEAL_FORMAT,
            "key_id": self.key_id,
            "ledger": self.head.to_json(),
            "run_id": self.run_id,
            "sealed_at": format_time(self.sealed_at),
        }

    @classmethod
    def from_payload(cls, payload: bytes, *, path: Path | None, what: str) -> Seal:
        """Parse a seal body; raises MalformedFileError if it is not one."""
        data = strict_loads(payload, what=what)
        if not isinstance(data, dict) or data.get("format") != SEAL_FORMAT:
            raise MalformedFileError(f"{what} is not a {SEAL_FORMAT} body")
        if not isinstance(data.get("run_id"), str) or not isinstance(data.get("key_id"), str):
            raise MalformedFileError(f"{what}: run_id and key_id must be strings")
        return cls(
            run_id=data["run_id"],
            head=LedgerHead.from_json(data.get("ledger")),
            sealed_at=parse_time(data.get("sealed_at"), what=what),
            key_id=data["key_id"],
            path=path,
        )


def seal_run(run_dir: Path | str, key: PrivateKey, *, now: dt.datetime | None = None) -> Seal:
    """Sign the run's current ledger head and store the seal in ``RUN_DIR/seals/``.

    The ledger is verified first, and so are this key's earlier seals of the run: a key
    never seals a ledger that lost records it sealed before.

    Args:
        run_dir: the run directory.
        key: the signing key.
        now: the time to record (default: the current time).

    Returns:
        The :class:`Seal`, with ``path`` set to ``seals/<key id>-<count>.json``.

    Raises:
        TamperedError, TruncatedError: the ledger does not verify (alone or against an
            earlier seal by this key).
    """
    root = Path(run_dir)
    history = open_run(root)
    own = {key.key_id: key.public}
    for path in signed_files(root, SEALS_DIR):
        _check_one_seal(path, own, history.run_id, history.ledger_path, verified={})
    moment = (now or utc_now()).replace(microsecond=0)
    seal = Seal(history.run_id, history.head, moment, key.key_id)
    envelope = sign_envelope(SEAL_PAYLOAD_TYPE, canonical_json(seal.to_payload()), key)
    folder = ensure_folder(root, SEALS_DIR)
    path = folder / f"{safe_key_name(key.key_id)}-{history.head.count}.json"
    atomic_write_bytes(path, envelope.to_bytes())
    return Seal(seal.run_id, seal.head, seal.sealed_at, seal.key_id, path)


@dataclass(frozen=True)
class SealCheck:
    """What one seal file turned out to be.

    Attributes:
        path: the seal file.
        key_ids: the key ids its signatures name.
        trusted: whether a trusted key's signature verified (and then the sealed head
            was found to be a prefix of the ledger).
        seal: the parsed seal when ``trusted`` (untrusted seals are not parsed).
    """

    path: Path
    key_ids: tuple[str, ...]
    trusted: bool
    seal: Seal | None


@dataclass(frozen=True)
class SealReport:
    """Outcome of :func:`check_seals`.

    Attributes:
        run_id: the run's id (from the verified ledger).
        head: the ledger's current head.
        checks: one entry per seal file looked at.
    """

    run_id: str
    head: LedgerHead
    checks: tuple[SealCheck, ...]

    @property
    def trusted(self) -> tuple[Seal, ...]:
        """The verified seals by trusted keys."""
        return tuple(c.seal for c in self.checks if c.trusted and c.seal is not None)

    @property
    def untrusted(self) -> tuple[SealCheck, ...]:
        """Seal files signed by no trusted key (ignored for the verdict)."""
        return tuple(c for c in self.checks if not c.trusted)

    @property
    def sealed_count(self) -> int:
        """The longest ledger prefix a trusted key sealed."""
        return max((s.head.count for s in self.trusted), default=0)

    @property
    def unsealed_records(self) -> int:
        """Records appended after the latest trusted seal (not protected from truncation)."""
        return self.head.count - self.sealed_count

    def to_json(self) -> dict[str, Any]:
        """Plain JSON form, for ``--json`` reports."""
        return {
            "run_id": self.run_id,
            "ledger": self.head.to_json(),
            "sealed_count": self.sealed_count,
            "unsealed_records": self.unsealed_records,
            "trusted": [
                {"file": str(s.path), "key_id": s.key_id, "sealed_at": format_time(s.sealed_at), "ledger": s.head.to_json()}
                for s in self.trusted
            ],
            "untrusted": [{"file": str(c.path), "key_ids": list(c.key_ids)} for c in self.untrusted],
        }

    def __str__(self) -> str:
        signers = sorted({s.key_id for s in self.trusted})
        text = f"{len(self.trusted)} trusted seal(s) by {', '.join(signers)}; sealed {self.sealed_count} of {self.head.count} records"
        if self.unsealed_records:
            text += f" ({self.unsealed_records} appended after the newest seal are not protected by it)"
        if self.untrusted:
            text += f"; {len(self.untrusted)} seal(s) by untrusted keys ignored"
        return text


def _check_one_seal(
    path: Path,
    trusted: Mapping[str, PublicKey],
    run_id: str,
    ledger_path: Path,
    *,
    verified: dict[LedgerHead, None],
) -> SealCheck:
    """Check one seal file; raise if a trusted seal is broken or the ledger lost records."""
    what = f"seal {path}"
    try:
        envelope = Envelope.read(path, what=what)
    except (MalformedFileError, UnsafePathError, MissingFileError) as exc:
        raise TamperedError(f"{what} cannot be read as a signed seal: {exc}") from None
    signatures = verified_key_ids(envelope, trusted)
    named = tuple(dict.fromkeys(s.keyid for s in envelope.signatures))
    if signatures.invalid:
        raise TamperedError(
            f"{what}: the signature by trusted key {signatures.invalid[0]} does not verify; "
            "the seal was altered after signing"
        )
    if not signatures.valid:
        return SealCheck(path, named, False, None)
    signer = signatures.valid[0]
    if envelope.payload_type != SEAL_PAYLOAD_TYPE:
        raise TamperedError(f"{what}: payload type is {envelope.payload_type!r}, not {SEAL_PAYLOAD_TYPE!r}")
    try:
        seal = Seal.from_payload(envelope.payload, path=path, what=what)
    except MalformedFileError as exc:
        raise TamperedError(f"{what}: signed by {signer}, but its body is not a seal: {exc}") from None
    if seal.key_id not in signatures.valid:
        raise TamperedError(f"{what}: body names signer {seal.key_id}, but it was signed by {signer}")
    if seal.run_id != run_id:
        raise TamperedError(f"{what}: sealed run {seal.run_id}, but the ledger belongs to run {run_id}")
    if seal.head not in verified:
        context = f"(sealed by {seal.key_id} at {format_time(seal.sealed_at)}: {seal.head})"
        try:
            verify_ledger(ledger_path, head=seal.head)
        except TruncatedError as exc:
            raise TruncatedError(f"{exc} {context}") from None
        except TamperedError as exc:
            raise TamperedError(f"{exc} {context}") from None
        verified[seal.head] = None
    return SealCheck(path, named, True, seal)


def check_seals(
    run_dir: Path | str,
    trusted_public_keys: KeySource | Iterable[KeySource],
    *,
    extra_seals: Iterable[Path | str] = (),
) -> SealReport:
    """Check a run's ledger against its seals by trusted keys.

    Contract (what ``torch-integrity verify RUN_DIR --trusted-key PUB ...`` relies on):

    1. The ledger's hash chain is verified (:func:`torch_integrity.rundir.open_run`).
    2. Every ``RUN_DIR/seals/*.json`` (plus ``extra_seals``, e.g. copies kept elsewhere)
       is read. A seal that no trusted key signed is reported in ``report.untrusted``
       and otherwise ignored. A seal naming a trusted key must verify, must be a
       well-formed seal of this run id, and its sealed head must still be a prefix of
       the ledger (same hash at the sealed record count).
    3. At least one trusted seal must exist.

    Records appended after the newest trusted seal are legitimate but unprotected;
    ``report.unsealed_records`` counts them so callers can say so.

    Args:
        run_dir: the run directory.
        trusted_public_keys: :class:`~torch_integrity.keys.PublicKey` objects and/or
            paths of public key files (``NAME.pub``, PEM or base64 of the raw key).
        extra_seals: more seal files to check, kept outside the run directory.

    Returns:
        A :class:`SealReport`.

    Raises:
        TruncatedError: the ledger has fewer records than a trusted seal recorded.
        TamperedError: the ledger was rewritten (hash at the sealed count differs), the
            chain is broken, or a seal naming a trusted key is altered, unreadable, of
            another type or of another run.
        ApprovalError: no seal by a trusted key (none at all, or only untrusted ones).
        UsageError, MalformedFileError: no trusted keys given, unreadable key files
            (exit code 2 on the CLI).
    """
    root = Path(run_dir)
    trusted = load_public_keys(trusted_public_keys)
    history = open_run(root)
    verified: dict[LedgerHead, None] = {history.head: None}
    extra = [Path(p) for p in extra_seals]
    for path in extra:
        if not path.is_file():
            raise UsageError(f"seal file {path} (given as an extra seal) does not exist")
    paths = [*signed_files(root, SEALS_DIR), *extra]
    checks = tuple(_check_one_seal(p, trusted, history.run_id, history.ledger_path, verified=verified) for p in paths)
    report = SealReport(history.run_id, history.head, checks)
    if not report.trusted:
        if not checks:
            raise ApprovalError(f"{root} has no seals; nothing protects its ledger from truncation")
        others = sorted({k for c in checks for k in c.key_ids})
        raise ApprovalError(
            f"{root}: none of its {len(checks)} seal(s) is signed by a trusted key "
            f"(trusted: {sorted(trusted)}; found: {others})"
        )
    return report


_APPROVAL_EXPORTS = frozenset({"ApprovalReport", "Policy", "approve", "check_approvals", "load_policy"})


def __getattr__(name: str) -> Any:
    """``signing.check_approvals`` and friends live in :mod:`torch_integrity.approvals`."""
    if name in _APPROVAL_EXPORTS:
        from torch_integrity import approvals

        return getattr(approvals, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
