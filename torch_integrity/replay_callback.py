"""The Lightning side of a segment replay: feed the recorded batches, compare as we go.

The callback restores the segment's start checkpoint through the same pickle-free
checkpoint IO as a resume, puts the training DataLoader in replay mode (it yields the
recorded indices, with the recorded per-sample seeds), and compares every micro-batch's
content digest, every loss, learning rate and fingerprint, and at the end step the model
and optimizer digests. It never raises inside Lightning: the first divergence is stored
and training is stopped.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from torch_integrity import capture
from torch_integrity import lightning_glue as glue
from torch_integrity.batch import digest_batch_later
from torch_integrity.capture import resume_rng, resume_skip
from torch_integrity.data import Instrumented, IterationPlan, instrument_dataloader, restore_rng_around_fetches
from torch_integrity.deferred import Later, resolve
from torch_integrity.fingerprint import fingerprint_later
from torch_integrity.rng import capture_global_rng, cuda_index, restore_global_rng
from torch_integrity.segments import Segment, rank_view


@dataclass(frozen=True)
class TensorDifference:
    """How one tensor differs from the recorded one."""

    name: str
    max_abs: float
    relative_l2: float
    note: str = ""


@dataclass
class Divergence:
    """The first point where the replay and the record disagree."""

    step: int
    check: str  # data | loss | lr | fingerprint | weights | optimizer | steps
    recorded: Any
    reproduced: Any
    batch_idx: int | None = None
    epoch: int | None = None
    rank: int = 0
    tensors: list[TensorDifference] = field(default_factory=list)

    def describe(self) -> str:
        where = f"step {self.step}"
        if self.batch_idx is not None:
            where += f" (epoch {self.epoch}, batch {self.batch_idx})"
        text = f"{self.check} diverged at {where}: recorded {self.recorded}, reproduced {self.reproduced}"
        if self.tensors:
            shown = ", ".join(f"{t.name} (max abs {t.max_abs:.3g}, rel L2 {t.relative_l2:.3g})" for t in self.tensors[:5])
            text += f"; tensors: {shown}" + (f" and {len(self.tensors) - 5} more" if len(self.tensors) > 5 else "")
        return text


def _loss_value(bits: str | None) -> float | None:
    if bits is None:
        return None
    dtype, _, hexed = bits.partition(":")
    raw = bytes.fromhex(hexed)[::-1]
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        return None
    return float(torch.frombuffer(bytearray(raw), dtype=torch_dtype)[0].item())


def steady_steps_per_second(times: list[float]) -> float | None:
    """Steps per second between the first and the last step end (None below two steps)."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


