"""The hash-chained ledger: round trips, and every tampering of THREATS rows 1, 2, 3 and 12."""

from __future__ import annotations

import hashlib
import itertools
import json
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torch_integrity import ledger
from torch_integrity.errors import (
    MalformedFileError,
    MissingFileError,
    TamperedError,
    TruncatedError,
    UnsafePathError,
    UsageError,
    VerificationFailure,
)
from torch_integrity.ledger import (
    GENESIS,
    LedgerHead,
    LedgerWriter,
    encode_record,
    read_records,
    record_hash,
    verify_ledger,
)

DOMAIN = b"torch-integrity:ledger:v1\x00"
BODIES: list[tuple[str, dict[str, Any]]] = [
    ("run_start", {"run_id": "r1", "seed": 7}),
    ("step", {"loss": "float32:3f8ccccd", "step": 1}),
    ("checkpoint", {"file": "checkpoints/a.safetensors", "step": 1}),
    ("run_end", {"steps": 1}),
]


def write_ledger(path: Path, entries: list[tuple[str, dict[str, Any]]] = BODIES) -> LedgerHead:
    with LedgerWriter(path) as writer:
        for kind, body in entries:
            writer.append(kind, body, durable=True)
        return writer.head


def forge_line(seq: int, kind: str, body: dict[str, Any], prev: bytes) -> tuple[bytes, bytes]:
    """Build a record as an attacker who knows the format would: correct chain hash."""
    return encode_record(seq, kind, body, prev)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.jsonl"


# --- format and round trip ----------------------------------------------------------------


def test_line_layout_and_hash_known_answer(ledger_path):
    write_ledger(ledger_path, [("note", {"x": 1})])
    payload = b'{"body":{"x":1},"kind":"note","seq":0}'
    expected = hashlib.sha256(DOMAIN + bytes(32) + payload).hexdigest()
    assert ledger_path.read_bytes() == b'{"body":{"x":1},"kind":"note","seq":0,"hash":"' + expected.encode() + b'"}\n'
    assert record_hash(GENESIS, payload).hex() == expected


def test_append_read_verify_round_trip(ledger_path):
    head = write_ledger(ledger_path)
    records = list(read_records(ledger_path))
    assert [(r.kind, r.body) for r in records] == BODIES
    assert [r.seq for r in records] == [0, 1, 2, 3]
    assert records[0].prev == "0" * 64
    for before, after in itertools.pairwise(records):
        assert after.prev == before.hash
        payload = json.dumps(
            {"body": after.body, "kind": after.kind, "seq": after.seq}, sort_keys=True, separators=(",", ":")
        )
        assert hashlib.sha256(DOMAIN + bytes.fromhex(before.hash) + payload.encode()).hexdigest() == after.hash
    assert verify_ledger(ledger_path) == head == LedgerHead(4, records[-1].hash)
    assert verify_ledger(ledger_path, head=head) == head


def test_empty_ledger_verifies_as_empty(ledger_path):
    ledger_path.write_bytes(b"")
    assert verify_ledger(ledger_path) == LedgerHead(0, "0" * 64)
    assert list(read_records(ledger_path)) == []


def test_append_returns_the_record_as_written(ledger_path):
    with LedgerWriter(ledger_path) as writer:
        first = writer.append("a", {"v": [1, 2]}, durable=True)
        second = writer.append("b", {}, durable=True)
    assert (first.seq, first.kind, first.body, first.prev) == (0, "a", {"v": [1, 2]}, "0" * 64)
    assert second.prev == first.hash
    assert [r.hash for r in read_records(ledger_path)] == [first.hash, second.hash]


def test_reopening_continues_the_chain(ledger_path):
    head = write_ledger(ledger_path, BODIES[:2])
    with LedgerWriter(ledger_path) as writer:
        assert writer.head == head
        record = writer.append("step", {"step": 2}, durable=True)
        assert record.seq == 2 and record.prev == head.hash
    with LedgerWriter(ledger_path) as writer:
        writer.append("run_end", {}, durable=True)
    records = list(read_records(ledger_path))
    assert [r.seq for r in records] == [0, 1, 2, 3]
    assert verify_ledger(ledger_path, head=head).count == 4


