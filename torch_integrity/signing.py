"""Signed envelopes (DSSE) and ledger seals.

**Envelopes.** Everything torch-integrity signs (seals, approvals, attestations) is a
DSSE envelope (https://github.com/secure-systems-lab/dsse)::

    {"payload": "<base64 body>", "payloadType": "<type>",
     "signatures": [{"keyid": "<key id>", "sig": "<base64 Ed25519 signature>"}]}

The signature covers the pre-authentication encoding (:func:`pae`)::

    "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

(SP a space, LEN the byte length in ASCII decimal), so the payload type is signed
too: a seal can never be passed off as an approval or an attestation. Bodies written
here are canonical JSON (:mod:`torch_integrity.canonical`).

**Seals.** ``seal_run`` signs the ledger's current head (run id, record count, last
record hash, time, key id) and stores the envelope at
``RUN_DIR/seals/<key id>-<count>.json``. A ledger can always be truncated into a
shorter valid chain; a seal held by someone who trusts the public key turns that into
a detected failure: :func:`check_seals` requires the sealed head to still be a prefix
of the ledger. Keep a copy of the seal outside the run directory (or in a log) if the
run directory's owner might delete seal files: a deleted seal proves nothing.

Example:
    >>> pae("application/example", b"hello")
    b'DSSEv1 19 application/example 5 hello'
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch_integrity.canonical import canonical_json, strict_loads
from torch_integrity.errors import (
    ApprovalError,
    MalformedFileError,
    MissingFileError,
    TamperedError,
    TruncatedError,
    UnsafePathError,
    UsageError,
)
from torch_integrity.fsutil import atomic_write_bytes, read_file_bytes
from torch_integrity.keys import KeySource, PrivateKey, PublicKey, load_public_keys
from torch_integrity.ledger import LedgerHead, verify_ledger
from torch_integrity.rundir import open_run

SEALS_DIR = "seals"
SEAL_PAYLOAD_TYPE = "application/vnd.torch-integrity.seal+json"
SEAL_FORMAT = "torch-integrity-seal-v1"
MAX_ENVELOPE_BYTES = 16 << 20
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


# --- DSSE envelopes --------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the exact bytes a signature covers.

    Args:
        payload_type: the envelope's ``payloadType`` (its UTF-8 bytes are counted).
        payload: the serialized body.

    Returns:
        ``b"DSSEv1 " + LEN(type) + b" " + type + b" " + LEN(body) + b" " + body``.
    """
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), bytes(payload))


def _b64decode(text: Any, *, what: str) -> bytes:
    """Standard or URL-safe base64 (DSSE allows both), padding optional."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9+/_-]*={0,2}", text):
        raise MalformedFileError(f"{what} is not base64")
    normal = text.replace("-", "+").replace("_", "/").rstrip("=")
    try:
        return base64.b64decode(normal + "=" * (-len(normal) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedFileError(f"{what} is not valid base64") from None


@dataclass(frozen=True)
class EnvelopeSignature:
    """One DSSE signature: ``keyid`` (may be empty) and the raw signature bytes."""

    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope.

    Attributes:
        payload_type: ``payloadType``.
        payload: the decoded body bytes.
        signatures: every signature, in file order.
    """

    payload_type: str
    payload: bytes
    signatures: tuple[EnvelopeSignature, ...]

    def to_json(self) -> dict[str, Any]:
        """The JSON envelope (standard base64)."""
        return {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in self.signatures
            ],
        }

    def to_bytes(self) -> bytes:
        """The file form: indented JSON with sorted keys and a final newline."""
        import json

        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: Any, *, what: str) -> Envelope:
        """Parse a JSON envelope (unknown fields are ignored, as DSSE requires).

        Raises:
            MalformedFileError: a required field is missing or mistyped.
        """
        if not isinstance(data, dict):
            raise MalformedFileError(f"{what} is not a DSSE envelope (not a JSON object)")
        payload_type = data.get("payloadType")
        signatures = data.get("signatures")
        if not isinstance(payload_type, str) or "payload" not in data or not isinstance(signatures, list):
            raise MalformedFileError(f"{what} is not a DSSE envelope (needs payload, payloadType, signatures)")
        parsed = []
        for index, entry in enumerate(signatures):
            if not isinstance(entry, dict) or "sig" not in entry:
                raise MalformedFileError(f"{what}: signature {index} has no sig")
            keyid = entry.get("keyid") or ""
            if not isinstance(keyid, str):
                raise MalformedFileError(f"{what}: signature {index} has a non-string keyid")
            parsed.append(EnvelopeSignature(keyid, _b64decode(entry["sig"], what=f"{what} signature {index}")))
        payload = _b64decode(data["payload"], what=f"{what} payload")
        return cls(payload_type, payload, tuple(parsed))

    @classmethod
    def read(cls, path: Path, *, what: str | None = None) -> Envelope:
        """Read and parse an envelope file (at most 16 MiB, no symlinks)."""
        buffer = read_file_bytes(path, max_bytes=MAX_ENVELOPE_BYTES)
        label = what or str(path)
        return cls.from_json(strict_loads(bytes(buffer), what=label), what=label)


def sign_envelope(payload_type: str, payload: bytes, keys: PrivateKey | Sequence[PrivateKey]) -> Envelope:
    """Sign ``PAE(payload_type, payload)`` with each key.

    Example:
        >>> key = PrivateKey.generate()
        >>> envelope = sign_envelope("text/plain", b"x", key)
        >>> verified_key_ids(envelope, {key.key_id: key.public}).valid == (key.key_id,)
        True
    """
    signers = [keys] if isinstance(keys, PrivateKey) else list(keys)
    if not signers:
        raise UsageError("an envelope needs at least one signing key")
    message = pae(payload_type, payload)
    return Envelope(payload_type, bytes(payload), tuple(EnvelopeSignature(k.key_id, k.sign(message)) for k in signers))


@dataclass(frozen=True)
class SignatureCheck:
    """Which signatures of an envelope verified under the trusted keys.

    Attributes:
        valid: key ids of trusted keys whose signature verifies (each once).
        invalid: key ids of trusted keys named by a signature that does NOT verify
            (the payload or its type was changed after signing, or the signature was).
        unknown: key ids named by signatures from keys that are not trusted.
    """

    valid: tuple[str, ...]
    invalid: tuple[str, ...]
    unknown: tuple[str, ...]


def verified_key_ids(envelope: Envelope, trusted: Mapping[str, PublicKey]) -> SignatureCheck:
    """Check every signature of ``envelope`` against the trusted keys.

    A signature with an empty keyid is tried against every trusted key; one that
    matches none is counted as unknown (it cannot be told from a stranger's).
    """
    message = pae(envelope.payload_type, envelope.payload)
    valid: list[str] = []
    invalid: list[str] = []
    unknown: list[str] = []
    for signature in envelope.signatures:
        if signature.keyid:
            key = trusted.get(signature.keyid)
            if key is None:
                unknown.append(signature.keyid)
            elif key.verify(signature.sig, message):
                valid.append(key.key_id)
            else:
                invalid.append(key.key_id)
            continue
        matches = [k.key_id for k in trusted.values() if k.verify(signature.sig, message)]
        (valid if matches else unknown).extend(matches or ["(no keyid)"])
    return SignatureCheck(tuple(dict.fromkeys(valid)), tuple(dict.fromkeys(invalid)), tuple(dict.fromkeys(unknown)))


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
    paths = [*signed_files(root, SEALS_DIR), *(Path(p) for p in extra_seals)]
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