class ReplayCallback(Callback):
    """Replays one segment; see the module docstring."""

    def __init__(self, run_dir: Path, segment: Segment, *, tolerance: float | None = None, manifest: Any = None) -> None:
        self.run_dir = run_dir
        self.segment = segment
        self.tolerance = tolerance
        self.run_seed = int(segment.run_start.get("seed", 0))
        self.manifest = manifest  # a verified dataset manifest the samples must match
        self.divergence: Divergence | None = None
        self.steps_checked = 0
        self.reached_end = False
        self.max_relative_l2 = 0.0
        self._resume: dict[str, Any] | None = None
        self._restore_rng: dict[str, Any] | None = None
        self._loaders: list[Instrumented] = []
        self._undo: Any = None
        self._trainer: pl.Trainer | None = None
        self._expected: deque[tuple[dict[str, Any], int]] = deque()
        self._current_step: dict[str, Any] | None = None
        self._losses: list[Later[str | None]] = []
        self._checks: deque[tuple[int, Callable[[], None]]] = deque()  # (step count, comparison) not yet run
        self._steps_ended = 0
        self._check_lag = 0
        self._lrs: list[list[Any]] = []
        self._last_global_step = segment.start_step
        self.fingerprint_key = 0
        self.rank = 0
        self.world_size = 1
        self.environment: dict[str, Any] | None = None
        self.step_times: list[float] = []  # perf_counter at the end of each replayed step
        self._cuda_device: int | None = None  # the CUDA device this process replays on

    @property
    def state_key(self) -> str:
        return "IntegrityCallback"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)
        self.run_seed = int(state_dict["run_seed"])
        self.fingerprint_key = int(state_dict["fingerprint_key"])

    def state_dict(self) -> dict[str, Any]:
        return {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self._bodies = [rank_view(record.body, self.rank) for record in self.segment.steps]
        for body in self._bodies:
            data = body.get("data")
            for micro in range(len(data) if isinstance(data, list) else 1):
                self._expected.append((body, micro))
        io = glue.IntegrityCheckpointIO(trainer.strategy.checkpoint_io, self.run_dir, lambda entry, state: None)
        self._undo = glue.install(trainer, io, lambda loader: self._loaders.append(instrument_dataloader(loader, self)))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def plan_iteration(self) -> IterationPlan:
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        batches = []
        for body in self._bodies:
            if body.get("epoch") != epoch or body.get("indices") is None:
                continue
            sizes = body.get("sizes") or [len(body["indices"])]
            offset = 0
            for micro, size in enumerate(sizes):
                batches.append((int(body["batch_idx"]) + micro, body["indices"][offset : offset + size]))
                offset += size
        if batches:
            return IterationPlan(epoch=epoch, replay=batches)
        return IterationPlan(epoch=epoch, skip=resume_skip(self._resume, epoch))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch_integrity.environment import describe_environment

        self.environment = describe_environment()
        self._check_lag = capture.record_lag(pl_module.device)
        self._cuda_device = cuda_index(pl_module.device)
        if self._resume is not None:
            self._restore_rng = resume_rng(self._resume, self.rank, self.world_size)
            restore_global_rng(self._restore_rng, self._cuda_device)  # as capture does: prefetched batches see it too
        if trainer.global_step != self.segment.start_step:
            self._diverge(trainer.global_step, "steps", self.segment.start_step, trainer.global_step)
        restore_rng_around_fetches(self._loaders, False)  # each batch restores the training RNG (as capture)

    def _diverge(self, step: int, check: str, recorded: Any, reproduced: Any, **extra: Any) -> None:
        if self.divergence is None:
            extra.setdefault("rank", self.rank)
            self.divergence = Divergence(step=step, check=check, recorded=recorded, reproduced=reproduced, **extra)
        if self._trainer is not None:
            self._trainer.should_stop = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._restore_rng is not None:
            restore_global_rng(self._restore_rng, self._cuda_device)
            self._restore_rng = None
        if self.divergence is not None:
            return
        if not self._expected:
            self._diverge(trainer.global_step + 1, "steps", "end of segment", f"an extra batch {batch_idx}")
            return
        body, micro = self._expected.popleft()
        self._current_step = body
        recorded = body["data"][micro] if isinstance(body.get("data"), list) else body.get("data")
        if self.manifest is not None:
            self._check_manifest(body, micro, batch_idx, trainer.current_epoch)
        reproduced = digest_batch_later(batch)
        epoch = trainer.current_epoch

        def check_data() -> None:
            if recorded != reproduced.result():
                self._diverge(int(body["step"]), "data", recorded, reproduced.result(), batch_idx=batch_idx, epoch=epoch)

        self._checks.append((self._steps_ended, check_data))

    def _check_manifest(self, body: dict[str, Any], micro: int, batch_idx: int, epoch: int) -> None:
        """Every sample fed must match its digest in the run's dataset manifest."""
        from torch_integrity.datasource import fetch_for_manifest
        from torch_integrity.sample_digest import digest_sample

        indices = body.get("indices")
        if indices is None or not self._loaders or self._loaders[0].sampler is None:
            return
        sizes = body.get("sizes") or [len(indices)]
        start = sum(sizes[:micro])
        dataset = self._loaders[0].loader.dataset.dataset  # the user's dataset inside our seeded wrapper
        bad = []
        for index in indices[start : start + sizes[micro]]:
            known = isinstance(index, int) and 0 <= index < self.manifest.count
            if not known or digest_sample(fetch_for_manifest(dataset, index)) != self.manifest.sample_digest(index):
                bad.append(index)
        if bad:
            self._diverge(int(body["step"]), "manifest", "samples as committed in the dataset manifest",
                          f"samples {bad[:10]} differ from their manifest digests", batch_idx=batch_idx, epoch=epoch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._lrs.append(glue.optimizer_lrs(optimizer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._losses.append(glue.loss_bits_later(outputs))
        self._restore_rng = capture_global_rng(self._cuda_device)  # RNG advances only inside training batches
        step = trainer.global_step
        if step == self._last_global_step:
            return
        self._last_global_step = step
        self.step_times.append(time.perf_counter())
        body = self._current_step
        losses, lrs = self._losses, self._lrs
        self._losses, self._lrs = [], []
        if self.divergence is None and body is not None:
            if int(body["step"]) != step:
                self._diverge(int(body["step"]), "steps", body["step"], step)
            else:
                self._checks.append((self._steps_ended, self._step_check(body, losses, lrs, pl_module, batch_idx)))
        self._steps_ended += 1
        self._run_checks(keep=0 if step == self.segment.end_step else self._check_lag)
        if step == self.segment.end_step and self.divergence is None:
            self._compare_end(trainer)
            self.reached_end = True
            trainer.should_stop = True
        if self.world_size > 1:
            self._agree(trainer)

    def _agree(self, trainer: pl.Trainer) -> None:
        """All ranks adopt the earliest divergence any rank saw, so all stop together."""
        seen = [d for d in glue.gather(trainer, self.divergence) if d is not None]
        if seen:
            self.divergence = min(seen, key=lambda d: (d.step, d.rank))
            trainer.should_stop = True

    def _run_checks(self, keep: int) -> None:
        """Run the queued comparisons of all but the last ``keep`` steps, oldest first.

        On CUDA the comparisons run a few steps behind (as capture writes its records), so
        reading the reproduced values never waits for the GPU. The first divergence is
        still the one reported: checks run in training order.
        """
        while self._checks and self._checks[0][0] < self._steps_ended - keep:
            _, check = self._checks.popleft()
            if self.divergence is None:
                check()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore_rng_around_fetches(self._loaders, True)
        self._run_checks(keep=0)

    def _step_check(
        self, body: dict[str, Any], losses: list[Later[str | None]], lrs: list[list[Any]], pl_module: Any,
        batch_idx: int,
    ) -> Callable[[], None]:
        """The comparison of one step's loss, learning rates and fingerprint (values read when it runs)."""
        recorded_fp = body.get("fp")
        fingerprint = None
        if recorded_fp is not None and self.tolerance is None:
            fingerprint = fingerprint_later(pl_module.state_dict().items(), key=self.fingerprint_key)

        def check() -> None:
            self.steps_checked += 1
            step = int(body["step"])
            recorded_loss = body.get("loss")
            reproduced = [loss.result() for loss in losses]
            reproduced_loss: Any = reproduced[0] if not isinstance(recorded_loss, list) else reproduced
            where = {"batch_idx": batch_idx, "epoch": body.get("epoch")}
            if recorded_loss != reproduced_loss:
                if self.tolerance is None or not self._losses_close(recorded_loss, reproduced_loss):
                    self._diverge(step, "loss", recorded_loss, reproduced_loss, **where)
                    return
            reproduced_lrs = resolve(lrs)
            if body.get("lr") != reproduced_lrs:
                self._diverge(step, "lr", body.get("lr"), reproduced_lrs, **where)
                return
            if fingerprint is not None and fingerprint.result() != recorded_fp:
                self._diverge(step, "weights", f"fingerprint {recorded_fp}", f"fingerprint {fingerprint.result()}", **where)

        return check

    def _losses_close(self, recorded: Any, reproduced: Any) -> bool:
        pairs = zip(recorded, reproduced, strict=False) if isinstance(recorded, list) else [(recorded, reproduced)]
        assert self.tolerance is not None
        for a, b in pairs:
            x, y = _loss_value(a), _loss_value(b)
            if x is None or y is None or not math.isclose(x, y, rel_tol=self.tolerance, abs_tol=self.tolerance):
                return False
        return True

    def _compare_end(self, trainer: pl.Trainer) -> None:
        state = glue.storable(glue.dump_training_state(trainer), "", [])
        model, optimizer = glue.state_digests(state)
        end = self.segment.end
        if model.root == end.model.root and optimizer.root == end.optimizer.root:
            return
        from torch_integrity.rundir import open_run

        recorded_state, _ = open_run(self.run_dir).load_checkpoint(end)
        differences = _tensor_differences(recorded_state.get("state_dict", {}), state.get("state_dict", {}), model.differing(end.model))
        if model.root != end.model.root:
            worst = max((d.relative_l2 for d in differences), default=0.0)
            self.max_relative_l2 = worst
            if self.tolerance is not None and worst <= self.tolerance:
                return
            self._diverge(end.step, "weights", str(end.model.root), str(model.root), tensors=differences)
            return
        if self.tolerance is None:
            names = optimizer.differing(end.optimizer)
            rec_opt = glue.optimizer_tensors(recorded_state.get("optimizer_states"))
            rep_opt = glue.optimizer_tensors(state.get("optimizer_states"))
            self._diverge(end.step, "optimizer", str(end.optimizer.root), str(optimizer.root),
                          tensors=_tensor_differences(rec_opt, rep_opt, names))


def _tensor_differences(recorded: Any, reproduced: Any, names: list[str]) -> list[TensorDifference]:
    result = []
    for name in names:
        a, b = recorded.get(name), reproduced.get(name)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            result.append(TensorDifference(name, math.inf, math.inf, "missing on one side"))
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            result.append(TensorDifference(name, math.inf, math.inf, f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"))
            continue
        if not (a.is_floating_point() or a.is_complex()):
            a, b = a.double(), b.double()
        diff = (a.detach().cpu().double() - b.detach().cpu().double())
        norm = float(a.detach().cpu().double().norm())
        max_abs = float(diff.abs().max()) if diff.numel() else 0.0
        rel = float(diff.norm()) / norm if norm > 0 else (0.0 if max_abs == 0 else math.inf)
        if math.isnan(max_abs):
            max_abs, rel = math.inf, math.inf
        result.append(TensorDifference(name, max_abs, rel, "bits differ, values equal" if max_abs == 0 else ""))
    return sorted(result, key=lambda d: -d.relative_l2)