def test_buffered_records_reach_the_file_on_flush_or_durable_append(ledger_path):
    writer = LedgerWriter(ledger_path, flush_every=3)
    writer.append("step", {"step": 1})
    writer.append("step", {"step": 2})
    assert verify_ledger(ledger_path).count == 0  # still buffered
    writer.append("step", {"step": 3})  # flush_every reached
    assert verify_ledger(ledger_path).count == 3
    writer.append("step", {"step": 4})
    assert verify_ledger(ledger_path).count == 3
    writer.append("checkpoint", {"step": 4}, durable=True)
    assert verify_ledger(ledger_path) == writer.head
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(UsageError, match="closed"):
        writer.append("step", {})


@pytest.mark.parametrize("kind", ["", "Step", "step-1", "a" * 65, "step\n", "ステップ"])
def test_bad_kinds_are_refused(ledger_path, kind):
    with LedgerWriter(ledger_path) as writer, pytest.raises(UsageError, match="kind"):
        writer.append(kind, {})
    assert verify_ledger(ledger_path).count == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bodies=st.lists(
        st.dictionaries(
            st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=8),
            st.recursive(
                st.none()
                | st.booleans()
                | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20),
                lambda inner: (
                    st.lists(inner, max_size=4)
                    | st.dictionaries(
                        st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=5), inner, max_size=4
                    )
                ),
                max_leaves=12,
            ),
            max_size=5,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_any_json_body_round_trips(tmp_path, bodies):
    path = tmp_path / f"ledger-{hashlib.sha256(repr(bodies).encode()).hexdigest()[:12]}.jsonl"
    with LedgerWriter(path) as writer:
        for body in bodies:
            writer.append("note", body)
    assert [r.body for r in read_records(path)] == bodies
    assert verify_ledger(path).count == len(bodies)


# --- THREATS row 1: every single bit ------------------------------------------------------


def test_every_single_bit_flip_is_detected_and_names_the_record(ledger_path):
    write_ledger(ledger_path)
    original = ledger_path.read_bytes()
    line_of_byte = []
    for number, line in enumerate(original.splitlines(keepends=True)):
        line_of_byte += [number] * len(line)
    assert len(original) * 8 > 2000  # every one of these is tried
    for position in range(len(original)):
        record = line_of_byte[position]
        for bit in range(8):
            tampered = bytearray(original)
            tampered[position] ^= 1 << bit
            ledger_path.write_bytes(bytes(tampered))
            named = f"record {record} (line {record + 1})"
            with pytest.raises((TamperedError, TruncatedError)) as verified:
                verify_ledger(ledger_path)
            assert named in str(verified.value), (position, bit, str(verified.value))
            with pytest.raises((TamperedError, TruncatedError)) as read:
                list(read_records(ledger_path))
            assert named in str(read.value), (position, bit, str(read.value))
            # Appending to it is refused too, and the refusal alters nothing.
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a torn-tail repair would show up as an error here
                with pytest.raises((TamperedError, TruncatedError)):
                    LedgerWriter(ledger_path)
            assert ledger_path.read_bytes() == bytes(tampered)


# --- THREATS row 2: delete, duplicate, insert, reorder ------------------------------------


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize(
    ("name", "edit", "first_bad"),
    [
        ("delete first", lambda ls: ls[1:], 0),
        ("delete middle", lambda ls: ls[:1] + ls[2:], 1),
        ("duplicate", lambda ls: ls[:2] + ls[1:], 2),
        ("duplicate last", lambda ls: [*ls, ls[-1]], 4),
        ("reorder", lambda ls: [ls[0], ls[2], ls[1], ls[3]], 1),
        ("reverse", lambda ls: ls[::-1], 0),
    ],
)
def test_deleted_duplicated_and_reordered_records_are_detected(ledger_path, name, edit, first_bad):
    write_ledger(ledger_path)
    _rewrite(ledger_path, edit(lines_of(ledger_path)))
    with pytest.raises(TamperedError, match=rf"record {first_bad} \(line {first_bad + 1}\)"):
        verify_ledger(ledger_path)
    with pytest.raises(TamperedError):
        list(read_records(ledger_path))
    with pytest.raises(TamperedError):
        LedgerWriter(ledger_path)


def test_inserted_records_are_detected(ledger_path):
    write_ledger(ledger_path)
    lines = lines_of(ledger_path)
    records = list(read_records(ledger_path))
    # A well-formed record chained onto record 1, slipped in before record 2.
    forged, _ = forge_line(2, "step", {"loss": "float32:00000000", "step": 2}, bytes.fromhex(records[1].hash))
    _rewrite(ledger_path, [*lines[:2], forged, *lines[2:]])
    with pytest.raises(TamperedError, match=r"record 3 \(line 4\).*expected seq 3, found 2"):
        verify_ledger(ledger_path)
    # Renumbering what follows without re-hashing breaks the chain at the next record.
    renumbered = [lines[2].replace(b'"seq":2,', b'"seq":3,'), lines[3].replace(b'"seq":3,', b'"seq":4,')]
    _rewrite(ledger_path, [*lines[:2], forged, *renumbered])
    with pytest.raises(TamperedError, match=r"record 3 \(line 4\).*does not match the chain"):
        verify_ledger(ledger_path)


