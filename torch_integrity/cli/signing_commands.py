"""Commands for deployment controls: keygen, seal, approve, attest, verify-attestation.

Each handler calls the public API (:mod:`torch_integrity.keys`, ``signing``,
``approvals``, ``attest``) and returns an exit code; errors are turned into exit codes
in one place, :func:`torch_integrity.cli.main`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch_integrity.errors import UsageError

if TYPE_CHECKING:
    from torch_integrity.keys import PrivateKey

_PASSPHRASE_HELP = (
    "name of an environment variable holding the private key's passphrase "
    "(keys are unencrypted when this is not given)"
)


def _passphrase(args: argparse.Namespace) -> bytes | None:
    name = getattr(args, "passphrase_env", None)
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise UsageError(f"environment variable {name} (--passphrase-env) is not set or empty")
    return value.encode("utf-8")


def _load_key(args: argparse.Namespace) -> PrivateKey:
    from torch_integrity.keys import load_private_key

    return load_private_key(Path(args.key), passphrase=_passphrase(args))


def _keygen(args: argparse.Namespace) -> int:
    from torch_integrity.keys import generate_key_files

    public = generate_key_files(Path(args.out), passphrase=_passphrase(args))
    print(public.key_id)
    entry = {"id": public.key_id, "name": Path(args.out).name, "public_key": public.base64}
    print(
        f"wrote private key {args.out} (mode 0600) and public key {args.out}.pub\n"
        f"policy file entry: {json.dumps(entry)}",
        file=sys.stderr,
    )
    return 0


def _seal(args: argparse.Namespace) -> int:
    from torch_integrity.signing import seal_run

    seal = seal_run(Path(args.run_dir), _load_key(args))
    print(f"sealed run {seal.run_id} at {seal.head} with {seal.key_id}: {seal.path}")
    return 0


def _approve(args: argparse.Namespace) -> int:
    from torch_integrity.approvals import approve, parse_duration
    from torch_integrity.signing import format_time

    expires = parse_duration(args.expires) if args.expires else None
    approval = approve(Path(args.run_dir), args.step, _load_key(args), expires=expires, reason=args.reason)
    until = f"expires {format_time(approval.expires_at)}" if approval.expires_at else "no expiry"
    print(
        f"approved {approval.model_digest} (run {approval.run_id}, step {approval.step}) "
        f"as {approval.key_id}, {until}: {approval.path}"
    )
    return 0


def _attest(args: argparse.Namespace) -> int:
    from torch_integrity.attest import attest

    envelope = attest(Path(args.run_dir), args.step, _load_key(args), out=Path(args.out))
    print(f"wrote in-toto attestation for step {args.step} signed by {envelope.signatures[0].keyid}: {args.out}")
    return 0


def _verify_attestation(args: argparse.Namespace) -> int:
    from torch_integrity.attest import verify_attestation

    report = verify_attestation(
        Path(args.file), [Path(k) for k in args.trusted_key], run_dir=Path(args.run_dir) if args.run_dir else None
    )
    checked = f"; matches the checkpoint in {args.run_dir}" if report.run_checked else ""
    print(
        f"OK: attestation of run {report.run_id} step {report.step}, model {report.model_digest}, "
        f"signed by {', '.join(report.key_ids)}{checked}"
    )
    return 0


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", required=True, metavar="KEY", help="private key file written by `keygen`")
    parser.add_argument("--passphrase-env", metavar="VAR", help=_PASSPHRASE_HELP)


def register(commands: Any) -> None:
    """Add keygen, seal, approve, attest and verify-attestation to ``commands``."""
    p = commands.add_parser(
        "keygen",
        help="create an Ed25519 key pair for seals, approvals and attestations",
        description=(
            "Create an Ed25519 key pair: the private key NAME (PEM PKCS#8, mode 0600 from the start) "
            "and the public key NAME.pub beside it. Existing files are never overwritten. Prints the "
            "key id (ed25519: + 32 hex digits of SHA-256 of the raw public key) on standard output, "
            "and a ready-made policy file entry on standard error."
        ),
    )
    p.add_argument("--out", required=True, metavar="NAME", help="path of the private key file to create")
    p.add_argument("--passphrase-env", metavar="VAR", help="encrypt the private key with the passphrase in this environment variable")
    p.set_defaults(handler=_keygen)

    p = commands.add_parser(
        "seal",
        help="sign the run's ledger head so later truncation or rewriting is detected",
        description=(
            "Verify RUN_DIR's ledger and sign its current head (run id, record count, last record hash, "
            "time, key id). The seal is stored atomically as RUN_DIR/seals/<key id>-<count>.json. "
            "`torch-integrity verify RUN_DIR --trusted-key KEY.pub` then fails if records sealed here "
            "are removed or changed. Exit codes: 0 sealed, 1 the ledger does not verify, 2 usage error."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    _key_options(p)
    p.set_defaults(handler=_seal)

    p = commands.add_parser(
        "approve",
        help="sign an approval of the model weights at one checkpoint",
        description=(
            "Verify RUN_DIR's ledger, the checkpoint file at --step and its weights, then sign an "
            "approval of the model's Merkle-root digest (run id, step, digest, signer, time, expiry, "
            "reason), stored atomically in RUN_DIR/approvals/. A policy (see docs/signing.md) decides "
            "how many distinct approvers a deployment needs. Exit codes: 0 approved, 1 verification "
            "failed, 2 usage error."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--step", required=True, type=_non_negative, metavar="N", help="checkpoint step to approve")
    _key_options(p)
    p.add_argument("--expires", metavar="DURATION", help="approval lifetime, e.g. 30d, 12h, 90m, 2w (default: none)")
    p.add_argument("--reason", default="", metavar="TEXT", help="why it is approved (kept in the signed body)")
    p.set_defaults(handler=_approve)

    p = commands.add_parser(
        "attest",
        help="write a signed in-toto provenance attestation for a checkpoint",
        description=(
            "Verify the checkpoint at --step and write an in-toto Statement v1 in a DSSE envelope to "
            "FILE. Subject: the model's sha256-merkle-v1 root (a digest of the weights, NOT a file "
            "hash) and the checkpoint file's SHA-256. Predicate "
            "(https://torch-integrity.dev/provenance/training/v1): run settings and environment, "
            "data digests, ledger head, replay verdicts found in RUN_DIR/replays/. See docs/signing.md."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--step", required=True, type=_non_negative, metavar="N", help="checkpoint step to attest")
    _key_options(p)
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the DSSE envelope (JSON)")
    p.set_defaults(handler=_attest)

    p = commands.add_parser(
        "verify-attestation",
        help="verify a provenance attestation's signature and content",
        description=(
            "Check that FILE is a DSSE envelope signed by a trusted key over the PAE encoding, that it "
            "carries an in-toto Statement v1 with torch-integrity's training-provenance predicate, and "
            "with --run-dir that the run's ledger still contains the attested head and its checkpoint "
            "has exactly the attested digests. Exit codes: 0 verified, 1 refused or tampered, 2 usage error."
        ),
    )
    p.add_argument("file", metavar="FILE", help="the attestation (DSSE envelope JSON)")
    p.add_argument(
        "--trusted-key", required=True, action="append", metavar="PUB",
        help="a trusted public key file (NAME.pub); repeat for several",
    )
    p.add_argument("--run-dir", metavar="RUN_DIR", help="also check the attestation against this run directory")
    p.set_defaults(handler=_verify_attestation)
