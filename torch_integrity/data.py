"""Deterministic, recordable data pipelines.

The callback instruments the training DataLoader *in place* (Lightning keeps using the
same object) so that:

* every sample's randomness is a pure function of (run seed, epoch, batch index,
  position in batch): each fetch runs under a forked RNG whose seed travels *with the
  index* (:class:`SeededIndex`), so it is the same in any worker, with persistent
  workers, after a resume, or in a replay;
* the sampler runs in an :class:`~torch_integrity.rng.IsolatedStream` seeded per epoch,
  so data order never consumes or depends on the model's RNG stream, and a resume can
  regenerate an epoch's order and fast-forward it;
* the indices of every batch are queued in order as the sampler hands them out; the
  DataLoader delivers batches in that order (``in_order=True``), so the callback pops
  exactly the indices of the batch it is given, whatever the workers prefetch.

A replay puts the sampler wrapper in replay mode: it yields the recorded indices.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset

from torch_integrity.errors import UsageError
from torch_integrity.rng import IsolatedStream, derive_seed, forked_rng

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class SeededIndex:
    """A dataset index carrying the seed its fetch must run under."""

    index: Any
    seed: int
    batch_seed: int


_current = threading.local()


def batch_seed(run_seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    """Seed of one batch's randomness (each distributed rank gets its own)."""
    if rank == 0:
        return derive_seed(run_seed, "batch", epoch, batch_idx)
    return derive_seed(run_seed, "batch", epoch, batch_idx, "rank", rank)


def sample_seed(seed_of_batch: int, position: int) -> int:
    """Seed of the sample at ``position`` in a batch."""
    return (seed_of_batch + (position + 1) * _GOLDEN) & _MASK


@dataclass
class RngPolicy:
    """Whether a fetch in this process must save the global RNGs and put them back.

    A callback that restores the training RNG at the start of every training batch turns
    ``restore_outer`` off while training runs (saving NumPy's global state alone costs
    about 0.1 ms per sample); anything fetched outside training still restores. Worker
    processes get a copy taken when they start; there the outer state matters to no one.
    """

    restore_outer: bool = True


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset; a :class:`SeededIndex` fetch runs under its own seed."""

    def __init__(self, dataset: Any, policy: RngPolicy | None = None) -> None:
        self.dataset = dataset
        self.policy = policy or RngPolicy()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, SeededIndex):
            _current.batch_seed = item.batch_seed
            with forked_rng(item.seed, restore=self.policy.restore_outer):
                return self.dataset[item.index]
        return self.dataset[item]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getstate__(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "policy": self.policy}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.dataset = state["dataset"]
        self.policy = state.get("policy") or RngPolicy()


class SeededBatchDataset(SeededDataset):
    """For datasets with ``__getitems__`` (whole-batch fetch): one seed per batch."""

    def __getitems__(self, items: Sequence[Any]) -> Any:
        if items and isinstance(items[0], SeededIndex):
            _current.batch_seed = items[0].batch_seed
            with forked_rng(items[0].batch_seed, restore=self.policy.restore_outer):
                return self.dataset.__getitems__([i.index for i in items])
        return self.dataset.__getitems__(list(items))


class SeededCollate:
    """Runs the user's collate function under the current batch's seed."""

    def __init__(self, collate_fn: Callable[[Any], Any], policy: RngPolicy | None = None) -> None:
        self.collate_fn = collate_fn
        self.policy = policy or RngPolicy()

    def __call__(self, samples: Any) -> Any:
        seed = getattr(_current, "batch_seed", None)
        if seed is None:
            return self.collate_fn(samples)
        _current.batch_seed = None
        with forked_rng(derive_seed(seed, "collate"), restore=self.policy.restore_outer):
            return self.collate_fn(samples)


@dataclass(frozen=True)
class IterationPlan:
    """How the next pass over the sampler must go.

    Attributes:
        epoch: the epoch the pass belongs to (seeds derive from it).
        skip: batches of the regenerated order to drop (resume mid-epoch).
        replay: recorded ``(batch_idx, indices)`` to yield instead of sampling.
    """

    epoch: int
    skip: int = 0
    replay: Sequence[tuple[int, Any]] | None = None


class Controller(Protocol):
    """What a :class:`RecordingSampler` asks of the callback that owns it."""

    run_seed: int
    rank: int

    def plan_iteration(self) -> IterationPlan: ...


def _to_json_index(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_to_json_index(v) for v in value]
    try:
        import numpy as np

        if isinstance(value, np.generic | np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def _find_generators(obj: Any, depth: int = 0) -> list[torch.Generator]:
    found: list[torch.Generator] = []
    if depth > 3 or obj is None:
        return found
    generator = getattr(obj, "generator", None)
    if isinstance(generator, torch.Generator):
        found.append(generator)
    for name in ("sampler", "batch_sampler"):
        inner = getattr(obj, name, None)
        if inner is not None and inner is not obj:
            found.extend(g for g in _find_generators(inner, depth + 1) if all(g is not f for f in found))
    return found


class RecordingSampler:
    """Wraps the DataLoader's index sampler (batch sampler, or sampler without batching)."""

    def __init__(self, inner: Any, controller: Controller, *, batched: bool, policy: RngPolicy | None = None) -> None:
        self.inner = inner
        self.controller = controller
        self.batched = batched
        self.policy = policy or RngPolicy()
        self.pending: deque[tuple[int, int, Any]] = deque()
        self._generators = _find_generators(inner)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _emit(self, epoch: int, batch_idx: int, indices: Any) -> Any:
        seed = batch_seed(self.controller.run_seed, epoch, batch_idx, self.controller.rank)
        self.pending.append((epoch, batch_idx, _to_json_index(indices)))
        if self.batched:
            return [SeededIndex(index, sample_seed(seed, j), seed) for j, index in enumerate(indices)]
        return SeededIndex(indices, seed, seed)

    def __iter__(self) -> Iterator[Any]:
        plan = self.controller.plan_iteration()
        self.pending.clear()
        if plan.replay is not None:
            for batch_idx, indices in plan.replay:
                yield self._emit(plan.epoch, batch_idx, indices)
            return
        stream = IsolatedStream(derive_seed(self.controller.run_seed, "sampler", plan.epoch), self._generators)
        with stream.active(restore_outside=self.policy.restore_outer):
            iterator = iter(self.inner)
        batch_idx = 0
        while True:
            with stream.active(restore_outside=self.policy.restore_outer):
                try:
                    indices = next(iterator)
                except StopIteration:
                    return
            if batch_idx >= plan.skip:
                yield self._emit(plan.epoch, batch_idx, list(indices) if self.batched else indices)
            batch_idx += 1

    def pop(self) -> tuple[int, int, Any] | None:
        """Indices of the next batch the training loop receives (FIFO)."""
        return self.pending.popleft() if self.pending else None


