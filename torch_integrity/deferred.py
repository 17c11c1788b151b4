"""Step-record values read from a GPU without making the host wait for it.

A step record needs host values computed from device tensors: the batch's content digest,
the loss bits, the weight fingerprint. Reading them at once (``.cpu()``, ``.item()``)
makes the host wait until the GPU has finished the step, so the host can no longer queue
the next step's kernels while the GPU runs this one. Instead, each such value starts an
asynchronous device-to-host copy into pinned memory and is read later, when its record
is written: :class:`~torch_integrity.capture.IntegrityCallback` writes step records a few
steps behind training on CUDA.

The copies see exactly what the training step saw:

- small tensors (a loss, fingerprint sums, token batches) are copied on the current
  stream, right after the work that produced them and before any later work;
- larger tensors (image batches) are first cloned on the current stream (a
  device-to-device copy, ordered before anything that could change the batch in place),
  and the clone travels to the host on a side stream, so the training stream pays only
  for the clone.

CPU tensors are read at once: there is nothing to wait for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")

#: Device tensors up to this size are copied on the current stream; larger ones are
#: cloned there and copied to the host on a side stream.
DIRECT_COPY_BYTES = 1 << 16

_side_streams: dict[int, Any] = {}


class Later(Generic[T]):
    """A value computed on the first :meth:`result` call, then kept.

    Example:
        >>> Later(lambda: 2 + 3).result(), Later.ready("x").result()
        (5, 'x')
    """

    __slots__ = ("_compute", "_value")

    def __init__(self, compute: Callable[[], T]) -> None:
        self._compute: Callable[[], T] | None = compute
        self._value: T | None = None

    @classmethod
    def ready(cls, value: T) -> Later[T]:
        """A value that is already known."""
        done: Later[T] = cls(lambda: value)
        done.result()
        return done

    def result(self) -> T:
        if self._compute is not None:
            self._value = self._compute()
            self._compute = None
        return self._value  # type: ignore[return-value]


def resolve(value: Any) -> Any:
    """``value`` with every :class:`Later` inside it (in dicts and lists) replaced by its result."""
    if isinstance(value, Later):
        return resolve(value.result())
    if isinstance(value, dict):
        return {key: resolve(item) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item) for item in value]
    return value


def deferrable(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor`` on the host can be put off (it lives on a CUDA device)."""
    return tensor.device.type == "cuda"


class HostCopy:
    """The bytes of a flat ``uint8`` CUDA tensor, on their way to pinned host memory.

    Starting the copy never waits for the GPU; :meth:`bytes` waits for this copy only.
    """

    __slots__ = ("_event", "_host")

    def __init__(self, flat: torch.Tensor) -> None:
        if flat.dtype != torch.uint8 or flat.dim() != 1 or not deferrable(flat):
            raise ValueError("HostCopy takes a flat uint8 CUDA tensor")
        self._host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
        self._event = torch.cuda.Event()
        current = torch.cuda.current_stream(flat.device)
        if flat.numel() <= DIRECT_COPY_BYTES:  # (an empty tensor copies nothing)
            self._host.copy_(flat, non_blocking=True)
            self._event.record(current)
            return
        snapshot = flat.clone()  # on the current stream: later in-place changes cannot reach it
        side = _side_stream(flat.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._host.copy_(snapshot, non_blocking=True)
            self._event.record(side)
        snapshot.record_stream(side)  # its memory is not reused before the side stream is done

    def bytes(self) -> memoryview:
        """The tensor's bytes (waits for the copy if it has not finished)."""
        self._event.synchronize()
        return self._host.numpy().data.cast("B")


def _side_stream(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        stream = _side_streams[index] = torch.cuda.Stream(device=index)
    return stream


def host_snapshot(value: Any) -> tuple[Any, Callable[[], None]]:
    """A private host copy of every tensor in ``value`` (nested dicts, lists, tuples).

    CUDA tensors are copied into pinned memory on the current stream without waiting (so
    the copy holds them as the work queued so far leaves them); CPU tensors are cloned;
    tensors on other devices are copied to the host at once.
    Other values are shared. Returns the copy and a function that waits until every
    device copy has arrived; call it before reading the copy's tensors.
    """
    devices: set[torch.device] = set()

    def copy(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            data = item.detach()
            if not deferrable(data):  # a CPU clone; other devices (MPS, ...) copied to the host now
                return data.clone() if data.device.type == "cpu" else data.cpu()
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            host.copy_(data, non_blocking=True)
            devices.add(data.device)
            return host
        if isinstance(item, dict):
            return {key: copy(v) for key, v in item.items()}
        if isinstance(item, list):
            return [copy(v) for v in item]
        if isinstance(item, tuple) and not hasattr(item, "_fields"):
            return tuple(copy(v) for v in item)
        return item

    snapshot = copy(value)
    events = []
    for device in devices:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append(event)

    def arrived() -> None:
        for event in events:
            event.synchronize()

    return snapshot, arrived
