"""Random number generator state: capture, restore, and isolated streams.

Every RNG that training touches in the main process is captured as plain values
(lists of ints) or byte tensors, never as numpy objects or pickles:

* Python's ``random`` module, NumPy's legacy global ``RandomState``,
* torch's CPU generator and every CUDA device's generator,
* any extra ``torch.Generator`` objects handed in (e.g. DataLoader generators).

:class:`IsolatedStream` runs code against a private RNG stream that is a pure function
of a seed: the global generators are swapped out before and back in after, so the code
neither consumes nor depends on the training stream. The data pipeline runs under such
streams, which makes data order and augmentation reproducible anywhere (any worker,
any resume point) and keeps the model's stream untouched.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from torch_integrity.errors import MalformedFileError


def derive_seed(*parts: object) -> int:
    """A 64-bit seed that is a pure function of ``parts`` (ints and strings).

    Example:
        >>> derive_seed(1, "epoch", 0) == derive_seed(1, "epoch", 0)
        True
    """
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return struct.unpack("<Q", hashlib.sha256(b"torch-integrity:seed:v1\x00" + text).digest()[:8])[0]


def cuda_index(device: torch.device) -> int | None:
    """The CUDA device index a process trains on, or None when it does not train on CUDA."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def capture_global_rng(cuda_device: int | None = None) -> dict[str, Any]:
    """Capture the global RNGs as storable values.

    Args:
        cuda_device: the CUDA device this process trains on; its generator's state is
            captured too (``"cuda"``: a one-item list). Other devices' generators are
            not: they draw nothing for this process's training, and a replay may run on
            another device index or on a machine with fewer GPUs.
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "algorithm": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if cuda_device is not None:
        state["cuda"] = [torch.cuda.get_rng_state(cuda_device)]
    return state


def restore_global_rng(state: dict[str, Any], cuda_device: int | None = None) -> None:
    """Restore what :func:`capture_global_rng` captured.

    Args:
        state: the captured state.
        cuda_device: the CUDA device this process trains on. The recorded CUDA state goes
            to its generator, whatever device index it was recorded on. Without one
            (training on CPU, or replaying a GPU run on CPU), recorded CUDA states are
            left unused.
    """
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        npy = state["numpy"]
        keys = npy["keys"]
        keys_array = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys, dtype=np.uint32)
        np.random.set_state(
            (npy["algorithm"], keys_array.astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"]))
        )
        torch.set_rng_state(_byte_tensor(state["torch"]))
        cuda = state.get("cuda") or []
        if not isinstance(cuda, list):
            raise TypeError("cuda must be a list")
        if cuda and cuda_device is not None:
            # one state: the recording process's own device. Several (written before only the
            # training device was kept): all of that machine's devices, by index.
            recorded = cuda[0] if len(cuda) == 1 else cuda[cuda_device] if cuda_device < len(cuda) else None
            if recorded is None:
                raise MalformedFileError(f"the checkpoint holds no RNG state for CUDA device {cuda_device}")
            torch.cuda.set_rng_state(_byte_tensor(recorded), cuda_device)
        else:
            for value in cuda:
                _byte_tensor(value)  # malformed entries are refused even when unused
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedFileError(f"malformed RNG state: {exc}") from None


def _byte_tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise MalformedFileError("RNG state must be a uint8 tensor")
    return value.contiguous()


def generator_states(generators: Sequence[torch.Generator]) -> list[torch.Tensor]:
    """States of extra generators, in order."""
    return [g.get_state() for g in generators]


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.random.default_generator.manual_seed(seed)


@contextmanager
def forked_rng(seed: int, *, restore: bool = True) -> Iterator[None]:
    """Run a block with the global CPU RNGs seeded from ``seed``, then put them back.

    CUDA generators are not touched: data pipelines run on the CPU. With
    ``restore=False`` the outside state is neither saved nor put back (saving NumPy's
    global state alone costs about 0.1 ms): for callers that restore the global RNGs
    themselves before anything that depends on them runs.
    """
    if not restore:
        _seed_globals(seed)
        yield
        return
    py = random.getstate()
    npy = np.random.get_state()
    cpu = torch.get_rng_state()
    _seed_globals(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)


class IsolatedStream:
    """A private RNG stream that survives between uses.

    Each :meth:`active` block sees the stream's own state for the global CPU RNGs and
    for the given ``generators``; on exit the stream's state is saved and the outside
    state restored. The stream starts from ``seed``.
    """

    def __init__(self, seed: int, generators: Sequence[torch.Generator] = ()) -> None:
        self._generators = list(generators)
        saved = self._capture()
        _seed_globals(seed)
        for index, generator in enumerate(self._generators):
            generator.manual_seed(derive_seed(seed, "generator", index))
        self._state = self._capture()
        self._restore(saved)

    def _capture(self) -> tuple[Any, Any, torch.Tensor, list[torch.Tensor]]:
        return (random.getstate(), np.random.get_state(), torch.get_rng_state(), generator_states(self._generators))

    def _restore(self, state: tuple[Any, Any, torch.Tensor, list[torch.Tensor]]) -> None:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        for generator, value in zip(self._generators, state[3], strict=True):
            generator.set_state(value)

    @contextmanager
    def active(self, *, restore_outside: bool = True) -> Iterator[None]:
        """Swap this stream in for the duration of the block.

        With ``restore_outside=False`` the outside state is not put back (see
        :func:`forked_rng`); the stream's own state is kept either way.
        """
        outside = self._capture() if restore_outside else None
        self._restore(self._state)
        try:
            yield
        finally:
            self._state = self._capture()
            if outside is not None:
                self._restore(outside)
