"""``IntegrityCallback``: record a verifiable, resumable training run.

Add one callback to a Lightning ``Trainer``::

    trainer = L.Trainer(deterministic=True, callbacks=[IntegrityCallback("runs/exp1")])
    trainer.fit(model, datamodule)

The run directory then holds a hash-chained ledger (``run_start``, one ``step`` record
per optimizer step, ``checkpoint`` records, ``run_end``) and pickle-free checkpoints
(step 0 always). ``trainer.fit(model, data, ckpt_path="runs/exp1/checkpoints/step-...")``
with the callback on the same directory resumes bit for bit and continues the ledger.

Hooks stay thin: each is a guard plus a call into plain functions (digests, ledger,
store, data instrumentation).
"""

from __future__ import annotations

import os
import secrets
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from torch_integrity import lightning_glue as glue
from torch_integrity.batch import BATCH_ALGORITHM, digest_batch_later
from torch_integrity.data import Instrumented, IterationPlan, instrument_dataloader, restore_rng_around_fetches
from torch_integrity.deferred import Later, host_snapshot, resolve
from torch_integrity.digest import digest_state_dict
from torch_integrity.environment import code_digest, describe_environment, import_path
from torch_integrity.errors import UsageError
from torch_integrity.fingerprint import FINGERPRINT_ALGORITHM, fingerprint_later
from torch_integrity.fsutil import TEMP_PREFIX
from torch_integrity.ledger import LEDGER_FILE, LedgerWriter
from torch_integrity.rng import capture_global_rng, cuda_index, derive_seed, restore_global_rng
from torch_integrity.rundir import CHECKPOINT_DIR, RUN_FORMAT, checkpoint_relative_path, state_digest_to_json
from torch_integrity.store import save_checkpoint

STATE_FORMAT = "torch-integrity-callback-state-v1"

#: On CUDA, step records are written this many optimizer steps behind training, so that
#: reading their device values (batch digest, loss, fingerprint) never waits for the GPU.
CUDA_RECORD_LAG = 2
#: Step-record fields whose values may be :class:`~torch_integrity.deferred.Later`.
_DEFERRED_FIELDS = frozenset({"data", "loss", "lr", "fp"})


@dataclass
class _PendingStep:
    """Micro-batches seen since the last optimizer step."""

    epoch: int = 0
    batch_indices: list[int] = field(default_factory=list)
    indices: list[Any] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    data: list[Later[str]] = field(default_factory=list)
    losses: list[Later[str | None]] = field(default_factory=list)
    lrs: list[list[Any]] = field(default_factory=list)  # floats, or Later values read from a GPU
    real_steps: int = 0


