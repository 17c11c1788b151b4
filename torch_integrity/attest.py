"""Training-provenance attestations: an in-toto Statement v1 in a signed DSSE envelope.

``torch-integrity attest RUN_DIR --step N --key KEY --out FILE`` writes::

    {"payloadType": "application/vnd.in-toto+json",
     "payload": base64(canonical JSON of the Statement),
     "signatures": [{"keyid": "ed25519:...", "sig": base64(Ed25519(PAE(type, payload)))}]}

The Statement (https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md)::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [
       {"name": "<run id>/step-<N>/model",
        "digest": {"sha256": "<hex of the sha256-merkle-v1 root of the model state dict>"},
        "annotations": {"torch-integrity.dev/digest-algorithm": "sha256-merkle-v1"}},
       {"name": "checkpoints/step-<N>.safetensors", "digest": {"sha256": "<hex of the file>"}}],
     "predicateType": "https://torch-integrity.dev/provenance/training/v1",
     "predicate": {...}}

**The first subject's ``sha256`` is not a file hash.** It is the value of the model's
``sha256-merkle-v1`` digest: an RFC 6962 Merkle root over the ``sha256-tensor-v1``
digests of the state dict's tensors (name, dtype, shape and raw bytes of each), so it
identifies the *weights* whatever file format carries them; ``torch-integrity
check-weights`` computes it for any weights file. The second subject is an ordinary
file hash of the checkpoint in the run directory. The predicate is documented field
by field in ``docs/signing.md`` and built by :func:`build_statement`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch_integrity import __version__, merkle
from torch_integrity.batch import BATCH_ALGORITHM
from torch_integrity.canonical import canonical_json, strict_loads
from torch_integrity.digest import BYTES_ALGORITHM, STATE_ALGORITHM, Digest
from torch_integrity.dsse import Envelope, sign_envelope, verified_key_ids
from torch_integrity.errors import (
    ApprovalError,
    DigestMismatchError,
    IntegrityError,
    MalformedFileError,
    MissingFileError,
    TamperedError,
    UnsafePathError,
    UsageError,
)
from torch_integrity.fsutil import atomic_write_bytes, read_file_bytes
from torch_integrity.keys import KeySource, PrivateKey, load_public_keys
from torch_integrity.ledger import LedgerHead
from torch_integrity.rundir import RunHistory, open_run
from torch_integrity.signing import (
    format_time,
    signed_files,
    utc_now,
    verified_model_state,
)

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "https://torch-integrity.dev/provenance/training/v1"
DIGEST_ANNOTATION = "torch-integrity.dev/digest-algorithm"
LEDGER_ALGORITHM = "torch-integrity-ledger-v1"
REPLAYS_DIR = "replays"
MAX_REPLAY_FILES = 1000
_MAX_SUMMARY_FIELDS = 32
_MAX_SUMMARY_TEXT = 500


# --- building --------------------------------------------------------------------------


def _batch_digests(body: Mapping[str, Any], algorithm: str) -> tuple[list[bytes], int]:
    """The batch digests a step record's ``data`` field holds (one, or one per micro-batch).

    Capture writes bare hex named by ``run_start.digests.data``; ``<algorithm>:<hex>``
    strings are read too. Returns the raw digests and how many entries were not
    secure digests (never counted as evidence).
    """
    value = body.get("data")
    items = value if isinstance(value, list) else [value]
    found: list[bytes] = []
    rejected = 0
    for item in items:
        if item is None:
            continue
        text = item if isinstance(item, str) and ":" in item else f"{algorithm}:{item}"
        try:
            found.append(Digest.parse(text).raw)
        except MalformedFileError:
            rejected += 1
    return found, rejected


def _data_section(history: RunHistory, before_seq: int) -> dict[str, Any]:
    """Commit to every batch digest recorded before the checkpoint, in ledger order."""
    declared = history.start[0].get("digests")
    algorithm = declared.get("data") if isinstance(declared, dict) else None
    algorithm = algorithm if isinstance(algorithm, str) else BATCH_ALGORITHM
    leaves: list[bytes] = []
    steps = rejected = 0
    for record in history.iter_steps():
        if record.seq >= before_seq:
            break
        steps += 1
        found, bad = _batch_digests(record.body, algorithm)
        leaves += found
        rejected += bad
    return {
        "batchDigestAlgorithm": algorithm if leaves else None,
        "batchDigests": len(leaves),
        "batchDigestsMerkleRoot": merkle.merkle_root(leaves).hex() if leaves else None,
        "stepRecords": steps,
        "unrecognizedBatchDigests": rejected,
    }


def _summary(data: Any) -> dict[str, Any]:
    """The top-level scalar fields of a replay report (its verdict, whatever it is named)."""
    if not isinstance(data, dict):
        return {}
    summary: dict[str, Any] = {}
    for name in sorted(data)[:_MAX_SUMMARY_FIELDS]:
        value = data[name]
        if isinstance(value, str):
            summary[name] = value[:_MAX_SUMMARY_TEXT]
        elif value is None or isinstance(value, bool | int):
            summary[name] = value
    return summary


def _replays_section(run_dir: Path) -> list[dict[str, Any]]:
    """Digest and summary of each ``RUN_DIR/replays/*.json`` (none is fine)."""
    entries: list[dict[str, Any]] = []
    for path in signed_files(run_dir, REPLAYS_DIR)[:MAX_REPLAY_FILES]:
        relative = f"{REPLAYS_DIR}/{path.name}"
        try:
            buffer = read_file_bytes(path, max_bytes=64 << 20)
        except IntegrityError as exc:
            entries.append({"file": relative, "error": str(exc)})
            continue
        entry: dict[str, Any] = {"file": relative, "digest": f"{BYTES_ALGORITHM}:{hashlib.sha256(buffer).hexdigest()}"}
        try:
            entry["summary"] = _summary(strict_loads(bytes(buffer), what=relative))
        except MalformedFileError as exc:
            entry["error"] = str(exc)
        entries.append(entry)
    return entries


def build_statement(run_dir: Path | str, step: int, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Verify a checkpoint and build the in-toto Statement describing how it was trained.

    The ledger's chain, the checkpoint file and its weights are verified first.

    Args:
        run_dir: the run directory.
        step: the checkpoint step.
        now: the attestation time (default: now).

    Returns:
        The Statement as a JSON-ready dict.

    Raises:
        UsageError: no checkpoint at ``step``.
        VerificationFailure: the ledger, file or weights do not verify.
    """
    root = Path(run_dir)
    history = open_run(root)
    entry = history.checkpoint_at(step)
    verified_model_state(history, entry)  # the file's digest, then the weights' Merkle root
    first, *resumes = history.start
    settings = {k: v for k, v in first.items() if k not in ("format", "run_id")}
    predicate = {
        "attestedAt": format_time((now or utc_now()).replace(microsecond=0)),
        "builder": {"id": "https://torch-integrity.dev/torch-integrity", "version": __version__},
        "checkpoint": {
            "file": entry.path,
            "fileDigest": str(entry.file_digest),
            "ledgerSeq": entry.seq,
            "modelDigest": str(entry.model.root),
            "modelTensors": len(entry.model.tensors),
            "optimizerDigest": str(entry.optimizer.root),
            "step": entry.step,
        },
        "data": _data_section(history, entry.seq),
        "ledger": {"algorithm": LEDGER_ALGORITHM, **history.head.to_json(), "finished": history.finished},
        "replays": _replays_section(root),
        "resumes": [{k: v for k, v in body.items() if k not in ("format", "run_id")} for body in resumes],
        "run": {"format": first.get("format"), "id": history.run_id},
        "settings": settings,
    }
    return {
        "_type": STATEMENT_TYPE,
        "predicate": predicate,
        "predicateType": PREDICATE_TYPE,
        "subject": [
            {
                "annotations": {DIGEST_ANNOTATION: STATE_ALGORITHM},
                "digest": {"sha256": entry.model.root.hex},
                "name": f"{history.run_id}/step-{entry.step}/model",
            },
            {"digest": {"sha256": entry.file_digest.hex}, "name": entry.path},
        ],
    }


def attest(
    run_dir: Path | str,
    step: int,
    key: PrivateKey,
    *,
    out: Path | str | None = None,
    now: dt.datetime | None = None,
) -> Envelope:
    """Build, sign and (with ``out``) atomically write a provenance attestation.

    Args:
        run_dir: the run directory.
        step: the checkpoint step attested.
        key: the signing key.
        out: where to write the DSSE envelope (replaced atomically if it exists).
        now: the attestation time.

    Returns:
        The signed :class:`~torch_integrity.signing.Envelope`.

    Example:
        ``attest("runs/a", 100, load_private_key("ci-key"), out="model.intoto.json")``
    """
    statement = build_statement(run_dir, step, now=now)
    envelope = sign_envelope(IN_TOTO_PAYLOAD_TYPE, canonical_json(statement), key)
    if out is not None:
        destination = Path(out)
        if not destination.parent.is_dir():
            raise UsageError(f"{destination.parent} is not a directory")
        atomic_write_bytes(destination, envelope.to_bytes())
    return envelope


# --- verifying -------------------------------------------------------------------------


@dataclass(frozen=True)
class AttestationReport:
    """What :func:`verify_attestation` established.

    Attributes:
        key_ids: trusted keys whose signatures verified.
        statement: the verified Statement.
        run_id: the run the predicate names.
        step: the checkpoint step.
        model_digest: the model's ``sha256-merkle-v1`` digest (the first subject).
        ledger: the ledger head the attestation recorded.
        run_checked: whether it was also checked against a run directory.
    """

    key_ids: tuple[str, ...]
    statement: Mapping[str, Any]
    run_id: str
    step: int
    model_digest: Digest
    ledger: LedgerHead
    run_checked: bool


def _refuse(message: str) -> ApprovalError:
    return ApprovalError(f"attestation refused: {message}")


def _parse_statement(payload: bytes) -> tuple[dict[str, Any], str, int, Digest, Digest, LedgerHead]:
    """Check the Statement's shape; return it and the fields verification uses."""
    try:
        statement = strict_loads(payload, what="attestation payload")
    except MalformedFileError as exc:
        raise _refuse(f"signed payload is not JSON: {exc}") from None
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise _refuse(f"payload is not an in-toto Statement v1 (_type must be {STATEMENT_TYPE})")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise _refuse(f"predicateType is {statement.get('predicateType')!r}, not {PREDICATE_TYPE}")
    subjects, predicate = statement.get("subject"), statement.get("predicate")
    if not isinstance(subjects, list) or not subjects or not isinstance(predicate, dict):
        raise _refuse("a Statement needs a non-empty subject list and a predicate object")
    try:
        checkpoint, run = predicate["checkpoint"], predicate["run"]
        step, run_id = checkpoint["step"], run["id"]
        model = Digest.parse(checkpoint["modelDigest"])
        file_digest = Digest.parse(checkpoint["fileDigest"])
        ledger = LedgerHead.from_json({"count": predicate["ledger"]["count"], "hash": predicate["ledger"]["hash"]})
        if type(step) is not int or not isinstance(run_id, str) or model.algorithm != STATE_ALGORITHM:
            raise TypeError
    except (KeyError, TypeError, MalformedFileError):
        raise _refuse("the predicate lacks a well-formed run id, checkpoint step, model digest or ledger head") from None
    digests = [s.get("digest") for s in subjects if isinstance(s, dict)]
    if not any(isinstance(d, dict) and d.get("sha256") == model.hex for d in digests):
        raise _refuse(f"no subject carries the model digest {model} that the predicate names")
    return statement, run_id, step, model, file_digest, ledger


def verify_attestation(
    source: Path | str | Mapping[str, Any],
    trusted_public_keys: KeySource | Iterable[KeySource],
    *,
    run_dir: Path | str | None = None,
) -> AttestationReport:
    """Verify a provenance attestation, and optionally that it matches a run directory.

    Checks, in order: the envelope parses; at least one signature by a trusted key
    verifies over ``PAE(payloadType, payload)``; the payload type is in-toto's; the
    payload is a Statement v1 with this project's predicate type, and a subject carries
    the predicate's model digest. With ``run_dir``: the ledger still contains the
    attested head as a prefix, its run id is the predicate's, and the checkpoint at the
    attested step has exactly the attested model and file digests, with the file and
    its weights verified.

    Args:
        source: the envelope file, or the parsed envelope JSON.
        trusted_public_keys: public keys and/or paths of public key files.
        run_dir: a run directory to check the attestation against.

    Returns:
        An :class:`AttestationReport`.

    Raises:
        TamperedError: a trusted key's signature does not verify (payload or payload
            type altered), or the run's ledger was rewritten.
        ApprovalError: no trusted signature, wrong payload type, not a Statement of our
            predicate type, or it names another run.
        DigestMismatchError: the run's checkpoint differs from the attested digests.
        TruncatedError: the run's ledger is shorter than the attested head.
        UsageError, MalformedFileError: unreadable file or keys (exit code 2).
    """
    trusted = load_public_keys(trusted_public_keys)
    if isinstance(source, Mapping):
        envelope = Envelope.from_json(dict(source), what="attestation")
    else:
        try:
            envelope = Envelope.read(Path(source), what=f"attestation {source}")
        except (MissingFileError, UnsafePathError) as exc:
            raise UsageError(f"cannot read the attestation: {exc}") from None
    signatures = verified_key_ids(envelope, trusted)
    if not signatures.valid:
        if signatures.invalid:
            raise TamperedError(
                f"attestation: the signature by trusted key {signatures.invalid[0]} does not verify; "
                "its payload or payload type was changed after signing"
            )
        raise _refuse(f"not signed by a trusted key (trusted: {sorted(trusted)}; signed by: {list(signatures.unknown)})")
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise _refuse(f"payload type is {envelope.payload_type!r}, not {IN_TOTO_PAYLOAD_TYPE!r}")
    statement, run_id, step, model, file_digest, ledger = _parse_statement(envelope.payload)
    if run_dir is not None:
        history = open_run(Path(run_dir), head=ledger)
        if history.run_id != run_id:
            raise _refuse(f"it attests run {run_id}, but {run_dir} holds run {history.run_id}")
        try:
            entry = history.checkpoint_at(step)
        except UsageError:
            raise _refuse(f"it attests step {step}, but run {run_id} has no checkpoint at that step") from None
        if entry.model.root != model:
            raise DigestMismatchError(f"model at step {step} of run {run_id}", model, entry.model.root)
        if entry.file_digest != file_digest:
            raise DigestMismatchError(f"checkpoint file {entry.path}", file_digest, entry.file_digest)
        verified_model_state(history, entry)
    return AttestationReport(signatures.valid, statement, run_id, step, model, ledger, run_dir is not None)
