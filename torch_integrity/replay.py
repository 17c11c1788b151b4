"""Segment replay: re-run recorded training and check it bit for bit.

``replay(run_dir)`` verifies the ledger, splits the run into segments (checkpoint to
checkpoint), and replays each one through a real Lightning ``Trainer`` with the
recorded settings: it checks the start checkpoint and the model-code digest before
anything runs, restores the checkpoint, feeds exactly the recorded batches, and compares
each step and the end checkpoint. Segments are independent and can run in parallel
processes (``workers``) or as tasks on a Ray cluster (``executor="ray"``; see
:mod:`torch_integrity.executors` and ``docs/scaling.md``).

Verdicts per segment: ``reproduced`` (bit for bit), ``within-tolerance`` (only with a
tolerance; never called bit-exact), ``diverged`` (with the first divergence).
"""

from __future__ import annotations

import enum
import importlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch_integrity.errors import ReplayEnvironmentError, UsageError, VerificationFailure
from torch_integrity.ledger import LedgerHead
from torch_integrity.segments import Segment, plan_segments, select_segments


class CodeChangedError(VerificationFailure):
    """The user's code differs from what the run recorded."""


class Verdict(str, enum.Enum):
    """Outcome of replaying one segment."""

    REPRODUCED = "reproduced"
    WITHIN_TOLERANCE = "within-tolerance"
    DIVERGED = "diverged"


@dataclass
class SegmentResult:
    """What replaying one segment found."""

    index: int
    start_step: int
    end_step: int
    verdict: Verdict
    reason: str
    divergence: dict[str, Any] | None = None
    steps_checked: int = 0
    environment_differences: list[str] = field(default_factory=list)
    code_changed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    factory_differences: list[str] = field(default_factory=list)
    steps_per_second: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["verdict"] = self.verdict.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SegmentResult:
        """Inverse of :meth:`to_json`."""
        return cls(**{**data, "verdict": Verdict(data["verdict"])})


@dataclass
class ReplayReport:
    """Results for every replayed segment, plus what the selection means."""

    run_dir: str
    run_id: str
    total_segments: int
    segments: list[SegmentResult]
    notes: list[str] = field(default_factory=list)
    detection_probability: float | None = None

    @property
    def ok(self) -> bool:
        return all(s.verdict is not Verdict.DIVERGED for s in self.segments)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "run_id": self.run_id,
            "total_segments": self.total_segments,
            "replayed": len(self.segments),
            "ok": self.ok,
            "detection_probability": self.detection_probability,
            "notes": self.notes,
            "segments": [s.to_json() for s in self.segments],
        }


# ---- building the user's objects ------------------------------------------------------------