class IntegrityCallback(Callback):
    """Records deterministic training state into a tamper-evident run directory.

    Args:
        run_dir: the run directory (created if missing). It must be empty or hold this
            same run (when resuming with ``ckpt_path`` pointing at one of its checkpoints).
        checkpoint_every_n_steps: take a checkpoint every N optimizer steps (segments
            of N steps are what verifiers replay). Step 0 is always captured.
        seed: run seed for data order and per-sample randomness. Default: the seed
            given to ``seed_everything`` (``PL_GLOBAL_SEED``), else a fresh random one.
            It is recorded either way.
        fingerprint_every_n_steps: record a fast weight fingerprint every N steps
            (0 = never). It lets a replay say at which step weights first diverged;
            the checkpoints' SHA-256 digests decide integrity either way.
        record_indices: record the sample indices of every batch.
        data_manifest: optional dataset manifest (path) the run's samples belong to;
            its root is bound into ``run_start``.
        flush_every: step records buffered before they are handed to the OS.
        background_checkpoints: write checkpoint files and compute their digests on a
            background thread while training goes on (the training loop waits only for
            a host copy of the state; one write at a time). Its ledger record is written
            once the file is complete, before any later step record.

    Example:
        >>> cb = IntegrityCallback("runs/demo", checkpoint_every_n_steps=50)  # doctest: +SKIP
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        checkpoint_every_n_steps: int = 100,
        seed: int | None = None,
        fingerprint_every_n_steps: int = 0,
        record_indices: bool = True,
        data_manifest: str | os.PathLike[str] | None = None,
        flush_every: int = 256,
        background_checkpoints: bool = True,
    ) -> None:
        if not isinstance(checkpoint_every_n_steps, int) or checkpoint_every_n_steps < 1:
            raise UsageError(f"checkpoint_every_n_steps must be a positive int, got {checkpoint_every_n_steps!r}")
        if not isinstance(fingerprint_every_n_steps, int) or fingerprint_every_n_steps < 0:
            raise UsageError(f"fingerprint_every_n_steps must be an int >= 0, got {fingerprint_every_n_steps!r}")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise UsageError(f"seed must be a non-negative int, got {seed!r}")
        self.run_dir = Path(run_dir)
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.fingerprint_every_n_steps = fingerprint_every_n_steps
        self.record_indices = record_indices
        self.data_manifest = Path(data_manifest) if data_manifest is not None else None
        self.flush_every = flush_every
        self.background_checkpoints = background_checkpoints
        self._outbox: deque[tuple[str, dict[str, Any] | Future[dict[str, Any]]]] = deque()  # for the ledger, in order
        self._writer: ThreadPoolExecutor | None = None
        self.run_seed: int = seed if seed is not None else -1  # chosen in setup when not given
        self.run_id = ""
        self._ledger: LedgerWriter | None = None
        self._undo: Any = None
        self._loaders: list[Instrumented] = []
        self._resume: dict[str, Any] | None = None  # callback state loaded from the resume checkpoint
        self._resume_entry: Any = None
        self._restore_rng_at_next_batch: dict[str, Any] | None = None
        self._pending = _PendingStep()
        self._unwritten: deque[tuple[dict[str, Any], dict[str, Any]]] = deque()  # step records not yet written
        self._record_lag = 0
        self._last_global_step = 0
        self._hooks: list[Any] = []
        self._fingerprint_key = 0
        self._last_checkpoint_step = -1
        self._active = False
        self.rank = 0
        self.world_size = 1
        self._rng_per_rank: list[Any] | None = None
        self._cuda_device: int | None = None  # the CUDA device this process trains on

    # ---- identity -------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return "IntegrityCallback"

    def state_dict(self) -> dict[str, Any]:
        """Our part of every checkpoint: run identity, RNG and data position."""
        trainer = self._trainer
        finished = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch) if trainer else False
        return {
            "format": STATE_FORMAT,
            "run_id": self.run_id,
            "run_seed": self.run_seed,
            "fingerprint_key": self._fingerprint_key,
            "step": trainer.global_step if trainer else 0,
            # the RNG as it was when the last training batch ended (see on_train_batch_start)
            "rng": self._restore_rng_at_next_batch or capture_global_rng(self._cuda_device),
            # every rank's RNG (gathered at the checkpoint; rank zero writes the file)
            "rng_per_rank": self._rng_per_rank,
            "data": {
                "epoch": trainer.current_epoch if trainer else 0,
                "next_batch_idx": self._next_batch_idx,
                "epoch_finished": finished,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != STATE_FORMAT:
            raise UsageError("the checkpoint's IntegrityCallback state has an unknown format")
        self._resume = dict(state_dict)
        self.run_seed = int(state_dict["run_seed"])

    # ---- setup / teardown -------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer: pl.Trainer | None = trainer
        self._next_batch_idx = 0
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self._prepare_run_dir(trainer)
        if self.run_seed < 0:
            self.run_seed = trainer.strategy.broadcast(self._choose_seed(), src=0)
        io = glue.IntegrityCheckpointIO(trainer.strategy.checkpoint_io, self.run_dir, self._on_checkpoint_loaded)
        self._undo = glue.install(trainer, io, self._instrument)
        if not torch.are_deterministic_algorithms_enabled():
            glue.warn(
                "IntegrityCallback: Trainer(deterministic=True) is not set; the run is recorded, but bit-exact "
                "replay is not promised (the flag is recorded in run_start)."
            )
        self._active = True

    def _prepare_run_dir(self, trainer: pl.Trainer) -> None:
        held = (self.run_dir / LEDGER_FILE).exists() or (
            self.run_dir.is_dir() and any(not p.name.startswith(".") for p in self.run_dir.iterdir())
        )
        # rank zero looks before it creates anything; every rank acts on its answer
        self._held_run = bool(trainer.strategy.broadcast(held, src=0))
        if not trainer.is_global_zero:
            return
        try:
            (self.run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f"{TEMP_PREFIX}probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"cannot write to the run directory {self.run_dir}: {exc.strerror or exc}") from None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoint restoration (which calls our checkpoint IO) has happened by now.
        if self._active and self._held_run and self._resume_entry is None:
            raise UsageError(
                f"{self.run_dir} already holds a run (or other files). To resume it, pass "
                f"ckpt_path=<one of {self.run_dir / CHECKPOINT_DIR}/*.safetensors> to trainer.fit; "
                "otherwise choose an empty or new run directory."
            )

    def _on_checkpoint_loaded(self, entry: Any, state: dict[str, Any]) -> None:
        self._resume_entry = entry

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._active:
            return
        if self._undo is not None:
            self._undo()
            self._undo = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        self._active = False

    # ---- data ----------------------------------------------------------------------------

    def _instrument(self, loader: Any) -> None:
        self._loaders.append(instrument_dataloader(loader, self))

    def _choose_seed(self) -> int:
        # a resume replaces this with the recorded seed in load_state_dict
        env = os.environ.get("PL_GLOBAL_SEED")
        if env is not None and env.lstrip("-").isdigit():
            return int(env) % (1 << 63)
        return secrets.randbits(63)

    def plan_iteration(self) -> IterationPlan:
        """Called by the sampler wrapper at the start of each pass over the data."""
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        return IterationPlan(epoch=epoch, skip=resume_skip(self._resume, epoch))

    # ---- run start / end --------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._count_real_step))
        self._record_lag = record_lag(pl_module.device)
        self._cuda_device = cuda_index(pl_module.device)
        self._last_global_step = trainer.global_step
        if self._resume is not None:
            self.run_id = str(self._resume["run_id"])
            self._fingerprint_key = int(self._resume["fingerprint_key"])
            self._restore_rng_at_next_batch = resume_rng(self._resume, self.rank, self.world_size)
            # also now: batches fetched before the first training batch (an IterableDataset's
            # prefetch draws from the global RNG) must see the checkpointed stream
            restore_global_rng(self._restore_rng_at_next_batch, self._cuda_device)
            self._next_batch_idx = int(self._resume["data"]["next_batch_idx"])
            self._last_checkpoint_step = int(self._resume["step"])
        else:
            self.run_id = trainer.strategy.broadcast(secrets.token_hex(16), src=0)
            self._fingerprint_key = derive_seed(self.run_id, "fingerprint")
        if trainer.is_global_zero:
            self._ledger = LedgerWriter(self.run_dir / LEDGER_FILE, flush_every=self.flush_every)
            self._ledger.append("run_start", self._run_start_body(trainer, pl_module), durable=True)
        if self._resume is None:
            self._checkpoint(trainer)
            # the first batch starts from the RNG state the step-0 checkpoint holds, whatever
            # the DataLoader's prefetch consumed in between (as every later batch does)
            self._restore_rng_at_next_batch = capture_global_rng(self._cuda_device)
        # from here on every training batch starts by restoring the training RNG, so fetches
        # need not put the global RNGs back themselves
        restore_rng_around_fetches(self._loaders, False)

    def _run_start_body(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        datamodule = getattr(trainer, "datamodule", None)
        classes: list[type] = [type(pl_module)]
        if datamodule is not None:
            classes.append(type(datamodule))
        loaders = []
        for item in self._loaders:
            loader = item.loader
            dataset = getattr(getattr(loader, "dataset", None), "dataset", getattr(loader, "dataset", None))
            if dataset is not None:
                classes.append(type(dataset))
            loaders.append(
                {
                    "class": import_path(loader),
                    "dataset": import_path(dataset) if dataset is not None else None,
                    "batch_size": getattr(loader, "batch_size", None),
                    "num_workers": getattr(loader, "num_workers", None),
                    "persistent_workers": getattr(loader, "persistent_workers", None),
                    "drop_last": getattr(loader, "drop_last", None),
                    "sampler": import_path(getattr(item.sampler, "inner", None)) if item.sampler else None,
                    "indices_recorded": item.sampler is not None and self.record_indices,
                }
            )
        body: dict[str, Any] = {
            "format": RUN_FORMAT,
            "run_id": self.run_id,
            "seed": self.run_seed,
            "global_seed": os.environ.get("PL_GLOBAL_SEED"),
            "module": import_path(pl_module),
            "datamodule": import_path(datamodule) if datamodule is not None else None,
            "hyperparameters": glue.json_safe(dict(pl_module.hparams)),
            "datamodule_hyperparameters": glue.json_safe(dict(datamodule.hparams)) if datamodule is not None else None,
            "code": code_digest(classes),
            "trainer": _trainer_settings(trainer),
            "environment": describe_environment(),
            "loaders": loaders,
            "checkpoint_every_n_steps": self.checkpoint_every_n_steps,
            "fingerprint_every_n_steps": self.fingerprint_every_n_steps,
            "digests": {"data": BATCH_ALGORITHM, "fingerprint": FINGERPRINT_ALGORITHM},
            "data_manifest": self._manifest_reference(),
            "resume": None,
        }
        if self._resume is not None:
            entry = self._resume_entry
            body["resume"] = {
                "step": int(self._resume["step"]),
                "checkpoint_seq": entry.seq if entry is not None else None,
                "file": entry.path if entry is not None else None,
            }
        return body

    def _manifest_reference(self) -> Any:
        if self.data_manifest is None:
            return None
        from torch_integrity import manifest

        reference = manifest.manifest_reference(manifest.load_manifest(self.data_manifest))
        return {**reference, "path": str(self.data_manifest.resolve())}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore_rng_around_fetches(self._loaders, True)
        if self._active:
            self._write_records()
        if self._active and trainer.global_step != self._last_checkpoint_step:
            self._checkpoint(trainer)  # close the last segment
        if self._ledger is not None:
            self._flush_outbox(block=True)
            self._ledger.append("run_end", {"status": "completed", "step": trainer.global_step}, durable=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        restore_rng_around_fetches(self._loaders, True)
        if self._ledger is not None:
            try:
                if self.world_size == 1:  # other ranks may be gone: their parts cannot be gathered
                    self._write_records()
            except Exception:
                pass
            try:  # a checkpoint being written is finished and recorded: it can be resumed from
                self._flush_outbox(block=True)
            except Exception:
                pass
            try:
                self._ledger.flush(durable=True)
            except OSError:
                pass

    # ---- per batch ----------------------------------------------------------------------------

    def _count_real_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer post-step hook: fires only for steps that really ran (not AMP-skipped)."""
        self._pending.real_steps += 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._active:
            return
        # The training RNG stream advances only inside training batches: whatever ran since
        # the last batch ended (validation, epoch ends, a resume) is undone here.
        if self._restore_rng_at_next_batch is not None:
            restore_global_rng(self._restore_rng_at_next_batch, self._cuda_device)
            self._restore_rng_at_next_batch = None
        pending = self._pending
        if not pending.batch_indices:
            pending.epoch = trainer.current_epoch
        pending.batch_indices.append(batch_idx)
        indices = self._pop_indices(batch_idx)
        if indices is not None:
            pending.indices.extend(indices if isinstance(indices, list) else [indices])
            pending.sizes.append(len(indices) if isinstance(indices, list) else 1)
        pending.data.append(digest_batch_later(batch))

    def _pop_indices(self, batch_idx: int) -> Any:
        if not self.record_indices:
            return None
        recorders = [item.sampler for item in self._loaders if item.sampler is not None]
        if len(self._loaders) != 1 or not recorders:
            return None
        popped = recorders[0].pop()
        if popped is None:
            return None
        _, recorded_idx, indices = popped
        if recorded_idx != batch_idx:
            raise UsageError(
                f"batch index mismatch: the sampler handed out batch {recorded_idx} but Lightning trains batch "
                f"{batch_idx}; the training DataLoader was iterated outside the training loop"
            )
        return indices

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._active:
            self._pending.lrs.append(glue.optimizer_lrs(optimizer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        self._pending.losses.append(glue.loss_bits_later(outputs))
        self._next_batch_idx = batch_idx + 1
        step = trainer.global_step
        if step == self._last_global_step:
            self._restore_rng_at_next_batch = capture_global_rng(self._cuda_device)
            return
        self._record_step(trainer, pl_module, step)
        previous = self._last_global_step
        self._last_global_step = step
        if step // self.checkpoint_every_n_steps > previous // self.checkpoint_every_n_steps:
            self._checkpoint(trainer)
        self._restore_rng_at_next_batch = capture_global_rng(self._cuda_device)

    def _record_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Queue the step record (values still on a GPU are read when it is written)."""
        pending = self._pending
        self._pending = _PendingStep()
        body: dict[str, Any] = {
            "step": step,
            "epoch": pending.epoch,
            "batch_idx": pending.batch_indices[0] if pending.batch_indices else None,
            "lr": pending.lrs,
        }
        if pending.real_steps < len(pending.lrs):
            body["skipped_optimizer_steps"] = len(pending.lrs) - pending.real_steps
        if self.fingerprint_every_n_steps and step % self.fingerprint_every_n_steps == 0:
            body["fp"] = fingerprint_later(pl_module.state_dict().items(), key=self._fingerprint_key)
        self._unwritten.append((body, _rank_part(pending)))
        self._write_records(keep=self._record_lag)

    def _write_records(self, keep: int = 0) -> None:
        """Write every queued step record but the newest ``keep``, oldest first.

        Every rank calls this at the same steps (the queue lengths agree), so the gather
        of the ranks' parts in distributed training pairs up.
        """
        while len(self._unwritten) > keep:
            body, part = self._unwritten.popleft()
            for fields in (body, part):  # the values that may still be on their way from a GPU
                for name in _DEFERRED_FIELDS.intersection(fields):
                    fields[name] = resolve(fields[name])
            if self.world_size > 1 and self._trainer is not None:
                body["ranks"] = glue.gather(self._trainer, part)
            else:
                body.update(part)
            if self._ledger is not None:
                self._outbox.append(("step", body))
        self._flush_outbox(block=False)

    def _flush_outbox(self, *, block: bool) -> None:
        """Append finished records to the ledger in order; a checkpoint still being written
        holds back the records after it (unless ``block``: then wait for it)."""
        while self._outbox and self._ledger is not None:
            kind, item = self._outbox[0]
            if isinstance(item, Future):
                if not block and not item.done():
                    return
                item = item.result()
            self._outbox.popleft()
            self._ledger.append(kind, item, durable=kind == "checkpoint")

    # ---- checkpoints --------------------------------------------------------------------------

    def _checkpoint(self, trainer: pl.Trainer) -> None:
        self._write_records()  # the step records come before the checkpoint that ends them
        self._last_checkpoint_step = trainer.global_step
        if self.world_size > 1:
            self._rng_per_rank = glue.gather(trainer, self._restore_rng_at_next_batch or capture_global_rng(self._cuda_device))
        checkpoint = glue.dump_training_state(trainer)
        if not trainer.is_global_zero or self._ledger is None:
            return
        self._flush_outbox(block=True)  # one checkpoint write at a time
        dropped: list[str] = []
        state = glue.storable(checkpoint, "", dropped)
        position = {"step": trainer.global_step, "epoch": trainer.current_epoch, "next_batch_idx": self._next_batch_idx}
        if not self.background_checkpoints:
            self._outbox.append(("checkpoint", self._write_checkpoint(state, lambda: None, dropped, **position)))
            self._flush_outbox(block=True)
            return
        snapshot, arrived = host_snapshot(state)  # training may change the live tensors from here on
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-integrity-checkpoint")
        self._outbox.append(("checkpoint", self._writer.submit(partial(self._write_checkpoint, snapshot, arrived, dropped,
                                                                       **position))))

    def _write_checkpoint(
        self, state: dict[str, Any], arrived: Any, dropped: list[str], *, step: int, epoch: int, next_batch_idx: int
    ) -> dict[str, Any]:
        """Write one checkpoint file and return its ledger record (runs on the writer thread)."""
        arrived()
        relative = checkpoint_relative_path(step)
        saved = save_checkpoint(
            self.run_dir / relative,
            state,
            metadata={"torch_integrity.run_id": self.run_id, "torch_integrity.step": str(step)},
            digest_tensors=False,
        )
        model, optimizer = glue.state_digests(state)
        others = digest_state_dict(glue.optimizer_tensors(state.get("callbacks")))
        return {
            "step": step,
            "epoch": epoch,
            "file": relative,
            "file_digest": str(saved.file_digest),
            "model": state_digest_to_json(model),
            "optimizer": state_digest_to_json(optimizer),
            "rng_and_loop_root": str(others.root),
            "data_position": {"epoch": epoch, "next_batch_idx": next_batch_idx},
            "unstored": dropped,
        }


def record_lag(device: torch.device) -> int:
    """How many step records stay queued while training on ``device`` (see ``CUDA_RECORD_LAG``)."""
    return CUDA_RECORD_LAG if device.type == "cuda" else 0


def resume_rng(resume: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The RNG state this rank must continue from, out of a checkpoint's callback state."""
    per_rank = resume.get("rng_per_rank")
    if not per_rank:
        if world_size != 1:
            raise UsageError(f"the checkpoint was written by 1 process; this run has {world_size}. Use the same world size.")
        return dict(resume["rng"])
    if len(per_rank) != world_size:
        raise UsageError(
            f"the checkpoint was written by {len(per_rank)} processes; this run has {world_size}. Use the same world size."
        )
    return dict(per_rank[rank])


def resume_skip(resume: dict[str, Any] | None, epoch: int) -> int:
    """Batches of ``epoch`` a resumed pass must skip (once: the first pass after a resume)."""
    if resume is None or resume.get("_consumed"):
        return 0
    resume["_consumed"] = True
    data = resume["data"]
    if not data["epoch_finished"] and int(data["epoch"]) == epoch:
        return int(data["next_batch_idx"])
    return 0


def _rank_part(pending: _PendingStep) -> dict[str, Any]:
    """One rank's share of a step record."""
    single = len(pending.data) == 1
    part: dict[str, Any] = {
        "indices": pending.indices if pending.sizes else None,
        "data": pending.data[0] if single else pending.data,
        "loss": pending.losses[0] if single else pending.losses,
    }
    if not single:
        part["sizes"] = pending.sizes
    return part


def _trainer_settings(trainer: pl.Trainer) -> dict[str, Any]:
    """The Trainer settings that decide what training computes."""
    return glue.json_safe(
        {
            "max_epochs": trainer.max_epochs,
            "min_epochs": trainer.min_epochs,
            "max_steps": trainer.max_steps,
            "min_steps": trainer.min_steps,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "gradient_clip_val": trainer.gradient_clip_val,
            "gradient_clip_algorithm": trainer.gradient_clip_algorithm,
            "precision": str(trainer.precision),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "limit_train_batches": trainer.limit_train_batches,
            "val_check_interval": trainer.val_check_interval,
            "check_val_every_n_epoch": trainer.check_val_every_n_epoch,
            "reload_dataloaders_every_n_epochs": getattr(trainer, "reload_dataloaders_every_n_epochs", 0),
            "accelerator": type(trainer.accelerator).__name__,
            "strategy": type(trainer.strategy).__name__,
            "num_devices": trainer.num_devices,
            "num_nodes": trainer.num_nodes,
            "world_size": trainer.world_size,
        }
    )
