"""The k-of-n approval policy: which keys may approve model weights, and how many must.

A policy file::

    {"threshold": 2,
     "keys": [{"id": "ed25519:...", "public_key": "<base64 raw key or PEM>", "name": "alice"},
              ...],
     "comment": "optional"}

Each key's ``id`` must match its public key and no key may be listed twice, so no signer
is ever counted twice. :func:`torch_integrity.approvals.check_approvals` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch_integrity.canonical import strict_loads
from torch_integrity.errors import MalformedFileError
from torch_integrity.keys import PublicKey, parse_public_key, read_small_file


@dataclass(frozen=True)
class PolicyKey:
    """A key a policy authorizes: the key and a human name for reports."""

    key: PublicKey
    name: str


@dataclass(frozen=True)
class Policy:
    """Who may approve, and how many must.

    Attributes:
        threshold: the number of distinct keys required (k of n).
        keys: key id -> authorized key.
    """

    threshold: int
    keys: Mapping[str, PolicyKey]

    @property
    def public_keys(self) -> dict[str, PublicKey]:
        """Key id -> public key."""
        return {key_id: entry.key for key_id, entry in self.keys.items()}

    @classmethod
    def from_json(cls, data: Any, *, what: str = "policy") -> Policy:
        """Validate a parsed policy document.

        Each key's ``id`` must equal the id derived from its ``public_key`` and a key may
        appear only once, so no signer can be counted twice.

        Raises:
            MalformedFileError: anything malformed, inconsistent or duplicated.
        """
        if not isinstance(data, dict) or set(data) - {"threshold", "keys", "comment"}:
            raise MalformedFileError(f"{what}: expected an object with threshold and keys (and an optional comment)")
        threshold, entries = data.get("threshold"), data.get("keys")
        if not isinstance(entries, list) or not entries:
            raise MalformedFileError(f"{what}: keys must be a non-empty list")
        if type(threshold) is not int or not 1 <= threshold <= len(entries):
            raise MalformedFileError(f"{what}: threshold must be an integer from 1 to {len(entries)}, got {threshold!r}")
        keys: dict[str, PolicyKey] = {}
        for index, entry in enumerate(entries):
            label = f"{what} key {index}"
            if not isinstance(entry, dict) or not isinstance(entry.get("public_key"), str):
                raise MalformedFileError(f"{label}: needs a public_key string")
            key = parse_public_key(entry["public_key"], what=label)
            claimed = entry.get("id", key.key_id)
            if claimed != key.key_id:
                raise MalformedFileError(f"{label}: id {claimed!r} does not match its public key (id {key.key_id})")
            if key.key_id in keys:
                raise MalformedFileError(f"{label}: key {key.key_id} is listed twice; each key counts once")
            name = entry.get("name", key.key_id)
            if not isinstance(name, str):
                raise MalformedFileError(f"{label}: name must be a string")
            keys[key.key_id] = PolicyKey(key, name)
        return cls(threshold, keys)


def load_policy(path: Path | str) -> Policy:
    """Read and validate a policy file (see the module docstring for its format).

    Raises:
        UsageError: the file is missing.
        MalformedFileError: it is not a valid policy.
    """
    data = strict_loads(read_small_file(Path(path), "policy file"), what=f"policy {path}")
    return Policy.from_json(data, what=f"policy {path}")