def test_edited_body_is_detected_even_with_a_valid_looking_hash_field(ledger_path):
    write_ledger(ledger_path)
    lines = lines_of(ledger_path)
    lines[1] = lines[1].replace(b"3f8ccccd", b"3f8ccccc")
    _rewrite(ledger_path, lines)
    with pytest.raises(TamperedError, match=r"record 1 \(line 2\): content does not match the chain"):
        verify_ledger(ledger_path)


# --- THREATS row 3: truncation and rewrites -----------------------------------------------


def test_truncation_is_caught_by_an_earlier_head(ledger_path):
    head = write_ledger(ledger_path)
    lines = lines_of(ledger_path)
    for keep in range(len(lines)):
        _rewrite(ledger_path, lines[:keep])
        shorter = verify_ledger(ledger_path)  # on its own the shorter chain is valid ...
        assert shorter.count == keep
        with pytest.raises(TruncatedError, match=f"has {keep} records, but a trusted head recorded 4"):
            verify_ledger(ledger_path, head=head)  # ... but not against the head taken earlier


def test_a_rewrite_with_a_valid_chain_is_caught_by_the_head(ledger_path, tmp_path):
    head = write_ledger(ledger_path)
    forged_entries = list(BODIES)
    forged_entries[1] = ("step", {"loss": "float32:00000000", "step": 1})
    forged_path = tmp_path / "forged.jsonl"
    write_ledger(forged_path, forged_entries)
    ledger_path.write_bytes(forged_path.read_bytes())
    assert verify_ledger(ledger_path).count == 4  # internally consistent
    with pytest.raises(TamperedError, match=r"record 3 has hash .* trusted head says .*rewritten"):
        verify_ledger(ledger_path, head=head)
    # A longer rewrite still has to contain the head's record at the head's position.
    with LedgerWriter(ledger_path) as writer:
        writer.append("note", {}, durable=True)
    with pytest.raises(TamperedError, match="rewritten"):
        verify_ledger(ledger_path, head=head)


def test_an_honest_ledger_that_grew_verifies_against_an_old_head(ledger_path):
    old = write_ledger(ledger_path, BODIES[:2])
    with LedgerWriter(ledger_path) as writer:
        writer.append("step", {"step": 2}, durable=True)
    assert verify_ledger(ledger_path, head=old).count == 3
    assert verify_ledger(ledger_path, head=LedgerHead(0, "0" * 64)).count == 3


def test_ledger_head_json_round_trip():
    head = LedgerHead(12, "ab" * 32)
    assert LedgerHead.from_json(json.loads(json.dumps(head.to_json()))) == head
    assert str(head) == f"12 records, head {'ab' * 32}"
    assert LedgerHead.from_json({"count": 0, "hash": "0" * 64}) == LedgerHead(0, "0" * 64)


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "12 records",
        {},
        {"count": 1},
        {"hash": "ab" * 32},
        {"count": -1, "hash": "ab" * 32},
        {"count": True, "hash": "ab" * 32},
        {"count": 1.0, "hash": "ab" * 32},
        {"count": "1", "hash": "ab" * 32},
        {"count": 1, "hash": "AB" * 32},
        {"count": 1, "hash": "ab" * 31},
        {"count": 1, "hash": "ab" * 32 + "\n"},
        {"count": 1, "hash": 5},
        {"count": 0, "hash": "ab" * 32},  # an empty ledger's head is the genesis hash
    ],
)
def test_malformed_heads_are_refused(data):
    with pytest.raises(MalformedFileError, match="not a ledger head"):
        LedgerHead.from_json(data)


# --- THREATS row 12: malformed lines, bounded memory --------------------------------------


def test_empty_line_is_refused(ledger_path):
    write_ledger(ledger_path)
    lines = lines_of(ledger_path)
    _rewrite(ledger_path, [*lines[:2], b"\n", *lines[2:]])
    with pytest.raises(TamperedError, match=r"record 2 \(line 3\): not a ledger record"):
        verify_ledger(ledger_path)
    ledger_path.write_bytes(b"\n")
    with pytest.raises(TamperedError, match=r"record 0 \(line 1\)"):
        verify_ledger(ledger_path)


