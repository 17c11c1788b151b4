"""Ed25519 signing keys: generate them, store them, load them, name them.

All the cryptography is the ``cryptography`` package's Ed25519; nothing here is hand
made. A key is named by its **key id**, derived from the public key alone::

    key id = "ed25519:" + hex(SHA-256(raw 32-byte public key)[:16])

so two people holding the same public key always agree on its id, and a policy file
cannot give one key two ids.

Files written by :func:`generate_key_files` (``torch-integrity keygen --out NAME``):

* ``NAME``: the private key, PEM PKCS#8 (encrypted when a passphrase is given),
  created with mode ``0600`` from its first byte (never readable by others, not even
  for a moment), never overwriting an existing file;
* ``NAME.pub``: the public key, PEM SubjectPublicKeyInfo.

Public keys are also accepted as the base64 of the raw 32 bytes (the form policy files
use, see :attr:`PublicKey.base64`).

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> public = generate_key_files(folder / "alice")
    >>> load_public_key(folder / "alice.pub") == public
    True
    >>> private = load_private_key(folder / "alice")
    >>> public.verify(private.sign(b"hi"), b"hi")
    True
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from torch_integrity.errors import MalformedFileError, MissingFileError, UnsafePathError, UsageError
from torch_integrity.fsutil import fsync_directory, read_file_bytes

KEY_ID_PREFIX = "ed25519:"
PUBLIC_SUFFIX = ".pub"
MAX_KEY_FILE_BYTES = 64 << 10
_RAW_KEY_BYTES = 32


def key_id_for(raw_public_key: bytes) -> str:
    """The key id of a raw 32-byte Ed25519 public key.

    Example:
        >>> key_id_for(bytes(32))
        'ed25519:66687aadf862bd776c8fc18b8e9f8e20'
    """
    if len(raw_public_key) != _RAW_KEY_BYTES:
        raise UsageError(f"an Ed25519 public key is {_RAW_KEY_BYTES} bytes, got {len(raw_public_key)}")
    return KEY_ID_PREFIX + hashlib.sha256(raw_public_key).digest()[:16].hex()


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key and its key id.

    Attributes:
        key_id: ``ed25519:<32 hex>``, derived from ``raw``.
        raw: the 32 raw public key bytes.
    """

    key_id: str
    raw: bytes = field(repr=False)

    @classmethod
    def from_raw(cls, raw: bytes) -> PublicKey:
        """Wrap 32 raw bytes (the key id is computed, never taken on trust)."""
        return cls(key_id_for(raw), bytes(raw))

    @property
    def base64(self) -> str:
        """Standard base64 of the raw key: the form used in policy files."""
        return base64.b64encode(self.raw).decode("ascii")

    def to_pem(self) -> bytes:
        """PEM SubjectPublicKeyInfo, as in ``NAME.pub``."""
        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(bytes(signature), bytes(message))
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class PrivateKey:
    """An Ed25519 private key with its public half.

    Attributes:
        public: the matching :class:`PublicKey`.
    """

    public: PublicKey
    _key: Ed25519PrivateKey = field(repr=False, compare=False)

    @classmethod
    def generate(cls) -> PrivateKey:
        """A fresh key from the operating system's random source."""
        return cls._wrap(Ed25519PrivateKey.generate())

    @classmethod
    def _wrap(cls, key: Ed25519PrivateKey) -> PrivateKey:
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(PublicKey.from_raw(raw), key)

    @property
    def key_id(self) -> str:
        """The public key's id."""
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``message``."""
        return self._key.sign(bytes(message))

    def to_pem(self, *, passphrase: bytes | None = None) -> bytes:
        """PEM PKCS#8, encrypted with ``passphrase`` when one is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def read_small_file(path: Path, what: str) -> bytes:
    """Read a small file the user named (key, policy); missing files are usage errors."""
    try:
        return bytes(read_file_bytes(Path(path), max_bytes=MAX_KEY_FILE_BYTES))
    except (MissingFileError, UnsafePathError) as exc:
        raise UsageError(f"cannot read {what}: {exc}") from None


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start; refuse if anything is there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise UsageError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # the umask may only have removed bits; make the mode exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def generate_key_files(out: Path | str, *, passphrase: bytes | None = None) -> PublicKey:
    """Generate a key pair: private key ``out`` (mode 0600) and public key ``out.pub``.

    Args:
        out: path of the private key file; the public key goes to ``out`` + ``.pub``.
        passphrase: encrypt the private key with it (PKCS#8 best available encryption).

    Returns:
        The new public key (its ``key_id`` names it everywhere).

    Raises:
        UsageError: either file already exists, or the folder is not writable.
    """
    private_path = Path(out)
    public_path = private_path.with_name(private_path.name + PUBLIC_SUFFIX)
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise UsageError(f"{path} already exists; refusing to overwrite a key file")
    if not private_path.parent.is_dir():
        raise UsageError(f"{private_path.parent} is not a directory")
    key = PrivateKey.generate()
    _create_exclusive(private_path, key.to_pem(passphrase=passphrase), 0o600)
    try:
        _create_exclusive(public_path, key.public.to_pem(), 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            private_path.unlink()
        raise
    fsync_directory(private_path.parent)
    return key.public


def load_private_key(path: Path | str, *, passphrase: bytes | None = None) -> PrivateKey:
    """Load a PEM PKCS#8 Ed25519 private key written by :func:`generate_key_files`.

    Like OpenSSH, a private key file that group or others may read is refused.

    Raises:
        UsageError: missing file, permissions too open, encrypted without a passphrase.
        MalformedFileError: not an Ed25519 private key, or the passphrase is wrong.
    """
    path = Path(path)
    data = read_small_file(path, "private key")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise UsageError(
            f"private key {path} has mode {mode:04o}; it must be readable by its owner only (chmod 600 {path})"
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        raise UsageError(f"private key {path}: {exc} (encrypted keys need a passphrase)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise MalformedFileError(f"{path} is not a readable PEM private key (or the passphrase is wrong): {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise MalformedFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return PrivateKey._wrap(key)


def parse_public_key(text: str | bytes, *, what: str = "public key") -> PublicKey:
    """Parse a public key given as PEM SubjectPublicKeyInfo or as base64 of the raw 32 bytes.

    Raises:
        MalformedFileError: anything else (private keys included).
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        if b"PRIVATE KEY" in stripped.split(b"\n", 1)[0]:
            raise MalformedFileError(f"{what} is a private key; give the public key (NAME.pub) instead")
        try:
            key = serialization.load_pem_public_key(stripped)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise MalformedFileError(f"{what} is not a readable PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise MalformedFileError(f"{what} is a {type(key).__name__}, not an Ed25519 public key")
        return PublicKey.from_raw(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedFileError(f"{what} is neither PEM nor base64") from None
    if len(raw) != _RAW_KEY_BYTES:
        raise MalformedFileError(f"{what} decodes to {len(raw)} bytes; a raw Ed25519 public key is {_RAW_KEY_BYTES}")
    return PublicKey.from_raw(raw)


def load_public_key(path: Path | str) -> PublicKey:
    """Load a public key file (``NAME.pub``, PEM, or base64 of the raw key).

    Raises:
        UsageError: the file is missing.
        MalformedFileError: it holds no Ed25519 public key.
    """
    return parse_public_key(read_small_file(Path(path), "public key"), what=f"public key file {path}")


#: What callers may pass as trusted keys: keys, or paths of public key files.
KeySource = PublicKey | str | os.PathLike[str]


def load_public_keys(keys: KeySource | Iterable[KeySource]) -> dict[str, PublicKey]:
    """Key id -> key for :class:`PublicKey` objects and/or public key file paths.

    Raises:
        UsageError: no keys were given, or a key file is missing.
        MalformedFileError: a file holds no Ed25519 public key.
    """
    items: Iterable[KeySource] = [keys] if isinstance(keys, PublicKey | str | os.PathLike) else keys
    result: dict[str, PublicKey] = {}
    for item in items:
        if isinstance(item, PublicKey):
            key = item
        elif isinstance(item, str | os.PathLike):
            key = load_public_key(Path(item))
        else:
            raise UsageError(f"expected a PublicKey or a path to a public key file, got {type(item).__name__}")
        result[key.key_id] = key
    if not result:
        raise UsageError("no trusted public keys were given")
    return result
