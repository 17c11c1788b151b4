"""The thin layer between Lightning's internals and torch-integrity's plain functions.

Everything here touches Lightning objects; everything it calls works on tensors,
dicts and paths. Private Lightning attributes used (and why) are listed in
``docs/design-decisions.md``.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from torch_integrity.deferred import HostCopy, Later, deferrable
from torch_integrity.digest import StateDigest, digest_state_dict, dtype_name
from torch_integrity.errors import UsageError
from torch_integrity.rundir import open_run
from torch_integrity.safetensors_io import DTYPE_CODES


def storable(value: Any, path: str, dropped: list[str]) -> Any:
    """A copy of ``value`` that the pickle-free store can hold.

    Values it cannot hold (arbitrary objects in hyperparameters or callback states)
    are replaced by ``{"$unstored": repr}`` and their paths listed in ``dropped``.
    """
    if isinstance(value, torch.Tensor):
        if value.dtype in DTYPE_CODES and value.layout == torch.strided and not value.is_quantized:
            return value
        dropped.append(path)
        return {"$unstored": f"tensor of dtype {value.dtype}"}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, Mapping):
        if all(isinstance(k, str | int | float | bool) or k is None for k in value):
            return {k: storable(v, f"{path}/{k}", dropped) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v, f"{path}/{i}", dropped) for i, v in enumerate(value)]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(storable(v, f"{path}/{i}", dropped) for i, v in enumerate(value))
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    dropped.append(path)
    return {"$unstored": repr(value)[:200]}


def json_safe(value: Any, depth: int = 0) -> Any:
    """Best-effort JSON view of hyperparameters (for the ledger's ``run_start``)."""
    if depth > 20:
        return repr(value)[:200]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth + 1) for v in value]
    return {"$repr": repr(value)[:200]}


def loss_bits(outputs: Any) -> str | None:
    """Exact bits of the training loss as ``dtype:hex`` (None when there is no loss)."""
    return loss_bits_later(outputs).result()


def loss_bits_later(outputs: Any) -> Later[str | None]:
    """:func:`loss_bits`, read from a CUDA loss without waiting for the GPU (see ``deferred``)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        return Later.ready(None)
    value = loss.detach().reshape(1)
    name = dtype_name(value.dtype)
    if deferrable(value):
        copy = HostCopy(value.view(torch.uint8))
        return Later(lambda: f"{name}:{bytes(copy.bytes())[::-1].hex()}")
    return Later.ready(f"{name}:{value.cpu().view(torch.uint8).numpy().tobytes()[::-1].hex()}")


def _host_float(copy: HostCopy, dtype: torch.dtype) -> float:
    return float(torch.frombuffer(bytearray(copy.bytes()), dtype=dtype)[0])


def float_bits(value: float) -> str:
    """IEEE-754 bits of a Python float, as 16 hex digits (big-endian)."""
    return struct.pack(">d", value).hex()


def optimizer_lrs(optimizer: torch.optim.Optimizer) -> list[Any]:
    """The learning rate of each parameter group, as recorded (float, or str for odd values).

    A tensor learning rate on a CUDA device (``capturable`` optimizers) is read later,
    without waiting for the GPU: its entry is a :class:`~torch_integrity.deferred.Later`
    (see :func:`torch_integrity.deferred.resolve`).
    """
    rates: list[Any] = []
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor) and lr.numel() == 1 and deferrable(lr):
            value = lr.detach().reshape(1)
            copy = HostCopy(value.view(torch.uint8))
            rates.append(Later(partial(_host_float, copy, value.dtype)))
            continue
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        rates.append(float(lr) if isinstance(lr, int | float) else str(lr))
    return rates


def dump_training_state(trainer: pl.Trainer) -> dict[str, Any]:
    """Lightning's full checkpoint dict (model, optimizers, schedulers, loops, callbacks).

    Uses ``trainer._checkpoint_connector.dump_checkpoint``: the same function
    ``trainer.save_checkpoint`` uses, without handing the result to a pickling writer.
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def optimizer_tensors(optimizer_states: Any) -> dict[str, torch.Tensor]:
    """Flatten Lightning's ``optimizer_states`` list into ``{"0/state/3/exp_avg": tensor}``."""
    flat: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            flat[path] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{path}/{key}" if path else str(key))
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                walk(item, f"{path}/{index}" if path else str(index))

    walk(list(optimizer_states or []), "")
    return flat


