"""Keys, DSSE envelopes, seals (THREATS row 3) and k-of-n approvals (THREATS row 18)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from _fake_run import FakeRun, append_records, build_fake_run, drop_last_records
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from torch_integrity.approvals import (
    APPROVAL_PAYLOAD_TYPE,
    Approval,
    approve,
    check_approvals,
    load_policy,
    parse_duration,
)
from torch_integrity.canonical import canonical_json
from torch_integrity.digest import Digest
from torch_integrity.dsse import Envelope, pae, sign_envelope, verified_key_ids
from torch_integrity.errors import (
    ApprovalError,
    DigestMismatchError,
    MalformedFileError,
    TamperedError,
    TruncatedError,
    UsageError,
)
from torch_integrity.keys import (
    PrivateKey,
    PublicKey,
    generate_key_files,
    key_id_for,
    load_private_key,
    load_public_key,
    parse_public_key,
)
from torch_integrity.signing import SEAL_PAYLOAD_TYPE, check_seals, seal_run

NOW = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.UTC)

# --- keys ----------------------------------------------------------------------------


def test_key_id_known_answer() -> None:
    # SHA-256 of 32 zero bytes is 66687aad f862bd77 6c8fc18b 8e9f8e20 0897148...
    assert key_id_for(bytes(32)) == "ed25519:66687aadf862bd776c8fc18b8e9f8e20"
    raw = bytes(range(32))
    assert key_id_for(raw) == "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def test_keygen_private_key_is_0600_from_the_start_and_never_overwritten(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask the private key must be owner-only
    try:
        public = generate_key_files(tmp_path / "alice")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "alice").stat().st_mode) == 0o600
    assert (tmp_path / "alice.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert load_public_key(tmp_path / "alice.pub") == public
    assert load_private_key(tmp_path / "alice").public == public
    before = (tmp_path / "alice").read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite"):
        generate_key_files(tmp_path / "alice")
    assert (tmp_path / "alice").read_bytes() == before
    (tmp_path / "bob.pub").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        generate_key_files(tmp_path / "bob")
    assert not (tmp_path / "bob").exists()


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    generate_key_files(tmp_path / "k")
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        load_private_key(tmp_path / "k")


def test_encrypted_private_key(tmp_path: Path) -> None:
    public = generate_key_files(tmp_path / "k", passphrase=b"correct horse")
    assert b"ENCRYPTED" in (tmp_path / "k").read_bytes()
    assert load_private_key(tmp_path / "k", passphrase=b"correct horse").public == public
    with pytest.raises(UsageError, match="passphrase"):
        load_private_key(tmp_path / "k")
    with pytest.raises(MalformedFileError):
        load_private_key(tmp_path / "k", passphrase=b"wrong")


def test_public_key_forms_agree_and_private_keys_are_not_public_keys(tmp_path: Path) -> None:
    public = generate_key_files(tmp_path / "k")
    assert parse_public_key(public.base64) == public
    assert parse_public_key(public.to_pem()) == public
    with pytest.raises(MalformedFileError, match="private key"):
        parse_public_key((tmp_path / "k").read_bytes())
    with pytest.raises(MalformedFileError):
        parse_public_key(base64.b64encode(bytes(31)).decode())
    with pytest.raises(UsageError):
        load_public_key(tmp_path / "missing.pub")


# --- DSSE ----------------------------------------------------------------------------


def test_pae_known_answers() -> None:
    # "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body, lengths in bytes, ASCII decimal.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1" + b" " + b"29" + b" " + b"http://example.com/HelloWorld" + b" " + b"11" + b" " + b"hello world"
    )
    assert pae("application/vnd.in-toto+json", b'{"a":1}') == b'DSSEv1 28 application/vnd.in-toto+json 7 {"a":1}'
    assert pae("t", b"") == b"DSSEv1 1 t 0 "
    assert pae("\u00e9", b"\x00\xff") == b"DSSEv1 2 \xc3\xa9 2 \x00\xff"  # the type's UTF-8 bytes are counted


def test_envelope_signature_is_ed25519_over_pae_and_binds_the_type() -> None:
    key = PrivateKey.generate()
    envelope = sign_envelope("application/example", b"body", key)
    document = json.loads(envelope.to_bytes())
    assert set(document) == {"payload", "payloadType", "signatures"}
    assert base64.b64decode(document["payload"]) == b"body"
    signature = base64.b64decode(document["signatures"][0]["sig"])
    # Checked with the cryptography package directly, against PAE bytes written out by hand.
    Ed25519PublicKey.from_public_bytes(key.public.raw).verify(signature, b"DSSEv1 19 application/example 4 body")
    trusted = {key.key_id: key.public}
    assert verified_key_ids(Envelope.from_json(document, what="t"), trusted).valid == (key.key_id,)
    retyped = dataclasses.replace(envelope, payload_type="application/other")
    assert verified_key_ids(retyped, trusted).invalid == (key.key_id,)
    # URL-safe base64 without padding is accepted too (DSSE allows both alphabets).
    document["payload"] = base64.urlsafe_b64encode(b"body").decode().rstrip("=")
    assert Envelope.from_json(document, what="t").payload == b"body"
    with pytest.raises(MalformedFileError):
        Envelope.from_json({"payloadType": "x", "signatures": []}, what="t")


def test_signature_without_keyid_is_matched_against_trusted_keys() -> None:
    key, other = PrivateKey.generate(), PrivateKey.generate()
    envelope = sign_envelope("t", b"x", key)
    anonymous = dataclasses.replace(
        envelope, signatures=(dataclasses.replace(envelope.signatures[0], keyid=""),)
    )
    assert verified_key_ids(anonymous, {key.key_id: key.public}).valid == (key.key_id,)
    assert verified_key_ids(anonymous, {other.key_id: other.public}).unknown == ("(no keyid)",)


# --- seals (THREATS row 3) -----------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path) -> FakeRun:
    return build_fake_run(tmp_path / "run")


@pytest.fixture
def keys() -> list[PrivateKey]:
    return [PrivateKey.generate() for _ in range(4)]


def test_seal_then_check(run: FakeRun, keys: list[PrivateKey]) -> None:
    seal = seal_run(run.run_dir, keys[0], now=NOW)
    assert seal.path == run.run_dir / "seals" / f"{keys[0].key_id.replace(':', '-')}-{run.head.count}.json"
    assert seal.head == run.head
    report = check_seals(run.run_dir, [keys[0].public])
    assert report.trusted == (seal,)
    assert report.unsealed_records == 0
    append_records(run.run_dir, 2)  # a ledger may grow after a seal: still fine, but said
    report = check_seals(run.run_dir, [keys[0].public])
    assert report.unsealed_records == 2


def test_truncated_ledger_after_seal_is_detected(run: FakeRun, keys: list[PrivateKey]) -> None:
    seal_run(run.run_dir, keys[0])
    drop_last_records(run.run_dir, 1)  # drops run_end: still a valid, shorter chain
    with pytest.raises(TruncatedError, match=f"trusted head recorded {run.head.count}"):
        check_seals(run.run_dir, [keys[0].public])


def test_rewritten_ledger_after_seal_is_detected(run: FakeRun, keys: list[PrivateKey]) -> None:
    seal_run(run.run_dir, keys[0])
    drop_last_records(run.run_dir, 2)
    append_records(run.run_dir, 3)  # same run, a different history past record 6, longer than the seal
    with pytest.raises(TamperedError, match="rewritten"):
        check_seals(run.run_dir, [keys[0].public])


def test_whole_ledger_replaced_by_another_run_is_detected(tmp_path: Path, run: FakeRun, keys: list[PrivateKey]) -> None:
    seal_run(run.run_dir, keys[0])
    other = build_fake_run(tmp_path / "other", seed=7)
    (run.run_dir / "ledger.jsonl").write_bytes((other.run_dir / "ledger.jsonl").read_bytes())
    with pytest.raises(TamperedError, match="sealed run"):
        check_seals(run.run_dir, [keys[0].public])


def test_seal_by_an_untrusted_key_is_reported_and_not_enough(run: FakeRun, keys: list[PrivateKey]) -> None:
    seal_run(run.run_dir, keys[1])
    with pytest.raises(ApprovalError, match="none of its 1 seal"):
        check_seals(run.run_dir, [keys[0].public])
    seal_run(run.run_dir, keys[0])
    report = check_seals(run.run_dir, [keys[0].public])
    assert [c.key_ids for c in report.untrusted] == [(keys[1].key_id,)]
    assert len(report.trusted) == 1


def test_no_seal_at_all_is_refused(run: FakeRun, keys: list[PrivateKey]) -> None:
    with pytest.raises(ApprovalError, match="no seals"):
        check_seals(run.run_dir, [keys[0].public])
    with pytest.raises(UsageError):
        check_seals(run.run_dir, [])


def test_altered_seal_file_is_tampering(run: FakeRun, keys: list[PrivateKey]) -> None:
    seal = seal_run(run.run_dir, keys[0])
    assert seal.path is not None
    document = json.loads(seal.path.read_bytes())
    body = json.loads(base64.b64decode(document["payload"]))
    body["ledger"] = {"count": 3, "hash": "0" * 64}  # claim a shorter sealed head
    document["payload"] = base64.b64encode(canonical_json(body)).decode()
    seal.path.write_text(json.dumps(document))
    with pytest.raises(TamperedError, match="does not verify"):
        check_seals(run.run_dir, [keys[0].public])
    seal.path.write_text("{not json")
    with pytest.raises(TamperedError, match="cannot be read"):
        check_seals(run.run_dir, [keys[0].public])


def test_a_seal_kept_elsewhere_catches_truncation_even_if_the_run_dir_seals_are_deleted(
    tmp_path: Path, run: FakeRun, keys: list[PrivateKey]
) -> None:
    seal = seal_run(run.run_dir, keys[0])
    assert seal.path is not None
    kept = tmp_path / "kept-seal.json"
    kept.write_bytes(seal.path.read_bytes())
    seal.path.unlink()
    drop_last_records(run.run_dir, 1)
    with pytest.raises(TruncatedError):
        check_seals(run.run_dir, [keys[0].public], extra_seals=[kept])


def test_a_key_will_not_seal_a_ledger_that_lost_what_it_sealed(run: FakeRun, keys: list[PrivateKey]) -> None:
    seal_run(run.run_dir, keys[0])
    drop_last_records(run.run_dir, 1)
    with pytest.raises(TruncatedError):
        seal_run(run.run_dir, keys[0])


def test_trusted_keys_may_be_given_as_files(tmp_path: Path, run: FakeRun) -> None:
    generate_key_files(tmp_path / "k")
    seal_run(run.run_dir, load_private_key(tmp_path / "k"))
    assert len(check_seals(run.run_dir, [tmp_path / "k.pub"]).trusted) == 1


# --- approvals and policy (THREATS row 18) ------------------------------------------


def write_policy(path: Path, keys: list[PublicKey], threshold: int) -> Path:
    entries = [{"id": k.key_id, "public_key": k.base64, "name": f"approver-{i}"} for i, k in enumerate(keys)]
    path.write_text(json.dumps({"threshold": threshold, "keys": entries}))
    return path


@pytest.fixture
def policy(tmp_path: Path, keys: list[PrivateKey]) -> Path:
    """2 of 3: keys[0..2] are authorized, keys[3] is not."""
    return write_policy(tmp_path / "policy.json", [k.public for k in keys[:3]], 2)


def forge(run: FakeRun, key: PrivateKey, *, payload_type: str = APPROVAL_PAYLOAD_TYPE, **changes: object) -> Path:
    """Sign an approval body with arbitrary fields, as an attacker holding ``key`` could."""
    approval = Approval(
        run_id=run.run_id,
        step=2,
        model_digest=run.model_digests[2].root,
        file_digest=Digest("sha256", "0" * 64),
        ledger=run.head,
        key_id=key.key_id,
        approved_at=NOW,
        expires_at=None,
        reason="forged",
    )
    approval = dataclasses.replace(approval, **changes)  # type: ignore[arg-type]
    envelope = sign_envelope(payload_type, canonical_json(approval.to_payload()), key)
    folder = run.run_dir / "approvals"
    folder.mkdir(exist_ok=True)
    path = folder / f"forged-{len(list(folder.iterdir()))}.json"
    path.write_bytes(envelope.to_bytes())
    return path


def digest_at(run: FakeRun, step: int) -> Digest:
    return run.model_digests[step].root


def test_k_approvals_by_distinct_authorized_keys_pass(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[0], now=NOW, reason="eval ok")
    approve(run.run_dir, 2, keys[2], now=NOW, expires=parse_duration("30d"))
    report = check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)
    assert report.satisfied
    assert report.approved_by == tuple(sorted([keys[0].key_id, keys[2].key_id]))
    assert report.steps == (2,)
    assert "approver-0" in report.summary()


def test_k_minus_1_approvals_are_refused(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[0], now=NOW)
    with pytest.raises(ApprovalError, match="1 of the required 2"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)


def test_one_key_approving_twice_counts_once(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[1], now=NOW)
    approve(run.run_dir, 2, keys[1], now=NOW + dt.timedelta(seconds=1))
    assert len(list((run.run_dir / "approvals").iterdir())) == 2
    with pytest.raises(ApprovalError, match="1 of the required 2"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW + dt.timedelta(minutes=1))


def test_a_key_listed_twice_in_a_policy_is_refused(tmp_path: Path, keys: list[PrivateKey]) -> None:
    path = write_policy(tmp_path / "p.json", [keys[0].public, keys[0].public], 2)
    with pytest.raises(MalformedFileError, match="listed twice"):
        load_policy(path)


def test_an_unknown_key_does_not_count(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[0], now=NOW)
    approve(run.run_dir, 2, keys[3], now=NOW)  # a real, valid signature by a key the policy does not list
    with pytest.raises(ApprovalError, match="signed by no key of the policy") as caught:
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)
    assert keys[3].key_id in str(caught.value)


def test_an_expired_approval_is_refused(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[0], now=NOW)
    approve(run.run_dir, 2, keys[1], now=NOW, expires=parse_duration("12h"))
    assert check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW + dt.timedelta(hours=11)).satisfied
    with pytest.raises(ApprovalError, match="expired at 2030-01-02T00:00:00Z"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW + dt.timedelta(hours=12))


def test_an_approval_dated_in_the_future_is_refused(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[0], now=NOW)
    forge(run, keys[1], approved_at=NOW + dt.timedelta(days=1))
    with pytest.raises(ApprovalError, match="in the future"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)


def test_an_approval_of_another_digest_is_refused(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[0], now=NOW)
    approve(run.run_dir, 4, keys[1], now=NOW)  # approves step 4's weights, not step 2's
    with pytest.raises(ApprovalError, match=r"approves sha256-merkle-v1:[0-9a-f]+ \(step 4\)"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)


def test_an_approval_of_another_step_is_refused(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[0], now=NOW)
    forge(run, keys[1], step=4)  # step 2's digest, but claiming step 4: inconsistent with the ledger
    with pytest.raises(ApprovalError, match="no checkpoint with that digest at that step"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)
    # And when the caller pins a step, approvals of any other step do not count.
    approve(run.run_dir, 2, keys[1], now=NOW)
    assert check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW, step=2).satisfied
    with pytest.raises(ApprovalError, match="not step 0"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW, step=0)


def test_an_approval_of_another_run_is_refused(tmp_path: Path, run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    # Same seed, so the same weights and the same digests, but another run id.
    twin = build_fake_run(tmp_path / "twin", run_id="f" * 32)
    assert digest_at(twin, 2) == digest_at(run, 2)
    approve(run.run_dir, 2, keys[0], now=NOW)
    foreign = approve(twin.run_dir, 2, keys[1], now=NOW)
    assert foreign.path is not None
    (run.run_dir / "approvals" / foreign.path.name).write_bytes(foreign.path.read_bytes())
    with pytest.raises(ApprovalError, match=f"approves run {'f' * 32}, not this run"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)


def test_a_tampered_approval_file_is_refused(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[0], now=NOW)
    approval = approve(run.run_dir, 4, keys[1], now=NOW)
    assert approval.path is not None
    document = json.loads(approval.path.read_bytes())
    body = json.loads(base64.b64decode(document["payload"]))
    body.update(step=2, model_digest=str(digest_at(run, 2)))  # re-point it at step 2
    document["payload"] = base64.b64encode(canonical_json(body)).decode()
    approval.path.write_text(json.dumps(document))
    with pytest.raises(ApprovalError, match="does not verify"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)


def test_a_changed_payload_type_is_refused(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[0], now=NOW)
    approval = approve(run.run_dir, 2, keys[1], now=NOW)
    assert approval.path is not None
    document = json.loads(approval.path.read_bytes())
    document["payloadType"] = SEAL_PAYLOAD_TYPE  # the signature covers the type: it breaks
    approval.path.write_text(json.dumps(document))
    with pytest.raises(ApprovalError, match="does not verify"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)
    # A body validly signed under another payload type is no approval either.
    approval.path.unlink()
    forge(run, keys[1], payload_type=SEAL_PAYLOAD_TYPE)
    with pytest.raises(ApprovalError, match="is not an approval"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)


def test_a_body_naming_another_signer_is_refused(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    approve(run.run_dir, 2, keys[0], now=NOW)
    forge(run, keys[1], key_id=keys[2].key_id)  # keys[1] signs a body claiming to be keys[2]
    with pytest.raises(ApprovalError, match="body names approver"):
        check_approvals(run.run_dir, digest_at(run, 2), policy, now=NOW)


def test_a_digest_that_is_no_checkpoint_of_the_run_is_refused(run: FakeRun, keys: list[PrivateKey], policy: Path) -> None:
    stranger = dataclasses.replace(digest_at(run, 2), hex="ab" * 32)
    with pytest.raises(ApprovalError, match="no checkpoint of run"):
        check_approvals(run.run_dir, stranger, policy, now=NOW)
    with pytest.raises(UsageError, match="sha256-merkle-v1"):
        check_approvals(run.run_dir, "sha256:" + "ab" * 32, policy, now=NOW)


def test_approve_verifies_the_checkpoint_before_signing(run: FakeRun, keys: list[PrivateKey]) -> None:
    path = run.run_dir / "checkpoints" / "step-000000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        approve(run.run_dir, 2, keys[0], now=NOW)
    assert not (run.run_dir / "approvals").exists() or not list((run.run_dir / "approvals").iterdir())
    with pytest.raises(UsageError, match="no checkpoint at step 3"):
        approve(run.run_dir, 3, keys[0], now=NOW)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"threshold": 0, "keys": []}, "non-empty"),
        ({"threshold": 3, "keys": "K2"}, "threshold must be"),
        ({"threshold": 1, "keys": "ID"}, "does not match"),
        ({"threshold": 1, "keys": "K1", "extra": 1}, "expected an object"),
    ],
)
def test_malformed_policies_are_refused(tmp_path: Path, keys: list[PrivateKey], document: dict, message: str) -> None:
    entries = [{"id": k.key_id, "public_key": k.public.base64} for k in keys[:2]]
    if document["keys"] == "K2":
        document["keys"] = entries
    elif document["keys"] == "K1":
        document["keys"] = entries[:1]
    elif document["keys"] == "ID":
        document["keys"] = [{"id": keys[1].key_id, "public_key": keys[0].public.base64}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(document))
    with pytest.raises(MalformedFileError, match=message):
        load_policy(path)


def test_policy_accepts_pem_public_keys(tmp_path: Path, keys: list[PrivateKey]) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"threshold": 1, "keys": [{"public_key": keys[0].public.to_pem().decode()}]}))
    assert list(load_policy(path).keys) == [keys[0].key_id]


def test_durations() -> None:
    assert parse_duration("30d") == dt.timedelta(days=30)
    assert parse_duration("2w") == dt.timedelta(weeks=2)
    for bad in ("0d", "1y", "-1h", "12", "h"):
        with pytest.raises(UsageError):
            parse_duration(bad)