def test_a_line_cut_in_the_middle_is_refused(ledger_path):
    write_ledger(ledger_path)
    lines = lines_of(ledger_path)
    # cut at the end of the file: the ledger lost its end
    _rewrite(ledger_path, [*lines[:3], lines[3][:40]])
    with pytest.raises(TruncatedError, match=r"record 3 \(line 4\): ends without a newline"):
        verify_ledger(ledger_path)
    with pytest.raises(TruncatedError):
        list(read_records(ledger_path))
    # cut in the middle of the file: the cut line runs into the next one
    _rewrite(ledger_path, [lines[0], lines[1][:40], *lines[2:]])
    with pytest.raises(TamperedError, match=r"record 1 \(line 2\)"):
        verify_ledger(ledger_path)


def test_non_utf8_bytes_are_refused(ledger_path):
    write_ledger(ledger_path)
    lines = lines_of(ledger_path)
    lines[2] = lines[2].replace(b"checkpoints/a", b"checkpoints/\xff")
    _rewrite(ledger_path, lines)
    with pytest.raises(TamperedError, match=r"record 2 \(line 3\)"):
        verify_ledger(ledger_path)
    # Even with the chain recomputed over the bad bytes, decoding refuses them by name.
    payload = b'{"body":{"file":"\xff\xfe"},"kind":"checkpoint","seq":0}'
    digest = record_hash(GENESIS, payload)
    ledger_path.write_bytes(payload[:-1] + b',"hash":"' + digest.hex().encode() + b'"}\n')
    assert verify_ledger(ledger_path).count == 1  # the chain alone does not decode JSON
    with pytest.raises(MalformedFileError, match="record 0 is not valid UTF-8"):
        list(read_records(ledger_path))


@pytest.mark.parametrize(
    "payload",
    [
        b'{"body":{"x":"\\ud800"},"kind":"note","seq":0}',  # a lone surrogate: not encodable
        b'{"body":{"x":"\\u0041"},"kind":"note","seq":0}',  # escaped where canonical JSON is not
        b'{"body":{"b":1,"a":2},"kind":"note","seq":0}',  # keys out of order
        b'{"body":{"x":1.0e0},"kind":"note","seq":0}',  # another spelling of 1.0
        b'{"body":{"x":1,"x":2},"kind":"note","seq":0}',  # duplicate key
        b'{"body":[1],"kind":"note","seq":0}',  # body not an object
    ],
)
def test_chained_but_non_canonical_records_are_refused_on_read(ledger_path, payload):
    digest = record_hash(GENESIS, payload)
    ledger_path.write_bytes(payload[:-1] + b',"hash":"' + digest.hex().encode() + b'"}\n')
    with pytest.raises((TamperedError, MalformedFileError), match="record 0"):
        list(read_records(ledger_path))


