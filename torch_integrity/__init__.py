"""torch-integrity: prove that a model's weights are what its training run says.

Researchers add :class:`IntegrityCallback` to a Lightning ``Trainer``; verifiers call
:func:`replay`; auditors call :func:`verify_run`, :func:`rollback` and
:func:`check_weights`. Everything raises subclasses of :class:`IntegrityError`.

Names are imported lazily so that ``import torch_integrity`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # digests
    "Digest": "torch_integrity.digest",
    "StateDigest": "torch_integrity.digest",
    "digest_tensor": "torch_integrity.digest",
    "digest_state_dict": "torch_integrity.digest",
    # ledger and store
    "LedgerHead": "torch_integrity.ledger",
    "LedgerWriter": "torch_integrity.ledger",
    "verify_ledger": "torch_integrity.ledger",
    "read_records": "torch_integrity.ledger",
    "save_checkpoint": "torch_integrity.store",
    "load_checkpoint": "torch_integrity.store",
    "open_run": "torch_integrity.rundir",
    # capture, replay, audit
    "IntegrityCallback": "torch_integrity.capture",
    "replay": "torch_integrity.replay",
    "ReplayReport": "torch_integrity.replay",
    "verify_run": "torch_integrity.audit",
    "rollback": "torch_integrity.audit",
    "check_weights": "torch_integrity.audit",
    # deployment controls
    "WeightGuard": "torch_integrity.guard",
    "seal_run": "torch_integrity.signing",
    "check_seals": "torch_integrity.signing",
    "approve": "torch_integrity.approvals",
    "check_approvals": "torch_integrity.approvals",
    "attest": "torch_integrity.attest",
    "verify_attestation": "torch_integrity.attest",
    # training-data provenance
    "digest_sample": "torch_integrity.sample_digest",
    "build_manifest": "torch_integrity.manifest",
    "write_manifest": "torch_integrity.manifest",
    "load_manifest": "torch_integrity.manifest",
    "prove_inclusion": "torch_integrity.proofs",
    "verify_inclusion": "torch_integrity.proofs",
    "data_usage": "torch_integrity.lineage",
    # errors
    "IntegrityError": "torch_integrity.errors",
    "VerificationFailure": "torch_integrity.errors",
    "TamperedError": "torch_integrity.errors",
    "DigestMismatchError": "torch_integrity.errors",
    "TruncatedError": "torch_integrity.errors",
    "DivergenceError": "torch_integrity.errors",
    "ApprovalError": "torch_integrity.errors",
    "InputError": "torch_integrity.errors",
    "UsageError": "torch_integrity.errors",
    "MalformedFileError": "torch_integrity.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torch_integrity' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from torch_integrity.digest import Digest, StateDigest, digest_state_dict, digest_tensor
    from torch_integrity.errors import (
        ApprovalError,
        DigestMismatchError,
        DivergenceError,
        InputError,
        IntegrityError,
        MalformedFileError,
        TamperedError,
        TruncatedError,
        UsageError,
        VerificationFailure,
    )
    from torch_integrity.ledger import LedgerHead, LedgerWriter, read_records, verify_ledger
    from torch_integrity.rundir import open_run
    from torch_integrity.store import load_checkpoint, save_checkpoint
