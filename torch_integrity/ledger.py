"""The append-only, hash-chained ledger (``ledger.jsonl``).

Each line is one record::

    {"body":{...},"kind":"step","seq":7,"hash":"<64 hex>"}

The part before ``,"hash"`` is the canonical JSON (sorted keys, no whitespace, UTF-8)
of ``{"body","kind","seq"}``; call it the payload. A record's hash is::

    SHA-256("torch-integrity:ledger:v1\\0" || prev || payload)

where ``prev`` is the previous record's hash (32 zero bytes for the first record).
``prev`` is therefore bound into every hash but not repeated on disk: it is always the
hash on the line before. Editing, inserting, deleting or reordering any record breaks
the chain at that record. Truncation leaves a valid but shorter chain: it is caught by
comparing against a :class:`LedgerHead` copied elsewhere earlier (or signed, see
``torch_integrity.signing``), or by the absence of the ``run_end`` record.

Reading is streaming with a hard per-line limit, so a hostile file cannot exhaust
memory. Step records are buffered; records written with ``durable=True`` (run start,
checkpoints, run end) are flushed and fsynced before ``append`` returns.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from torch_integrity.canonical import canonical_json, strict_loads
from torch_integrity.errors import MalformedFileError, TamperedError, TruncatedError, UnsafePathError, UsageError
from torch_integrity.fsutil import fsync_directory

LEDGER_FILE = "ledger.jsonl"
MAX_LINE_BYTES = 64 << 20
GENESIS = bytes(32)
_DOMAIN = b"torch-integrity:ledger:v1\x00"
_DOMAIN_HASHER = hashlib.sha256(_DOMAIN)
_HASH_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"}\n\Z')
_SEQ_TAIL = re.compile(rb',"kind":"([a-z_]{1,64})","seq":(0|[1-9][0-9]{0,17})\Z')
_HASH_SUFFIX_BYTES = len(b',"hash":""}\n') + 64  # the one length a line's hash field has
_SEQ_TAIL_MAX_BYTES = len(b',"kind":"","seq":') + 64 + 18  # the longest match of _SEQ_TAIL


@dataclass(frozen=True)
class Record:
    """One ledger record.

    Attributes:
        seq: position in the ledger, from 0.
        kind: ``run_start``, ``step``, ``checkpoint``, ``run_end``, ...
        prev: hex hash of the previous record (64 zeros for the first).
        body: the record's content.
        hash: hex hash of this record.
    """

    seq: int
    kind: str
    prev: str
    body: dict[str, Any]
    hash: str


@dataclass(frozen=True)
class LedgerHead:
    """A ledger's length and last hash: copy it elsewhere to catch later truncation.

    Attributes:
        count: number of records.
        hash: hex hash of the last record (64 zeros for an empty ledger).
    """

    count: int
    hash: str

    def to_json(self) -> dict[str, Any]:
        """Plain JSON form."""
        return {"count": self.count, "hash": self.hash}

    @classmethod
    def from_json(cls, data: Any) -> LedgerHead:
        """Parse the form written by :meth:`to_json`."""
        if (
            not isinstance(data, dict)
            or type(data.get("count")) is not int
            or not isinstance(data.get("hash"), str)
            or not re.fullmatch(r"[0-9a-f]{64}", data["hash"])
            or data["count"] < 0
            or (data["count"] == 0 and data["hash"] != GENESIS.hex())
        ):
            raise MalformedFileError(f"not a ledger head: {data!r}")
        return cls(data["count"], data["hash"])

    def __str__(self) -> str:
        return f"{self.count} records, head {self.hash}"


def record_hash(prev: bytes, payload: bytes) -> bytes:
    """Chain hash of one record's payload given the previous hash."""
    hasher = _DOMAIN_HASHER.copy()  # cheaper than hashing the domain tag again for every record
    hasher.update(prev)
    hasher.update(payload)
    return hasher.digest()


def encode_record(seq: int, kind: str, body: dict[str, Any], prev: bytes) -> tuple[bytes, bytes]:
    """Return ``(line, hash)`` for a new record."""
    payload = canonical_json({"body": body, "kind": kind, "seq": seq})
    digest = record_hash(prev, payload)
    return payload[:-1] + b',"hash":"' + digest.hex().encode() + b'"}\n', digest