@dataclass
class Instrumented:
    """What instrumenting one DataLoader produced."""

    loader: Any
    sampler: RecordingSampler | None
    iterable: bool
    policy: RngPolicy = field(default_factory=RngPolicy)


def instrument_dataloader(loader: Any, controller: Controller) -> Instrumented:
    """Instrument a training DataLoader in place (see module docstring).

    The result's ``policy`` is shared by the wrappers (see :class:`RngPolicy`).

    DataLoader refuses ordinary attribute assignment of its sampler and dataset after
    construction; we bypass that guard deliberately (``object.__setattr__``) so that
    Lightning and the user keep the very object they built, subclass included.
    """
    if not isinstance(loader, DataLoader):
        return Instrumented(loader, None, iterable=True)
    if isinstance(loader.dataset, IterableDataset):
        if loader.generator is None:
            # each iterator draws a base seed from loader.generator, else from the global (training)
            # RNG; a replay that restarts an epoch creates one more iterator than the run did
            private = torch.Generator()
            private.manual_seed(derive_seed(controller.run_seed, "loader-base-seed"))
            object.__setattr__(loader, "generator", private)
        return Instrumented(loader, None, iterable=True)
    if not getattr(loader, "in_order", True):
        raise UsageError(
            "the training DataLoader has in_order=False: batches arrive in whatever order workers finish, "
            "so neither the recorded indices nor a replay can be exact. Use in_order=True."
        )
    existing = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    if isinstance(existing, RecordingSampler):
        object.__setattr__(existing, "controller", controller)
        return Instrumented(loader, existing, iterable=False, policy=existing.policy)
    dataset = loader.dataset
    policy = RngPolicy()
    wrap = SeededBatchDataset if callable(getattr(dataset, "__getitems__", None)) else SeededDataset
    wrapper = wrap(dataset, policy)
    object.__setattr__(loader, "dataset", wrapper)
    if loader.batch_sampler is not None:
        sampler = RecordingSampler(loader.batch_sampler, controller, batched=True, policy=policy)
        object.__setattr__(loader, "batch_sampler", sampler)
    else:
        sampler = RecordingSampler(loader.sampler, controller, batched=False, policy=policy)
        object.__setattr__(loader, "sampler", sampler)
    object.__setattr__(loader, "collate_fn", SeededCollate(loader.collate_fn, policy))
    private = torch.Generator()
    private.manual_seed(derive_seed(controller.run_seed, "loader-base-seed"))
    object.__setattr__(loader, "generator", private)
    return Instrumented(loader, sampler, iterable=False, policy=policy)


def restore_rng_around_fetches(loaders: Sequence[Instrumented], restore: bool) -> None:
    """Switch whether this process's fetches put the global RNGs back (see :class:`RngPolicy`)."""
    for item in loaders:
        item.policy.restore_outer = restore
