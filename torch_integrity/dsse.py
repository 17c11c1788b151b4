"""DSSE envelopes: the one signed container everything in torch-integrity uses.

An envelope (https://github.com/secure-systems-lab/dsse, envelope.md)::

    {"payload": "<base64 body>", "payloadType": "<type>",
     "signatures": [{"keyid": "<key id>", "sig": "<base64 Ed25519 signature>"}]}

Every signature covers the pre-authentication encoding (protocol.md)::

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

with SP an ASCII space and LEN the byte length in ASCII decimal without leading zeros.
The payload type is inside what is signed, so a body signed as one type (a seal) never
verifies as another (an approval, an in-toto statement). Base64 is written in the
standard alphabet; both standard and URL-safe are read, as the spec allows.

Payload types used by this project:

* ``application/vnd.torch-integrity.seal+json``: a ledger seal (:mod:`torch_integrity.signing`);
* ``application/vnd.torch-integrity.approval+json``: an approval (:mod:`torch_integrity.approvals`);
* ``application/vnd.in-toto+json``: an in-toto Statement (:mod:`torch_integrity.attest`).

Example:
    >>> pae("application/example", b"hello")
    b'DSSEv1 19 application/example 5 hello'
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch_integrity.canonical import strict_loads
from torch_integrity.errors import MalformedFileError, UsageError
from torch_integrity.fsutil import read_file_bytes
from torch_integrity.keys import PrivateKey, PublicKey

MAX_ENVELOPE_BYTES = 16 << 20


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