def state_digests(checkpoint: Mapping[str, Any]) -> tuple[StateDigest, StateDigest]:
    """Digests of the model state dict and of the optimizer tensors of a Lightning dict."""
    model = digest_state_dict(dict(checkpoint.get("state_dict", {})))
    optimizer = digest_state_dict(optimizer_tensors(checkpoint.get("optimizer_states")))
    return model, optimizer


class IntegrityCheckpointIO(CheckpointIO):
    """Loads torch-integrity checkpoints pickle-free; everything else goes to ``inner``.

    A checkpoint path inside the run directory's ``checkpoints/`` is loaded only after
    the run's ledger verifies and the file matches the digest the ledger recorded.
    """

    def __init__(self, inner: CheckpointIO, run_dir: Path, on_load: Callable[[Any, dict[str, Any]], None]) -> None:
        self.inner = inner
        self.run_dir = run_dir.resolve()
        self.on_load = on_load

    def is_ours(self, path: Any) -> bool:
        """Whether ``path`` is a checkpoint of our run directory."""
        try:
            candidate = Path(path).resolve()
        except (TypeError, OSError):
            return False
        return candidate.parent == self.run_dir / "checkpoints" and candidate.suffix == ".safetensors"

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not self.is_ours(path):
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        history = open_run(self.run_dir)
        relative = f"checkpoints/{Path(path).name}"
        entries = [c for c in history.checkpoints if c.path == relative]
        if not entries:
            raise UsageError(f"{path} is not recorded in the ledger of {self.run_dir}; refusing to resume from it")
        entry = entries[-1]
        from torch_integrity.audit import verify_checkpoint  # audit builds on this module

        state = verify_checkpoint(history, entry)
        self.on_load(entry, state)
        return state

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)


def install(trainer: pl.Trainer, io: IntegrityCheckpointIO, instrument: Callable[[Any], None]) -> Callable[[], None]:
    """Install the checkpoint IO and the DataLoader hook; returns a function undoing both."""
    strategy = trainer.strategy
    previous_io = strategy.checkpoint_io
    strategy.checkpoint_io = io
    original = strategy.process_dataloader

    def process_dataloader(dataloader: object) -> object:
        dataloader = original(dataloader)
        if trainer.training and not trainer.sanity_checking:
            instrument(dataloader)
        return dataloader

    strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]

    def undo() -> None:
        strategy.checkpoint_io = previous_io
        if strategy.__dict__.get("process_dataloader") is process_dataloader:
            del strategy.__dict__["process_dataloader"]

    return undo


def gather(trainer: pl.Trainer, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (a one-item list without distributed training).

    Objects travel between the run's own processes over its process group (pickled by
    torch.distributed); nothing read from a file is ever unpickled.
    """
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, _to_wire(value))
    return [_from_wire(item) for item in gathered]


def _to_wire(value: Any) -> Any:
    """Tensors as (dtype, shape, bytes): all_gather_object cannot carry CPU tensors reliably."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        return ("$tensor", dtype_name(data.dtype), list(data.shape), data.reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_wire(v) for v in value]
    return value


def _from_wire(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 4 and value[0] == "$tensor":
        _, dtype, shape, raw = value
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(getattr(torch, dtype)).reshape(shape)
    if isinstance(value, dict):
        return {k: _from_wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_wire(v) for v in value]
    return value


def warn(message: str) -> None:
    """A user-visible warning (rank zero only is the caller's job)."""
    warnings.warn(message, UserWarning, stacklevel=3)
