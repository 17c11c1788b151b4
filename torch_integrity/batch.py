"""Content digests of training batches (``sha256-batch-v2``).

A batch is whatever the DataLoader yields. It is encoded exactly as a dataset sample is
(:mod:`torch_integrity.sample_digest`: type tags, length prefixes, dict entries sorted by
key, tensors and arrays as dtype, shape and raw little-endian bytes, dataclasses and
plain objects as their type name and fields), under its own domain tag::

    SHA-256(b"torch-integrity:batch:v2\\x00" || encode(batch))
"""

from __future__ import annotations

import hashlib
from typing import Any

from torch_integrity.deferred import Later
from torch_integrity.digest import Digest
from torch_integrity.sample_digest import encode_later

BATCH_ALGORITHM = "sha256-batch-v2"
_DOMAIN = b"torch-integrity:batch:v2\x00"


def digest_batch(batch: Any) -> Digest:
    """SHA-256 content digest of a batch.

    Args:
        batch: what the DataLoader yielded.

    Returns:
        A ``sha256-batch-v2`` digest.

    Example:
        >>> import torch
        >>> digest_batch((torch.ones(2), 3)) == digest_batch((torch.ones(2), 3))
        True
    """
    return Digest(BATCH_ALGORITHM, digest_batch_later(batch).result())


def digest_batch_later(batch: Any) -> Later[str]:
    """The hex ``sha256-batch-v2`` digest of a batch, without waiting for a GPU.

    Equal to ``digest_batch(batch).hex`` of the batch as it is now. Batches in CPU memory
    are hashed at once; the bytes of CUDA tensors are copied to the host asynchronously
    and hashed when :meth:`~torch_integrity.deferred.Later.result` is called.
    """
    fed = encode_later(hashlib.sha256(_DOMAIN), batch)
    return Later(lambda: fed.result().hexdigest())