def _import(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{path!r} is not MODULE:NAME")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ReplayEnvironmentError(f"cannot import {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ReplayEnvironmentError(f"{module_name!r} has no {attribute!r}") from None
    return obj


def _has_unrebuildable(value: Any) -> bool:
    if isinstance(value, dict):
        return "$repr" in value or any(_has_unrebuildable(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_unrebuildable(v) for v in value)
    return False


def build_model_and_data(run_start: dict[str, Any], factory: str | None) -> tuple[Any, Any]:
    """The LightningModule and the data (DataModule, DataLoader or None) for a replay."""
    if factory is not None:
        made = _import(factory)()
        if not isinstance(made, tuple) or len(made) != 2:
            raise UsageError(f"--factory {factory} must return (model, data)")
        return made
    module_path = run_start.get("module")
    if not module_path:
        raise ReplayEnvironmentError(
            "the run's LightningModule was defined where it cannot be imported (a script's __main__ or a local "
            "class); pass --factory MODULE:FUNCTION returning (model, data)"
        )
    hyperparameters = run_start.get("hyperparameters") or {}
    if _has_unrebuildable(hyperparameters):
        raise ReplayEnvironmentError("the module's hyperparameters hold objects that were not recorded; pass --factory")
    model = _import(module_path)(**hyperparameters)
    data = None
    if run_start.get("datamodule"):
        dm_hparams = run_start.get("datamodule_hyperparameters") or {}
        if _has_unrebuildable(dm_hparams):
            raise ReplayEnvironmentError("the datamodule's hyperparameters hold objects that were not recorded; pass --factory")
        data = _import(run_start["datamodule"])(**dm_hparams)
    else:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if not is_overridden("train_dataloader", model):
            raise ReplayEnvironmentError(
                "the run's training data was passed to fit() as a DataLoader, which cannot be rebuilt from the "
                "ledger; pass --factory MODULE:FUNCTION returning (model, dataloader)"
            )
    return model, data


def code_differences(run_start: dict[str, Any]) -> list[str]:
    """Modules whose source differs from the recorded digest (imports them)."""
    import hashlib

    changed = []
    for module_name, recorded in sorted((run_start.get("code") or {}).get("files", {}).items()):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            changed.append(f"{module_name}: cannot be imported")
            continue
        path = getattr(module, "__file__", None)
        if not path:
            changed.append(f"{module_name}: has no source file")
            continue
        current = "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if current != recorded:
            changed.append(f"{module_name}: recorded {recorded}, now {current}")
    return changed


def checked_code(run_start: dict[str, Any], allow_code_change: bool) -> list[str]:
    """The code differences from the recorded run; refused unless ``allow_code_change``."""
    changed = code_differences(run_start)
    if changed and not allow_code_change:
        raise CodeChangedError("the model code changed since capture (refusing to replay): " + "; ".join(changed))
    return changed


# ---- one segment ---------------------------------------------------------------------------


def _trainer_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    import torch

    accelerator = "gpu" if settings.get("accelerator") == "CUDAAccelerator" and torch.cuda.is_available() else "cpu"
    world_size = int(settings.get("world_size") or 1)
    if accelerator == "gpu" and torch.cuda.device_count() < world_size:
        raise ReplayEnvironmentError(
            f"the run trained on {world_size} GPUs; this machine has {torch.cuda.device_count()}. A replay must use "
            "the recorded world size (each rank's batches and RNG are recorded separately)."
        )
    return {
        "accelerator": accelerator,
        "devices": world_size,
        "strategy": "ddp" if world_size > 1 else "auto",
        "max_epochs": settings.get("max_epochs"),
        "min_epochs": settings.get("min_epochs"),
        "max_steps": settings.get("max_steps", -1),
        "min_steps": settings.get("min_steps"),
        "accumulate_grad_batches": settings.get("accumulate_grad_batches", 1),
        "gradient_clip_val": settings.get("gradient_clip_val"),
        "gradient_clip_algorithm": settings.get("gradient_clip_algorithm"),
        "precision": settings.get("precision", "32-true"),
        "deterministic": bool(settings.get("deterministic")),
        "limit_train_batches": settings.get("limit_train_batches", 1.0),
        "reload_dataloaders_every_n_epochs": settings.get("reload_dataloaders_every_n_epochs", 0),
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }


def replay_segment(
    run_dir: str | os.PathLike[str],
    index: int,
    *,
    factory: str | None = None,
    tolerance: float | None = None,
    allow_code_change: bool = False,
    head: LedgerHead | None = None,
) -> SegmentResult:
    """Replay segment ``index`` of a run in this process (see :func:`replay`).

    ``head``: a ledger head verified elsewhere; this copy of the ledger must extend it.
    """
    import lightning.pytorch as pl

    from torch_integrity.environment import compare_environments, describe_environment
    from torch_integrity.replay_callback import ReplayCallback
    from torch_integrity.rundir import open_run

    began = time.perf_counter()
    root = Path(run_dir)
    history = open_run(root, head=head)
    segments, _ = plan_segments(history)
    if not 0 <= index < len(segments):
        raise UsageError(f"segment {index} does not exist; the run has {len(segments)}")
    segment = segments[index]
    run_start = segment.run_start
    world_size = int((run_start.get("trainer") or {}).get("world_size") or 1)
    if world_size > 1 and os.environ.get(DDP_CHILD_ENV) is None:
        return _replay_in_ddp_processes(root, index, factory, tolerance, allow_code_change)
    changed = checked_code(run_start, allow_code_change)  # before any of the user's code is called
    model, data = build_model_and_data(run_start, factory)
    settings = run_start.get("trainer", {})
    # the start checkpoint is verified by the checkpoint IO when Lightning loads it; the end
    # checkpoint is only compared by digest, so its file is verified here
    history.load_checkpoint(segment.end)
    factory_notes = factory_differences(run_start, model, data) if factory is not None else []
    callback = ReplayCallback(root, segment, tolerance=tolerance, manifest=_bound_manifest(run_start))
    seed = run_start.get("global_seed")
    import logging

    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if seed is not None:
            pl.seed_everything(int(seed), verbose=False)
        trainer = pl.Trainer(callbacks=[callback], **_trainer_kwargs(settings))
        fit_args: dict[str, Any] = {"ckpt_path": str((root / segment.start.path).resolve())}
        if isinstance(data, pl.LightningDataModule):
            fit_args["datamodule"] = data
        elif data is not None:
            fit_args["train_dataloaders"] = data
        try:
            trainer.fit(model, **fit_args)
            # compared as training started (after the strategy set threads and deterministic flags)
            on_gpu = (run_start.get("trainer") or {}).get("accelerator") == "CUDAAccelerator"
            differences = compare_environments(run_start.get("environment", {}),
                                               callback.environment or describe_environment(), gpu=on_gpu)
        finally:
            for logger, level in zip(quiet, levels, strict=True):
                logger.setLevel(level)
    result = _result(segment, callback, differences, changed, tolerance, time.perf_counter() - began)
    from torch_integrity.replay_callback import steady_steps_per_second

    result.steps_per_second = steady_steps_per_second(callback.step_times)
    if factory_notes:
        result.factory_differences = factory_notes
        result.reason += "; the factory's objects differ from the recorded ones: " + "; ".join(factory_notes)
    return result


def _bound_manifest(run_start: dict[str, Any]) -> Any:
    """The dataset manifest the run was bound to, verified against the recorded reference."""
    reference = run_start.get("data_manifest")
    if not reference:
        return None
    from torch_integrity.manifest import load_manifest

    path = reference.get("path")
    if not path or not Path(path).is_file():
        raise ReplayEnvironmentError(
            f"the run is bound to a dataset manifest (root {reference.get('root')}) recorded at {path!r}, "
            "which is not there; put the manifest back at that path to replay"
        )
    return load_manifest(path, expected={k: v for k, v in reference.items() if k != "path"})


def factory_differences(run_start: dict[str, Any], model: Any, data: Any) -> list[str]:
    """How the objects a ``--factory`` built differ from what the run recorded.

    A replay restores weights, optimizer state and learning rates from the verified
    checkpoint, so such differences need not change a verdict; they are reported so a
    verifier sees that the replay did not use the recorded construction.
    """
    from lightning.pytorch import LightningDataModule

    from torch_integrity.environment import import_path
    from torch_integrity.lightning_glue import json_safe

    notes = []
    recorded_module = run_start.get("module")
    if recorded_module and import_path(model) != recorded_module:
        notes.append(f"module class: recorded {recorded_module}, factory built {import_path(model)}")
    pairs = [("hyperparameters", run_start.get("hyperparameters"), getattr(model, "hparams", {}))]
    if isinstance(data, LightningDataModule):
        recorded_dm = run_start.get("datamodule")
        if recorded_dm and import_path(data) != recorded_dm:
            notes.append(f"datamodule class: recorded {recorded_dm}, factory built {import_path(data)}")
        pairs.append(("datamodule hyperparameters", run_start.get("datamodule_hyperparameters"), data.hparams))
    for what, recorded, current in pairs:
        recorded = recorded or {}
        current = json_safe(dict(current))
        for key in sorted(set(recorded) | set(current)):
            if recorded.get(key) != current.get(key):
                notes.append(f"{what} {key}: recorded {recorded.get(key)!r}, factory {current.get(key)!r}")
    return notes


DDP_CHILD_ENV = "TORCH_INTEGRITY_DDP_REPLAY"


def _replay_in_ddp_processes(
    root: Path, index: int, factory: str | None, tolerance: float | None, allow_code_change: bool
) -> SegmentResult:
    """Replay a distributed run's segment with Lightning's DDP strategy in a fresh process.

    Lightning's launcher starts the other ranks by re-running the command line, so the
    replay gets a command line of its own (``python -m torch_integrity.ddp_replay``);
    rank zero writes the result as JSON.
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ti-ddp-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch_integrity.ddp_replay", str(root), str(index), "--out", str(out)]
        if factory:
            command += ["--factory", factory]
        if tolerance is not None:
            command += ["--tolerance", repr(tolerance)]
        if allow_code_change:
            command.append("--allow-code-change")
        env = {**os.environ, DDP_CHILD_ENV: "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            message = f"distributed replay of segment {index} failed (exit {done.returncode}): " + " | ".join(tail)
            if done.returncode == 1:
                raise VerificationFailure(message)
            raise ReplayEnvironmentError(message)
        return SegmentResult.from_json(json.loads(out.read_text()))


def _result(segment: Segment, callback: Any, env: list[str], changed: list[str], tolerance: float | None, seconds: float) -> SegmentResult:
    if callback.divergence is not None:
        verdict, reason = Verdict.DIVERGED, callback.divergence.describe()
        divergence = _divergence_json(callback.divergence)
    elif not callback.reached_end:
        verdict, reason, divergence = Verdict.DIVERGED, f"training stopped before reaching step {segment.end_step}", None
    elif tolerance is not None:
        verdict = Verdict.WITHIN_TOLERANCE
        reason = f"end weights within relative L2 {callback.max_relative_l2:.3g} <= tolerance {tolerance} (not a bit-exact claim)"
        divergence = None
    else:
        verdict, reason, divergence = Verdict.REPRODUCED, "reproduced bit for bit", None
        if env:
            reason += " (in an environment that differs from the recorded one)"
    if changed:
        reason += "; replayed with CHANGED CODE (--allow-code-change): " + "; ".join(changed)
    return SegmentResult(segment.index, segment.start_step, segment.end_step, verdict, reason, divergence,
                         callback.steps_checked, env, changed, round(seconds, 3))


def _divergence_json(divergence: Any) -> dict[str, Any]:
    data = asdict(divergence)
    return json.loads(json.dumps(data, default=str))


def _replay_one(args: tuple[Any, ...]) -> SegmentResult:
    run_dir, index, factory, tolerance, allow, *rest = args
    head = LedgerHead.from_json(rest[0]) if rest and rest[0] is not None else None
    return replay_segment(run_dir, index, factory=factory, tolerance=tolerance, allow_code_change=allow, head=head)


def replay(
    run_dir: str | os.PathLike[str],
    *,
    segments: list[int] | None = None,
    from_step: int | None = None,
    to_step: int | None = None,
    sample: int | None = None,
    seed: int | None = None,
    workers: int = 1,
    factory: str | None = None,
    tolerance: float | None = None,
    allow_code_change: bool = False,
    progress: Callable[[SegmentResult, int, int], None] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    ray_runtime_env: dict[str, Any] | None = None,
    ray_connect_timeout: float | None = None,
    ray_gpus_per_task: float | None = None,
) -> ReplayReport:
    """Replay segments of a recorded run and report per segment.

    Args:
        run_dir: the run directory.
        segments: segment indices to replay (default: all).
        from_step, to_step: replay the segments overlapping this step range.
        sample, seed: replay ``sample`` segments chosen with the verifier's ``seed``.
        workers: parallel processes on this machine (``local`` executor; segments are
            independent).
        factory: ``MODULE:FUNCTION`` returning ``(model, data)`` for code that cannot be
            rebuilt from the recorded import paths and hyperparameters.
        tolerance: compare end weights by relative L2 distance instead of bits (for
            other hardware); such a verdict never claims bit-exactness.
        allow_code_change: replay even though the model code changed (reported).
        progress: called as each segment finishes with ``(result, done, total)``; the
            report lists the segments in order whatever order they finished in.
        executor: ``local`` (this machine, ``workers`` processes) or ``ray`` (one Ray task
            per segment on an existing cluster; see ``docs/scaling.md``).
        ray_address: the Ray cluster's ``HOST:PORT`` (default: ``RAY_ADDRESS``).
        ray_runtime_env: Ray ``runtime_env`` for the tasks (``working_dir``, ``py_modules``,
            ``env_vars``...); a ``PYTHONPATH`` holding this process's import path is added.
        ray_connect_timeout: seconds allowed to reach and join the cluster (default 30).
        ray_gpus_per_task: GPUs each Ray task asks for (default: 1 per recorded process
            for runs recorded on CUDA, else 0).

    Returns:
        The :class:`ReplayReport`; check ``report.ok``.

    Example:
        >>> report = replay("runs/demo")  # doctest: +SKIP
        >>> [s.verdict.value for s in report.segments]  # doctest: +SKIP
        ['reproduced', 'reproduced']
    """
    from torch_integrity.executors import RayExecutor, make_executor
    from torch_integrity.rundir import open_run

    if workers < 1:
        raise UsageError("--workers must be at least 1")
    runner = make_executor(executor, workers=workers, ray_address=ray_address, ray_runtime_env=ray_runtime_env,
                           ray_connect_timeout=ray_connect_timeout, ray_gpus_per_task=ray_gpus_per_task)
    if tolerance is not None and not tolerance >= 0:
        raise UsageError("--tolerance must be a non-negative number")
    root = Path(run_dir)
    history = open_run(root)
    planned, notes = plan_segments(history)
    if not planned:
        raise UsageError(f"{root} has no complete segment (two checkpoints with steps between them) to replay")
    chosen = select_segments(planned, indices=segments, from_step=from_step, to_step=to_step, sample=sample, seed=seed)
    checked_code(chosen[0].run_start, allow_code_change)  # refuse here, before starting any worker
    probability = None
    if sample is not None:
        probability = len(chosen) / len(planned)
        notes.append(
            f"sampled {len(chosen)} of {len(planned)} segments with seed {seed}: a run with exactly one tampered "
            f"segment passes this check with probability {1 - probability:.3f}"
        )
    # absolute: Ray workers do not share this process's working directory
    # every job checks that its copy of the ledger extends the head verified here (a node
    # holding a rewritten copy is caught, not trusted)
    head = history.head.to_json()
    jobs = [(str(root.resolve()), s.index, factory, tolerance, allow_code_change, head) for s in chosen]
    if isinstance(runner, RayExecutor) and ray_gpus_per_task is None:
        runner.num_gpus = _gpus_per_segment(chosen)
    results: list[SegmentResult] = []
    with runner:
        for _, result in runner.map_as_completed(_replay_one, jobs):
            results.append(result)
            if progress:
                progress(result, len(results), len(jobs))
    results.sort(key=lambda r: r.index)
    return ReplayReport(str(root), history.run_id, len(planned), results, notes, probability)


def _gpus_per_segment(chosen: list[Segment]) -> int:
    """GPUs a segment's replay uses: one per recorded process for runs recorded on CUDA."""
    trainers = [s.run_start.get("trainer") or {} for s in chosen]
    return max((int(t.get("world_size") or 1) if t.get("accelerator") == "CUDAAccelerator" else 0 for t in trainers), default=0)
