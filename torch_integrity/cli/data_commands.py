"""Training-data provenance commands: manifests, lineage, inclusion proofs, sample usage.

::

    torch-integrity data-manifest FOLDER --out MANIFEST [--parent M --transform-code F --transform-params JSON]
    torch-integrity data-check FOLDER MANIFEST
    torch-integrity data-diff OLD NEW
    torch-integrity data-lineage RAW FILTERED ... [--code FILE ...]
    torch-integrity data-prove MANIFEST --index I [--out FILE]
    torch-integrity data-verify-proof PROOF --root ROOT --size N [--sample-file FILE]
    torch-integrity data-usage RUN_DIR --index I [--manifest M] [--json]

Exit codes: 0 verified, 1 integrity failure, 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torch_integrity.canonical import strict_loads
from torch_integrity.digest import Digest
from torch_integrity.errors import DigestMismatchError, MalformedFileError, UsageError
from torch_integrity.fsutil import atomic_write_bytes, read_file_bytes
from torch_integrity.lineage import ManifestDiff, diff_manifests, sample_usage, verify_lineage
from torch_integrity.manifest import (
    Manifest,
    Provenance,
    Transform,
    build_manifest,
    load_manifest,
    manifest_reference,
    write_manifest,
)
from torch_integrity.proofs import InclusionProof, prove_inclusion, verify_inclusion

_EXIT_CODES = "Exit codes: 0 verified, 1 integrity failure, 2 usage error or unreadable input."
_LISTED = 20


def _add(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=f"{description}\n\n{_EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def register(commands: Any) -> None:
    """Add the data-* commands to ``commands``."""
    p = _add(
        commands,
        "data-manifest",
        "write a manifest of a data folder (per-file digests and their Merkle root)",
        "Hash every file under FOLDER as the sample (relative path, bytes), in relative-path order,\n"
        "and write a manifest: the sample digests, their RFC 6962 Merkle root, provenance and lineage.\n"
        "Symlinks are refused. Memory stays flat: digests are streamed to disk.\n\n"
        "example:\n  torch-integrity data-manifest data/clean --out clean.manifest --parent raw.manifest \\\n"
        "      --transform-code dedupe.py --transform-params '{\"threshold\": 0.9}' --license CC-BY-4.0",
    )
    p.add_argument("folder", metavar="FOLDER", type=Path, help="the data folder")
    p.add_argument("--out", required=True, type=Path, metavar="MANIFEST", help="manifest file to write")
    p.add_argument("--parent", type=Path, metavar="MANIFEST", help="manifest of the data this folder was derived from")
    p.add_argument("--transform-code", type=Path, metavar="FILE", help="source file of the filter that derived it")
    p.add_argument("--transform-params", metavar="JSON", help="the filter's parameters, as JSON")
    p.add_argument("--source-url", metavar="URL", help="where the data came from")
    p.add_argument("--retrieved-at", metavar="TIME", help="when it was retrieved (ISO 8601)")
    p.add_argument("--license", metavar="LICENSE", help="the data's license (SPDX identifier where one exists)")
    p.add_argument("--generator", metavar="MODEL", help="for synthetic data: the generating model")
    p.set_defaults(handler=_manifest)

    p = _add(
        commands,
        "data-check",
        "check a data folder against its manifest",
        "Re-hash FOLDER and compare it with MANIFEST; list changed, added and removed files.\n"
        "Exit 1 if anything differs.",
    )
    p.add_argument("folder", metavar="FOLDER", type=Path, help="the data folder")
    p.add_argument("manifest", metavar="MANIFEST", type=Path, help="its manifest")
    p.set_defaults(handler=_check)

    p = _add(
        commands,
        "data-diff",
        "compare two manifests sample by sample",
        "List the samples that differ between OLD and NEW: by index, and by path for folder manifests.\n"
        "Exit 1 if they differ.",
    )
    p.add_argument("old", metavar="OLD", type=Path, help="the reference manifest")
    p.add_argument("new", metavar="NEW", type=Path, help="the manifest to compare")
    p.set_defaults(handler=_diff)

    p = _add(
        commands,
        "data-lineage",
        "verify a chain of manifests from raw data through filters to the training set",
        "Check that each MANIFEST names the one before it as its parent (root, count and file digest)\n"
        "and, with --code, that each filter's source file is the one recorded.\n\n"
        "example:\n  torch-integrity data-lineage raw.manifest clean.manifest train.manifest \\\n"
        "      --code dedupe.py --code split.py",
    )
    p.add_argument("manifests", metavar="MANIFEST", nargs="+", type=Path, help="manifests, raw data first")
    p.add_argument(
        "--code",
        action="append",
        metavar="FILE",
        help="filter source for the next derived manifest, once per derived manifest in order ('-' skips one)",
    )
    p.set_defaults(handler=_lineage)

    p = _add(
        commands,
        "data-prove",
        "write an inclusion proof for samples of a manifest",
        "Write an RFC 6962 inclusion proof (audit path) showing that sample I is at index I of the\n"
        "manifest's Merkle root. Anyone holding the root and size can check it without the dataset.",
    )
    p.add_argument("manifest", metavar="MANIFEST", type=Path, help="the manifest")
    p.add_argument("--index", required=True, action="append", type=int, metavar="I", help="sample index (repeatable)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the proof here (default: standard output)")
    p.set_defaults(handler=_prove)

    p = _add(
        commands,
        "data-verify-proof",
        "check an inclusion proof against a trusted root and size",
        "Check PROOF (from data-prove) against ROOT and N taken from a trusted source, such as the\n"
        "run's ledger (run_start data_manifest). With --sample-file, also check that FILE is the\n"
        "proved sample (folder manifests: hashed with the proof's relative path).",
    )
    p.add_argument("proof", metavar="PROOF", type=Path, help="the proof file (one proof or a list)")
    p.add_argument("--root", required=True, metavar="ROOT", help="the manifest root, sha256-merkle-v1:<hex>")
    p.add_argument("--size", required=True, type=int, metavar="N", help="the manifest's sample count")
    p.add_argument("--sample-file", type=Path, metavar="FILE", help="the sample file to check as the proof's leaf")
    p.set_defaults(handler=_verify_proof)

    p = _add(
        commands,
        "data-usage",
        "list the training steps that used a sample",
        "Verify the run's ledger, then list the steps whose recorded batch indices hold sample I.\n"
        "With --manifest, also check that the run recorded that manifest as its training data.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run directory")
    p.add_argument("--index", required=True, type=int, metavar="I", help="sample index")
    p.add_argument("--manifest", type=Path, metavar="MANIFEST", help="the run's data manifest (names the sample)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_usage)


def _manifest(args: argparse.Namespace) -> int:
    transform = None
    if args.transform_code is not None:
        params = strict_loads(args.transform_params, what="--transform-params") if args.transform_params else None
        transform = Transform.from_file(args.transform_code, params)
    elif args.transform_params is not None:
        raise UsageError("--transform-params needs --transform-code")
    parent = load_manifest(args.parent) if args.parent is not None else None
    provenance = Provenance(
        source_url=args.source_url, retrieved_at=args.retrieved_at, license=args.license, generator=args.generator
    )
    given = provenance if provenance.to_json() else None
    reference = write_manifest(args.folder, args.out, provenance=given, parent=parent, transform=transform)
    print(f"wrote {args.out}: {reference.count} files")
    print(f"root         {reference.root}")
    print(f"file digest  {reference.file_digest}")
    return 0


def _print_diff(diff: ManifestDiff) -> None:
    for label, items in (
        ("changed", diff.changed_paths or diff.changed),
        ("added", diff.added_paths or diff.added),
        ("removed", diff.removed_paths or diff.removed),
    ):
        if items:
            more = f" ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
            print(f"{label} ({len(items)}): " + ", ".join(map(str, items[:_LISTED])) + more)


def _check(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    if manifest.kind != "folder":
        raise UsageError(f"{args.manifest} describes a Python dataset; check it with lineage.check_dataset")
    current = build_manifest(args.folder)
    return _report_diff(manifest, current, f"{args.folder} against {args.manifest}")


def _diff(args: argparse.Namespace) -> int:
    return _report_diff(load_manifest(args.old), load_manifest(args.new), f"{args.new} against {args.old}")


def _report_diff(expected: Manifest, computed: Manifest, subject: str) -> int:
    diff = diff_manifests(expected, computed)
    if diff.identical:  # for folders, equal digests mean equal paths too (the path is hashed)
        print(f"identical: {expected.count} samples, root {expected.root}")
        return 0
    _print_diff(diff)
    raise DigestMismatchError(subject, expected.root, computed.root)


def _lineage(args: argparse.Namespace) -> int:
    codes = [None if c == "-" else Path(c) for c in args.code] if args.code else None
    report = verify_lineage(*args.manifests, code_files=codes)
    for position, (path, reference) in enumerate(zip(args.manifests, report.manifests, strict=True)):
        line = f"{position}: {path} ({reference.count} samples, root {reference.root})"
        if position:
            transform = report.transforms[position - 1]
            how = f"filter {transform.code_name} {transform.code_digest}" if transform else "no filter recorded"
            checked = "code checked" if report.code_checked[position - 1] else "code not checked"
            line += f"\n   derived from {position - 1} by {how} ({checked})"
        print(line)
    for note in report.notes:
        print(f"note: {note}")
    print("lineage verified")
    return 0


def _prove(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    proofs = prove_inclusion(manifest, args.index)
    data: Any = proofs[0].to_json() if len(proofs) == 1 else [p.to_json() for p in proofs]
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(args.out, text.encode())
        print(f"wrote {len(proofs)} proof(s) against root {manifest.root} ({manifest.count} samples) to {args.out}")
    return 0


def _verify_proof(args: argparse.Namespace) -> int:
    data = strict_loads(bytes(read_file_bytes(args.proof, max_bytes=64 << 20)), what=str(args.proof))
    items = data if isinstance(data, list) else [data]
    if not items:
        raise MalformedFileError(f"{args.proof} holds no proof")
    proofs = [InclusionProof.from_json(item) for item in items]
    if args.sample_file is not None and len(proofs) != 1:
        raise UsageError("--sample-file needs a proof file with exactly one proof")
    root = Digest.parse(args.root)
    for proof in proofs:
        verify_inclusion(proof, root, args.size, sample_file=args.sample_file)
        what = f"{proof.sample_path} " if proof.sample_path else ""
        checked = " (sample file checked)" if args.sample_file is not None else ""
        print(f"verified: sample {proof.index} {what}{proof.sample_digest} is in {root} ({args.size} samples){checked}")
    return 0


def _usage(args: argparse.Namespace) -> int:
    usage = sample_usage(args.run_dir, args.index)
    result: dict[str, Any] = {
        "run_id": usage.run_id,
        "index": usage.index,
        "steps": usage.steps,
        "steps_without_indices": usage.steps_without_indices,
        "data_manifest": usage.data_manifest[0] if usage.data_manifest else None,
    }
    if args.manifest is not None:
        manifest = load_manifest(args.manifest)
        expected = manifest_reference(manifest)
        for recorded in usage.data_manifest:
            if recorded != expected:
                raise DigestMismatchError(f"data manifest of run {usage.run_id}", recorded or "none recorded", expected)
        result["sample_digest"] = str(manifest.sample_digest(args.index))
        if manifest.sample_path(args.index) is not None:
            result["sample_path"] = manifest.sample_path(args.index)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    sample = f"sample {args.index}"
    if "sample_digest" in result:
        named = " ".join(filter(None, [result.get("sample_path"), result["sample_digest"]]))
        sample += f" ({named})"
    steps = ", ".join(map(str, usage.steps)) if usage.steps else "none"
    print(f"run {usage.run_id}: {sample} was trained at {len(usage.steps)} step(s): {steps}")
    if usage.steps_without_indices:
        print(f"note: {usage.steps_without_indices} step(s) recorded no sample indices; their use of it is unknown")
    return 0