def _lines(handle: BinaryIO, path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line)`` with bounded memory; over-long lines are refused."""
    number = 0
    while True:
        line = handle.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise TamperedError(f"{path} line {number}: longer than {MAX_LINE_BYTES} bytes; not a record we wrote")
        yield number, line


def _check_line(path: Path, number: int, line: bytes, prev: bytes, expect_seq: int) -> tuple[bytes, bytes, bytes]:
    """Verify one line against the chain; return ``(hash, kind as ASCII bytes, payload)``."""
    if not line.endswith(b"\n"):
        raise TruncatedError(f"{_where(path, expect_seq, number)}: ends without a newline; the ledger was cut mid-record")
    # This runs once per record, so it is kept lean: the hash field has a fixed length and
    # is compared as bytes (a non-hex value cannot equal the computed hex), and the seq
    # pattern, which ends at the end of its input, is searched only over the last bytes.
    start = len(line) - _HASH_SUFFIX_BYTES
    if start < 0 or line[start : start + 9] != b',"hash":"' or line[-3:] != b'"}\n':
        raise TamperedError(f"{_where(path, expect_seq, number)}: not a ledger record (no hash field where one belongs)")
    payload = line[:start] + b"}"
    tail = _SEQ_TAIL.search(payload, max(0, start - _SEQ_TAIL_MAX_BYTES), start)
    if tail is None or not payload.startswith(b'{"body":'):
        raise TamperedError(f"{_where(path, expect_seq, number)}: record layout is not canonical")
    seq = int(tail.group(2))
    if seq != expect_seq:
        raise TamperedError(
            f"{_where(path, expect_seq, number)}: expected seq {expect_seq}, found {seq} "
            "(record deleted, inserted or reordered)"
        )
    computed = record_hash(prev, payload)
    stored = line[start + 9 : -3]
    if computed.hex().encode() != stored:
        raise TamperedError(
            f"{_where(path, expect_seq, number)}: content does not match the chain; expected hash {computed.hex()}, "
            f"record says {stored.decode('ascii', 'replace')} (this record or the one before it was altered)"
        )
    return computed, tail.group(1), payload


def _where(path: Path, seq: int, number: int) -> str:
    return f"{path} record {seq} (line {number})"


def read_records(path: Path) -> Iterator[Record]:
    """Read and verify a ledger record by record.

    Raises:
        TamperedError: the first record that breaks the chain, named by seq and line.
        TruncatedError: the file ends in a partial record.
    """
    prev = GENESIS
    with _open_ledger(path) as handle:
        for number, line in _lines(handle, path):
            digest, kind, payload = _check_line(path, number, line, prev, number - 1)
            decoded = strict_loads(payload, what=f"{path} record {number - 1}")
            if not isinstance(decoded, dict) or not isinstance(decoded.get("body"), dict):
                raise TamperedError(f"{path} record {number - 1}: body is not an object")
            try:
                canonical: bytes | None = canonical_json(decoded)
            except ValueError:  # e.g. a lone surrogate escape, which UTF-8 cannot encode
                canonical = None
            if canonical != payload:
                raise TamperedError(f"{path} record {number - 1}: payload is not canonical JSON")
            yield Record(number - 1, kind.decode(), prev.hex(), decoded["body"], digest.hex())
            prev = digest


def verify_ledger(path: Path, *, head: LedgerHead | None = None) -> LedgerHead:
    """Verify the whole chain (no JSON decoding); optionally against an earlier head.

    Args:
        path: the ``ledger.jsonl`` file.
        head: a head taken earlier; the ledger must still contain it as a prefix.

    Returns:
        The current head.

    Raises:
        TamperedError: a record was edited, inserted, deleted or reordered.
        TruncatedError: the ledger is shorter than ``head``, or was cut mid-record.
    """
    prev = GENESIS
    count = 0
    with _open_ledger(path) as handle:
        for number, line in _lines(handle, path):
            prev, _, _ = _check_line(path, number, line, prev, count)
            count += 1
            if head is not None and count == head.count and prev.hex() != head.hash:
                raise TamperedError(
                    f"{path}: record {count - 1} has hash {prev.hex()}, but the trusted head "
                    f"says {head.hash}; the ledger was rewritten"
                )
    if head is not None and count < head.count:
        raise TruncatedError(f"{path} has {count} records, but a trusted head recorded {head.count}: records were removed")
    return LedgerHead(count, prev.hex())


def _open_ledger(path: Path) -> BinaryIO:
    if path.is_symlink():
        from torch_integrity.errors import UnsafePathError

        raise UnsafePathError(f"{path} is a symlink; refusing to read it")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        from torch_integrity.errors import MissingFileError

        raise MissingFileError(f"no ledger at {path}") from None


class LedgerWriter:
    """Appends records to a ledger, continuing an existing chain.

    Opening verifies the existing chain. A last line cut short by a crash (never
    fsynced, never acknowledged) is removed with a warning; anything else wrong is
    refused, so nothing recorded is ever altered.

    Example:
        >>> import tempfile, pathlib
        >>> ledger = LedgerWriter(pathlib.Path(tempfile.mkdtemp()) / "ledger.jsonl")
        >>> ledger.append("note", {"x": 1}, durable=True).seq
        0
        >>> ledger.close()
    """

    def __init__(self, path: Path, *, flush_every: int = 256) -> None:
        self.path = path
        self.flush_every = flush_every
        self._pending = 0
        if path.is_symlink():
            raise UnsafePathError(f"{path} is a symlink; refusing to append to it")
        if path.exists():
            self._drop_torn_tail()
            head = verify_ledger(path)
        else:
            head = LedgerHead(0, GENESIS.hex())
        self._next_seq = head.count
        self._prev = bytes.fromhex(head.hash)
        try:
            self._handle: BinaryIO | None = open(path, "ab", buffering=1 << 20)  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"cannot open the ledger {path} for appending: {exc.strerror}") from None
        if head.count == 0:
            fsync_directory(path.parent)

    @property
    def head(self) -> LedgerHead:
        """Head including every appended record (buffered ones too)."""
        return LedgerHead(self._next_seq, self._prev.hex())

    def _drop_torn_tail(self) -> None:
        with open(self.path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            # Find the start of the partial last line, reading backwards in blocks.
            position = size
            while position > 0:
                step = min(1 << 16, position)
                position -= step
                handle.seek(position)
                block = handle.read(step)
                cut = block.rfind(b"\n")
                if cut >= 0:
                    position += cut + 1
                    break
            if size - position <= MAX_LINE_BYTES and self._tail_is_whole_record(handle, position, size):
                return
            warnings.warn(
                f"{self.path}: removing {size - position} bytes of a record cut short by a crash "
                "(it was never made durable)",
                stacklevel=3,
            )
            handle.truncate(position)
            handle.flush()
            os.fsync(handle.fileno())

    def _tail_is_whole_record(self, handle: BinaryIO, position: int, size: int) -> bool:
        """Handle a last line that is a complete, chained record but for its newline.

        A crash can cut a record anywhere, but a record whose chain hash checks out is
        whole: dropping it would lose a record. If only the newline is missing, add
        it; if the newline was replaced by another byte, that is tampering.
        """
        prev = GENESIS
        if position > 0:
            handle.seek(max(0, position - 67))
            before = handle.read(position - max(0, position - 67))
            try:
                prev = bytes.fromhex(before[:64].decode("ascii")) if len(before) == 67 else b""
            except ValueError:
                prev = b""
        handle.seek(position)
        tail = handle.read(size - position)
        for candidate, newline_replaced in ((tail + b"\n", False), (tail[:-1] + b"\n", True)):
            match = _HASH_SUFFIX.search(candidate)
            if match is None or record_hash(prev, candidate[: match.start()] + b"}").hex() != match.group(1).decode():
                continue
            if newline_replaced:
                raise TamperedError(
                    f"{self.path}: the last record is complete but its final newline was replaced "
                    f"by {tail[-1:]!r}; refusing to append"
                )
            warnings.warn(f"{self.path}: the last record lacked its newline; adding it", stacklevel=4)
            handle.seek(size)
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            return True
        return False

    def append(self, kind: str, body: dict[str, Any], *, durable: bool = False) -> Record:
        """Append one record; with ``durable`` it is on disk when this returns."""
        if self._handle is None:
            raise UsageError(f"ledger {self.path} is closed")
        if not re.fullmatch(r"[a-z_]{1,64}", kind):
            raise UsageError(f"record kind {kind!r} must be lowercase letters and underscores")
        line, digest = encode_record(self._next_seq, kind, body, self._prev)
        if len(line) > MAX_LINE_BYTES:
            raise UsageError(f"a {kind} record of {len(line)} bytes exceeds the {MAX_LINE_BYTES}-byte line limit")
        record = Record(self._next_seq, kind, self._prev.hex(), body, digest.hex())
        self._handle.write(line)
        self._next_seq += 1
        self._prev = digest
        self._pending += 1
        if durable:
            self.flush(durable=True)
        elif self._pending >= self.flush_every:
            self.flush(durable=False)
        return record

    def flush(self, *, durable: bool = True) -> None:
        """Hand buffered records to the OS; with ``durable``, also fsync them."""
        if self._handle is None:
            return
        self._handle.flush()
        if durable:
            os.fsync(self._handle.fileno())
        self._pending = 0

    def close(self) -> None:
        """Flush durably and close."""
        if self._handle is not None:
            self.flush(durable=True)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
