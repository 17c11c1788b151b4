"""Approvals of model weights and the k-of-n policy that decides deployment.

An **approval** is a DSSE envelope (see :mod:`torch_integrity.signing`) of payload type
``application/vnd.torch-integrity.approval+json`` whose canonical JSON body says::

    {"format": "torch-integrity-approval-v1", "run_id": ..., "step": N,
     "model_digest": "sha256-merkle-v1:<hex>",      # Merkle root of the model state dict
     "file_digest": "sha256:<hex>",                 # the checkpoint file approved
     "ledger": {"count": ..., "hash": ...},         # ledger head when approving
     "key_id": "ed25519:...", "approved_at": "...Z", "expires_at": "...Z" | null,
     "reason": "..."}

:func:`approve` writes one to ``RUN_DIR/approvals/`` after verifying the ledger, the
checkpoint file and its weights. A **policy** (:mod:`torch_integrity.policy`) names the
keys allowed to approve and how many must agree.

:func:`check_approvals` passes only when at least ``threshold`` *distinct* policy keys
made valid, unexpired approvals of exactly this digest for this run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch_integrity.canonical import canonical_json, strict_loads
from torch_integrity.digest import STATE_ALGORITHM, Digest
from torch_integrity.dsse import Envelope, sign_envelope, verified_key_ids
from torch_integrity.errors import ApprovalError, IntegrityError, MalformedFileError, UsageError
from torch_integrity.fsutil import atomic_write_bytes
from torch_integrity.keys import PrivateKey
from torch_integrity.ledger import LedgerHead
from torch_integrity.policy import Policy, load_policy
from torch_integrity.rundir import open_run
from torch_integrity.signing import (
    ensure_folder,
    format_time,
    parse_time,
    safe_key_name,
    signed_files,
    utc_now,
    verified_model_state,
)

APPROVALS_DIR = "approvals"
APPROVAL_PAYLOAD_TYPE = "application/vnd.torch-integrity.approval+json"
APPROVAL_FORMAT = "torch-integrity-approval-v1"
MAX_REASON_CHARS = 4096
#: Approvals dated later than ``now`` by more than this are refused (clock skew allowance).
CLOCK_SKEW = dt.timedelta(minutes=5)
_DURATION = re.compile(r"([1-9][0-9]{0,5})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> dt.timedelta:
    """Parse ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``.

    Example:
        >>> parse_duration("12h")
        datetime.timedelta(seconds=43200)
    """
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise UsageError(f"not a duration: {text!r} (use e.g. 30d, 12h, 90m, 45s, 2w)")
    return dt.timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


@dataclass(frozen=True)
class Approval:
    """A signed statement that one key approves one model digest of one run.

    Attributes:
        run_id: the run.
        step: the checkpoint step approved.
        model_digest: ``sha256-merkle-v1`` root of the model state dict at that step.
        file_digest: SHA-256 of the checkpoint file.
        ledger: the ledger head when it was approved.
        key_id: the approver's key id.
        approved_at: when (UTC).
        expires_at: when it stops counting (``None``: never).
        reason: free text from the approver.
        path: the approval file, once written or read.
    """

    run_id: str
    step: int
    model_digest: Digest
    file_digest: Digest
    ledger: LedgerHead
    key_id: str
    approved_at: dt.datetime
    expires_at: dt.datetime | None
    reason: str
    path: Path | None = None

    def to_payload(self) -> dict[str, Any]:
        """The signed body."""
        return {
            "approved_at": format_time(self.approved_at),
            "expires_at": format_time(self.expires_at) if self.expires_at else None,
            "file_digest": str(self.file_digest),
            "format": APPROVAL_FORMAT,
            "key_id": self.key_id,
            "ledger": self.ledger.to_json(),
            "model_digest": str(self.model_digest),
            "reason": self.reason,
            "run_id": self.run_id,
            "step": self.step,
        }

    @classmethod
    def from_payload(cls, payload: bytes, *, path: Path | None, what: str) -> Approval:
        """Parse a body written by :meth:`to_payload`; MalformedFileError otherwise."""
        data = strict_loads(payload, what=what)
        if not isinstance(data, dict) or data.get("format") != APPROVAL_FORMAT:
            raise MalformedFileError(f"{what} is not a {APPROVAL_FORMAT} body")
        step = data.get("step")
        if type(step) is not int or step < 0:
            raise MalformedFileError(f"{what}: step must be a non-negative integer")
        for name in ("run_id", "key_id", "reason"):
            if not isinstance(data.get(name), str):
                raise MalformedFileError(f"{what}: {name} must be a string")
        expires = data.get("expires_at")
        return cls(
            run_id=data["run_id"],
            step=step,
            model_digest=Digest.parse(data.get("model_digest", "")),
            file_digest=Digest.parse(data.get("file_digest", "")),
            ledger=LedgerHead.from_json(data.get("ledger")),
            key_id=data["key_id"],
            approved_at=parse_time(data.get("approved_at"), what=f"{what} approved_at"),
            expires_at=None if expires is None else parse_time(expires, what=f"{what} expires_at"),
            reason=data["reason"],
            path=path,
        )


def approve(
    run_dir: Path | str,
    step: int,
    key: PrivateKey,
    *,
    expires: dt.timedelta | None = None,
    reason: str = "",
    now: dt.datetime | None = None,
) -> Approval:
    """Verify a checkpoint and sign an approval of its model digest.

    The ledger's chain, the checkpoint file's digest and the weights' Merkle root are
    all verified before anything is signed.

    Args:
        run_dir: the run directory.
        step: the checkpoint step to approve.
        key: the approver's private key.
        expires: how long the approval counts (default: no expiry).
        reason: free text kept in the signed body (at most 4096 characters).
        now: the approval time (default: now).

    Returns:
        The :class:`Approval`, ``path`` set to its file in ``RUN_DIR/approvals/``.

    Raises:
        UsageError: no checkpoint at ``step``, bad expiry or reason.
        VerificationFailure: the ledger, file or weights do not verify.

    Example:
        ``approve("runs/a", 100, load_private_key("alice"), expires=parse_duration("30d"))``
    """
    if type(step) is not int or step < 0:
        raise UsageError(f"step must be a non-negative integer, got {step!r}")
    if expires is not None and expires <= dt.timedelta(0):
        raise UsageError("an expiry must be in the future")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise UsageError(f"the reason must be text of at most {MAX_REASON_CHARS} characters")
    root = Path(run_dir)
    history = open_run(root)
    entry = history.checkpoint_at(step)
    verified_model_state(history, entry)  # the file's digest, then the weights' Merkle root
    moment = (now or utc_now()).replace(microsecond=0)
    approval = Approval(
        run_id=history.run_id,
        step=step,
        model_digest=entry.model.root,
        file_digest=entry.file_digest,
        ledger=history.head,
        key_id=key.key_id,
        approved_at=moment,
        expires_at=moment + expires if expires is not None else None,
        reason=reason,
    )
    envelope = sign_envelope(APPROVAL_PAYLOAD_TYPE, canonical_json(approval.to_payload()), key)
    folder = ensure_folder(root, APPROVALS_DIR)
    stamp = moment.strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{safe_key_name(key.key_id)}-step-{step:09d}-{stamp}-{secrets.token_hex(3)}.json"
    atomic_write_bytes(path, envelope.to_bytes())
    return dataclasses.replace(approval, path=path)


# --- checking --------------------------------------------------------------------------


@dataclass(frozen=True)
class ApprovalReport:
    """Outcome of :func:`check_approvals`.

    Attributes:
        run_id: the run.
        model_digest: the digest asked about.
        steps: the run's checkpoint steps whose model has that digest.
        threshold: k, from the policy.
        approvals: the approvals that counted (possibly several per key).
        rejected: ``(file, reason)`` for every approval file that did not count.
        names: key id -> the policy's name for it.
    """

    run_id: str
    model_digest: Digest
    steps: tuple[int, ...]
    threshold: int
    approvals: tuple[Approval, ...]
    rejected: tuple[tuple[str, str], ...]
    names: Mapping[str, str]

    @property
    def approved_by(self) -> tuple[str, ...]:
        """The distinct key ids that approved, sorted."""
        return tuple(sorted({a.key_id for a in self.approvals}))

    @property
    def satisfied(self) -> bool:
        """Whether at least ``threshold`` distinct keys approved."""
        return len(self.approved_by) >= self.threshold

    def to_json(self) -> dict[str, Any]:
        """Plain JSON form, for ``--json`` reports."""
        return {
            "run_id": self.run_id,
            "model_digest": str(self.model_digest),
            "steps": list(self.steps),
            "threshold": self.threshold,
            "satisfied": self.satisfied,
            "approved_by": [{"key_id": k, "name": self.names.get(k, k)} for k in self.approved_by],
            "approvals": [
                {
                    "file": f"{APPROVALS_DIR}/{a.path.name}" if a.path else None,
                    "key_id": a.key_id,
                    "step": a.step,
                    "approved_at": format_time(a.approved_at),
                    "expires_at": format_time(a.expires_at) if a.expires_at else None,
                    "reason": a.reason,
                }
                for a in self.approvals
            ],
            "rejected": [{"file": file, "reason": reason} for file, reason in self.rejected],
        }

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """One line per fact, for people."""
        who = ", ".join(f"{self.names.get(k, k)} ({k})" for k in self.approved_by) or "nobody"
        lines = [f"{len(self.approved_by)} of the required {self.threshold} distinct keys approved {self.model_digest}: {who}"]
        lines += [f"  not counted: {file}: {reason}" for file, reason in self.rejected]
        return "\n".join(lines)


def _judge(
    path: Path,
    policy: Policy,
    run_id: str,
    model_digest: Digest,
    steps_with_digest: Mapping[int, Digest],
    step: int | None,
    now: dt.datetime,
) -> Approval:
    """Return the approval in ``path`` if it counts; raise ``_Refused(reason)`` if not."""
    try:
        envelope = Envelope.read(path, what=f"approval {path.name}")
    except IntegrityError as exc:
        raise _Refused(f"unreadable: {exc}") from None
    signatures = verified_key_ids(envelope, policy.public_keys)
    if signatures.invalid and not signatures.valid:
        raise _Refused(f"the signature by {signatures.invalid[0]} does not verify (file altered after signing)")
    if not signatures.valid:
        raise _Refused(f"signed by no key of the policy (signatures name {list(signatures.unknown)})")
    if envelope.payload_type != APPROVAL_PAYLOAD_TYPE:
        raise _Refused(f"payload type {envelope.payload_type!r} is not an approval")
    try:
        approval = Approval.from_payload(envelope.payload, path=path, what=f"approval {path.name}")
    except MalformedFileError as exc:
        raise _Refused(f"signed body is not an approval: {exc}") from None
    if approval.key_id not in signatures.valid:
        raise _Refused(f"body names approver {approval.key_id}, but the valid signature is by {signatures.valid[0]}")
    if approval.run_id != run_id:
        raise _Refused(f"approves run {approval.run_id}, not this run ({run_id})")
    if approval.model_digest != model_digest:
        raise _Refused(f"approves {approval.model_digest} (step {approval.step}), not {model_digest}")
    if approval.step not in steps_with_digest:
        raise _Refused(f"says step {approval.step}, but this run has no checkpoint with that digest at that step")
    if step is not None and approval.step != step:
        raise _Refused(f"approves step {approval.step}, not step {step}")
    if approval.expires_at is not None and approval.expires_at <= now:
        raise _Refused(f"expired at {format_time(approval.expires_at)}")
    if approval.approved_at > now + CLOCK_SKEW:
        raise _Refused(f"dated {format_time(approval.approved_at)}, in the future")
    return approval


class _Refused(Exception):
    """An approval file that does not count, and why."""


def check_approvals(
    run_dir: Path | str,
    model_digest: Digest | str,
    policy_path: Path | str,
    *,
    step: int | None = None,
    now: dt.datetime | None = None,
) -> ApprovalReport:
    """Decide whether enough authorized keys approved these weights of this run.

    Contract (what ``torch-integrity check-weights FILE RUN_DIR --policy POLICY`` relies on;
    the caller first finds that FILE's weights equal a checkpoint of the run and passes
    that checkpoint's model Merkle root):

    1. The policy file is loaded and validated (distinct keys, ids matching keys).
    2. The run's ledger is verified and ``model_digest`` must be the model digest of at
       least one of its checkpoints.
    3. Each ``RUN_DIR/approvals/*.json`` counts only if: a policy key's signature over
       the DSSE PAE verifies; the payload type and body are an approval; the body's
       ``key_id`` is that signer; its run id is this run's; its model digest is exactly
       ``model_digest``; the ledger has a checkpoint with that digest at its step
       (and that step equals ``step`` when given); it has not expired at ``now``; it is
       not dated in the future. Files that do not count are listed in ``rejected``.
    4. Approvals are counted per distinct key: one key approving twice counts once.

    Args:
        run_dir: the run directory.
        model_digest: the ``sha256-merkle-v1`` root of the model state dict.
        policy_path: the policy JSON file.
        step: require approvals of this checkpoint step (default: any step whose
            checkpoint has this digest).
        now: the time expiry is judged at (default: now).

    Returns:
        An :class:`ApprovalReport` with ``satisfied`` true.

    Raises:
        ApprovalError: fewer than ``threshold`` distinct authorized keys approved, or the
            digest is not a checkpoint of this run (the message lists each file not
            counted and why).
        TamperedError, TruncatedError: the ledger does not verify.
        UsageError, MalformedFileError: a missing or invalid policy file or digest.
    """
    policy = load_policy(policy_path)
    wanted = Digest.parse(model_digest) if isinstance(model_digest, str) else model_digest
    if not isinstance(wanted, Digest) or wanted.algorithm != STATE_ALGORITHM:
        raise UsageError(f"model_digest must be a {STATE_ALGORITHM} digest, got {model_digest}")
    moment = now or utc_now()
    root = Path(run_dir)
    history = open_run(root)
    steps_with_digest = {c.step: c.model.root for c in history.unique_checkpoints() if c.model.root == wanted}
    if not steps_with_digest:
        raise ApprovalError(f"no checkpoint of run {history.run_id} has model digest {wanted}")
    counted: list[Approval] = []
    rejected: list[tuple[str, str]] = []
    for path in signed_files(root, APPROVALS_DIR):
        try:
            counted.append(_judge(path, policy, history.run_id, wanted, steps_with_digest, step, moment))
        except _Refused as refusal:
            rejected.append((f"{APPROVALS_DIR}/{path.name}", str(refusal)))
    report = ApprovalReport(
        run_id=history.run_id,
        model_digest=wanted,
        steps=tuple(sorted(steps_with_digest)),
        threshold=policy.threshold,
        approvals=tuple(counted),
        rejected=tuple(rejected),
        names={key_id: entry.name for key_id, entry in policy.keys.items()},
    )
    if not report.satisfied:
        raise ApprovalError(f"run {history.run_id}: approval policy not met.\n{report.summary()}")
    return report
