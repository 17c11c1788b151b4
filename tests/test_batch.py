"""Batch digests share the sample encoding under their own domain tag."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from torch_integrity.batch import BATCH_ALGORITHM, digest_batch
from torch_integrity.digest import Digest
from torch_integrity.sample_digest import digest_sample, encode_into


@dataclass
class Pair:
    features: torch.Tensor
    label: int


class Plain:
    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens


def test_batch_digest_is_the_sample_encoding_under_the_batch_domain() -> None:
    batch = (torch.arange(6).reshape(2, 3), [1, "a", None], {"mask": torch.ones(2, dtype=torch.bool)})
    hasher = hashlib.sha256(b"torch-integrity:batch:v2\x00")
    encode_into(hasher, batch)
    assert digest_batch(batch) == Digest(BATCH_ALGORITHM, hasher.hexdigest())
    assert digest_batch(batch).hex != digest_sample(batch).hex  # domain separation
    assert Digest.parse(str(digest_batch(batch))).is_secure


def test_dataclasses_and_plain_objects_are_hashed_by_type_and_fields() -> None:
    a = Pair(torch.zeros(3), 1)
    assert digest_batch(a) == digest_batch(Pair(torch.zeros(3), 1))
    assert digest_batch(a) != digest_batch(Pair(torch.zeros(3), 2))
    assert digest_batch(a) != digest_batch({"features": torch.zeros(3), "label": 1})  # the type name counts
    assert digest_batch(Plain(torch.ones(2))) != digest_batch(Plain(torch.zeros(2)))


def test_one_changed_element_changes_the_digest() -> None:
    batch = torch.randn(4, 8)
    changed = batch.clone()
    changed[3, 7] = torch.nextafter(changed[3, 7], torch.tensor(10.0))
    assert digest_batch(batch) != digest_batch(changed)
    assert digest_batch(batch) == digest_batch(batch.t().contiguous().t())  # layout does not matter
