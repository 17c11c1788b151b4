"""In-toto provenance attestations in DSSE envelopes: building, signing, verifying, refusing."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from _fake_run import FakeRun, build_fake_run, drop_last_records
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from torch_integrity import merkle
from torch_integrity.attest import (
    IN_TOTO_PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    attest,
    build_statement,
    verify_attestation,
)
from torch_integrity.canonical import canonical_json
from torch_integrity.digest import Digest
from torch_integrity.dsse import sign_envelope
from torch_integrity.errors import (
    ApprovalError,
    DigestMismatchError,
    MalformedFileError,
    TamperedError,
    TruncatedError,
    UsageError,
)
from torch_integrity.keys import PrivateKey
from torch_integrity.signing import SEAL_PAYLOAD_TYPE


@pytest.fixture
def run(tmp_path: Path) -> FakeRun:
    return build_fake_run(tmp_path / "run")


@pytest.fixture
def key() -> PrivateKey:
    return PrivateKey.generate()


@pytest.fixture
def attestation(tmp_path: Path, run: FakeRun, key: PrivateKey) -> Path:
    out = tmp_path / "model.intoto.json"
    attest(run.run_dir, 4, key, out=out)
    return out


def _document(path: Path) -> dict:
    return json.loads(path.read_bytes())


def _statement(path: Path) -> dict:
    return json.loads(base64.b64decode(_document(path)["payload"]))


def test_statement_layout(run: FakeRun) -> None:
    statement = build_statement(run.run_dir, 4)
    assert statement["_type"] == STATEMENT_TYPE == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == PREDICATE_TYPE
    model, checkpoint_file = statement["subject"]
    # The model subject's sha256 is the value of the sha256-merkle-v1 root, not a file hash.
    assert model["digest"] == {"sha256": run.model_digests[4].root.hex}
    assert model["annotations"] == {"torch-integrity.dev/digest-algorithm": "sha256-merkle-v1"}
    assert checkpoint_file["name"] == "checkpoints/step-000000004.safetensors"
    file_sha = Digest("sha256", checkpoint_file["digest"]["sha256"])
    assert file_sha.hex == hashlib.sha256((run.run_dir / checkpoint_file["name"]).read_bytes()).hexdigest()
    predicate = statement["predicate"]
    assert predicate["run"]["id"] == run.run_id
    assert predicate["settings"]["seed"] == 0
    assert predicate["settings"]["hyperparameters"] == {"lr": 0.1, "hidden": 8}
    assert predicate["ledger"]["count"] == run.head.count and predicate["ledger"]["hash"] == run.head.hash
    assert predicate["ledger"]["finished"] is True
    assert predicate["checkpoint"]["step"] == 4
    assert predicate["checkpoint"]["modelDigest"] == str(run.model_digests[4].root)
    assert predicate["replays"] == [] and predicate["resumes"] == []


def test_data_section_commits_to_the_batches_before_the_checkpoint(run: FakeRun) -> None:
    data = build_statement(run.run_dir, 2)["predicate"]["data"]
    assert data["batchDigestAlgorithm"] == "sha256-batch-v2"
    assert data["stepRecords"] == data["batchDigests"] == 2  # steps 1 and 2 precede the step-2 checkpoint
    leaves = [hashlib.sha256(f"{run.run_id}:batch:{s}".encode()).digest() for s in (1, 2)]
    assert data["batchDigestsMerkleRoot"] == merkle.merkle_root(leaves).hex()
    assert build_statement(run.run_dir, 0)["predicate"]["data"]["batchDigests"] == 0


def test_replay_reports_are_summarized_and_bad_ones_tolerated(run: FakeRun) -> None:
    replays = run.run_dir / "replays"
    replays.mkdir()
    (replays / "a.json").write_text(json.dumps({"verdict": "reproduced", "segments": 2, "details": [1, 2]}))
    (replays / "b.json").write_text("{broken")
    entries = build_statement(run.run_dir, 4)["predicate"]["replays"]
    assert entries[0]["file"] == "replays/a.json"
    assert entries[0]["summary"] == {"segments": 2, "verdict": "reproduced"}
    assert entries[0]["digest"].startswith("sha256:")
    assert entries[1]["file"] == "replays/b.json" and "error" in entries[1]


def test_attest_and_verify(attestation: Path, run: FakeRun, key: PrivateKey) -> None:
    document = _document(attestation)
    assert document["payloadType"] == IN_TOTO_PAYLOAD_TYPE == "application/vnd.in-toto+json"
    assert document["signatures"][0]["keyid"] == key.key_id
    payload = base64.b64decode(document["payload"])
    assert payload == canonical_json(json.loads(payload))
    signature = base64.b64decode(document["signatures"][0]["sig"])
    pae = b"DSSEv1 28 application/vnd.in-toto+json " + str(len(payload)).encode() + b" " + payload
    Ed25519PublicKey.from_public_bytes(key.public.raw).verify(signature, pae)  # raises if wrong
    report = verify_attestation(attestation, [key.public], run_dir=run.run_dir)
    assert report.key_ids == (key.key_id,)
    assert report.model_digest == run.model_digests[4].root
    assert report.run_id == run.run_id and report.step == 4 and report.run_checked
    assert verify_attestation(document, [key.public]).step == 4  # a parsed envelope works too


def test_tampered_payload_is_refused(attestation: Path, key: PrivateKey) -> None:
    document = _document(attestation)
    statement = _statement(attestation)
    statement["predicate"]["settings"]["hyperparameters"]["lr"] = 0.5
    document["payload"] = base64.b64encode(canonical_json(statement)).decode()
    attestation.write_text(json.dumps(document))
    with pytest.raises(TamperedError, match="does not verify"):
        verify_attestation(attestation, [key.public])


def test_tampered_subject_is_refused(attestation: Path, key: PrivateKey) -> None:
    document = _document(attestation)
    statement = _statement(attestation)
    statement["subject"][0]["digest"]["sha256"] = "00" * 32
    document["payload"] = base64.b64encode(canonical_json(statement)).decode()
    attestation.write_text(json.dumps(document))
    with pytest.raises(TamperedError):
        verify_attestation(attestation, [key.public])


def test_changed_payload_type_is_refused(attestation: Path, key: PrivateKey) -> None:
    document = _document(attestation)
    document["payloadType"] = "application/json"
    attestation.write_text(json.dumps(document))
    with pytest.raises(TamperedError, match="payload type"):
        verify_attestation(attestation, [key.public])


def test_validly_signed_envelope_of_another_type_is_refused(tmp_path: Path, attestation: Path, key: PrivateKey) -> None:
    payload = base64.b64decode(_document(attestation)["payload"])
    other = tmp_path / "seal-typed.json"
    other.write_bytes(sign_envelope(SEAL_PAYLOAD_TYPE, payload, key).to_bytes())
    with pytest.raises(ApprovalError, match="payload type"):
        verify_attestation(other, [key.public])


def test_statement_of_another_predicate_type_is_refused(tmp_path: Path, attestation: Path, key: PrivateKey) -> None:
    statement = _statement(attestation)
    statement["predicateType"] = "https://slsa.dev/provenance/v1"
    other = tmp_path / "slsa.json"
    other.write_bytes(sign_envelope(IN_TOTO_PAYLOAD_TYPE, canonical_json(statement), key).to_bytes())
    with pytest.raises(ApprovalError, match="predicateType"):
        verify_attestation(other, [key.public])
    statement["_type"] = "https://in-toto.io/Statement/v0.1"
    other.write_bytes(sign_envelope(IN_TOTO_PAYLOAD_TYPE, canonical_json(statement), key).to_bytes())
    with pytest.raises(ApprovalError, match="Statement v1"):
        verify_attestation(other, [key.public])


def test_untrusted_signer_is_refused(attestation: Path) -> None:
    with pytest.raises(ApprovalError, match="not signed by a trusted key"):
        verify_attestation(attestation, [PrivateKey.generate().public])


def test_checked_against_another_run_is_refused(tmp_path: Path, attestation: Path, key: PrivateKey) -> None:
    other = build_fake_run(tmp_path / "other", run_id="e" * 32)
    # The other run's ledger does not contain the attested head (same count, other hash).
    with pytest.raises(TamperedError, match="rewritten"):
        verify_attestation(attestation, [key.public], run_dir=other.run_dir)


def test_truncated_run_after_attesting_is_detected(attestation: Path, run: FakeRun, key: PrivateKey) -> None:
    drop_last_records(run.run_dir, 1)
    with pytest.raises(TruncatedError):
        verify_attestation(attestation, [key.public], run_dir=run.run_dir)


def test_swapped_checkpoint_file_is_detected(attestation: Path, run: FakeRun, key: PrivateKey) -> None:
    checkpoints = run.run_dir / "checkpoints"
    (checkpoints / "step-000000004.safetensors").write_bytes((checkpoints / "step-000000002.safetensors").read_bytes())
    with pytest.raises(DigestMismatchError):
        verify_attestation(attestation, [key.public], run_dir=run.run_dir)


def test_unreadable_inputs_are_usage_errors(tmp_path: Path, key: PrivateKey, run: FakeRun) -> None:
    with pytest.raises(UsageError):
        verify_attestation(tmp_path / "missing.json", [key.public])
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(MalformedFileError):
        verify_attestation(tmp_path / "junk.json", [key.public])
    with pytest.raises(UsageError, match="no checkpoint at step 3"):
        attest(run.run_dir, 3, key)