class _RecordingHandle:
    """Wraps a file to record how much each readline may return."""

    def __init__(self, handle: Any, limits: list[int], lengths: list[int]) -> None:
        self._handle, self._limits, self._lengths = handle, limits, lengths

    def readline(self, limit: int = -1) -> bytes:
        self._limits.append(limit)
        line = self._handle.readline(limit)
        self._lengths.append(len(line))
        return line

    def __enter__(self) -> _RecordingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def test_an_absurdly_long_line_is_refused_with_bounded_memory(ledger_path, monkeypatch):
    monkeypatch.setattr(ledger, "MAX_LINE_BYTES", 4096)
    write_ledger(ledger_path, BODIES[:1])
    with ledger_path.open("ab") as handle:
        handle.write(b'{"body":{"x":"' + b"A" * (16 << 20) + b'"},"kind":"note","seq":1}')  # 16 MiB, no newline
    limits: list[int] = []
    lengths: list[int] = []
    real_open = ledger._open_ledger
    monkeypatch.setattr(ledger, "_open_ledger", lambda path: _RecordingHandle(real_open(path), limits, lengths))
    tracemalloc.start()
    try:
        with pytest.raises(TamperedError, match=r"line 2: longer than 4096 bytes"):
            verify_ledger(ledger_path)
        with pytest.raises(TamperedError, match="longer than"):
            list(read_records(ledger_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert limits and all(0 < limit <= 4097 for limit in limits)
    assert max(lengths) <= 4097
    assert peak < 1 << 20  # the 16 MiB line was never held in memory


def test_a_record_over_the_line_limit_is_not_written(ledger_path, monkeypatch):
    monkeypatch.setattr(ledger, "MAX_LINE_BYTES", 256)
    with LedgerWriter(ledger_path) as writer:
        writer.append("note", {"x": 1}, durable=True)
        with pytest.raises(UsageError, match="exceeds the 256-byte line limit"):
            writer.append("note", {"x": "y" * 300}, durable=True)
        writer.append("note", {"x": 2}, durable=True)
    assert [r.body for r in read_records(ledger_path)] == [{"x": 1}, {"x": 2}]


# --- reopening after a crash, and refusing a tampered ledger ------------------------------


def test_a_torn_last_line_is_removed_with_a_warning(ledger_path):
    head = write_ledger(ledger_path, BODIES[:3])
    durable = ledger_path.read_bytes()
    with LedgerWriter(ledger_path) as writer:
        writer.append("run_end", {"steps": 1}, durable=True)
    last = lines_of(ledger_path)[-1]
    for cut in range(1, len(last) - 1):  # every partial write of the last record
        ledger_path.write_bytes(durable + last[:cut])
        with pytest.warns(UserWarning, match=f"removing {cut} bytes of a record cut short"):
            writer = LedgerWriter(ledger_path)
        assert writer.head == head
        assert ledger_path.read_bytes() == durable
        writer.append("run_end", {"steps": 1}, durable=True)
        writer.close()
        assert ledger_path.read_bytes() == durable + last


def test_a_torn_first_line_leaves_an_empty_ledger(ledger_path):
    write_ledger(ledger_path, BODIES[:1])
    ledger_path.write_bytes(ledger_path.read_bytes()[:30])
    with pytest.warns(UserWarning, match="cut short"), LedgerWriter(ledger_path) as writer:
        assert writer.head == LedgerHead(0, "0" * 64)
        writer.append("run_start", {"run_id": "r2"}, durable=True)
    assert [r.body for r in read_records(ledger_path)] == [{"run_id": "r2"}]


def test_a_complete_last_record_missing_only_its_newline_is_kept(ledger_path):
    head = write_ledger(ledger_path)
    whole = ledger_path.read_bytes()
    ledger_path.write_bytes(whole[:-1])
    with pytest.raises(TruncatedError):
        verify_ledger(ledger_path)
    with pytest.warns(UserWarning, match="lacked its newline"), LedgerWriter(ledger_path) as writer:
        assert writer.head == head  # the record is kept, not dropped
    assert ledger_path.read_bytes() == whole


def test_a_replaced_final_newline_refuses_to_reopen(ledger_path):
    write_ledger(ledger_path)
    tampered = ledger_path.read_bytes()[:-1] + b" "
    ledger_path.write_bytes(tampered)
    with pytest.raises(TamperedError, match="final newline was replaced"):
        LedgerWriter(ledger_path)
    assert ledger_path.read_bytes() == tampered


def test_a_tampered_ledger_refuses_to_reopen_and_is_left_alone(ledger_path):
    write_ledger(ledger_path)
    lines = lines_of(ledger_path)
    lines[1] = lines[1].replace(b'"step":1', b'"step":9')
    tampered = b"".join(lines) + b'{"body":{},"kind":"step"'  # plus a torn tail
    ledger_path.write_bytes(tampered)
    with pytest.warns(UserWarning, match="cut short"), pytest.raises(TamperedError, match=r"record 1 \(line 2\)"):
        LedgerWriter(ledger_path)
    # The torn tail was never part of any record; everything recorded is untouched.
    assert ledger_path.read_bytes() == b"".join(lines)


def test_symlinked_and_missing_ledgers(tmp_path, ledger_path):
    write_ledger(ledger_path)
    link = tmp_path / "link.jsonl"
    link.symlink_to(ledger_path)
    with pytest.raises(UnsafePathError, match="symlink"):
        verify_ledger(link)
    with pytest.raises(UnsafePathError, match="symlink"):
        list(read_records(link))
    with pytest.raises(UnsafePathError, match="symlink"):
        LedgerWriter(link)
    with pytest.raises(MissingFileError, match="no ledger"):
        verify_ledger(tmp_path / "absent.jsonl")


def test_failures_are_verification_failures_not_input_errors(ledger_path):
    write_ledger(ledger_path)
    _rewrite(ledger_path, lines_of(ledger_path)[1:])
    with pytest.raises(VerificationFailure):
        verify_ledger(ledger_path)
