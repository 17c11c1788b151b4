"""A run bound to a dataset manifest: replay checks every sample it feeds against it."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest

from torch_integrity import IntegrityCallback
from torch_integrity.demo import DemoDataModule, DemoModule, NoisyDataset
from torch_integrity.errors import ReplayEnvironmentError, VerificationFailure
from torch_integrity.manifest import write_manifest
from torch_integrity.replay import Verdict, replay
from torch_integrity.rundir import open_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bound_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("bound")
    manifest = folder / "train.manifest"
    write_manifest(NoisyDataset(48, 16), manifest, progress=False)
    run_dir = folder / "run"
    pl.seed_everything(2, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_epochs=1, deterministic=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[IntegrityCallback(run_dir, checkpoint_every_n_steps=3, data_manifest=manifest)])
        trainer.fit(DemoModule(), DemoDataModule(size=48))
    return run_dir, manifest


def test_run_records_the_manifest_and_replays(bound_run: tuple[Path, Path]) -> None:
    run_dir, manifest = bound_run
    reference = open_run(run_dir).start[0]["data_manifest"]
    assert reference["count"] == 48 and reference["path"] == str(manifest.resolve())
    assert all(s.verdict is Verdict.REPRODUCED for s in replay(run_dir).segments)


def test_a_changed_sample_is_named_against_the_manifest(bound_run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = bound_run
    steps = [r.body for r in open_run(run_dir).iter_steps()]
    poisoned = steps[4]["indices"][2]  # first used at step 5 (an epoch uses each sample once)
    monkeypatch.setenv("TI_POISON_INDEX", str(poisoned))
    monkeypatch.syspath_prepend(str(ROOT))
    report = replay(run_dir, factory="tests.ddp_factories:poisoned_single_process")
    diverged = [s for s in report.segments if s.verdict is Verdict.DIVERGED]
    assert [s.index for s in diverged] == [1]
    divergence = diverged[0].divergence
    assert divergence is not None and divergence["check"] == "manifest" and divergence["step"] == 5
    assert str(poisoned) in divergence["reproduced"]


def test_a_missing_or_altered_manifest_is_refused(bound_run: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    run_dir, manifest = bound_run
    saved = tmp_path / "saved"
    shutil.copy(manifest, saved)
    try:
        manifest.unlink()
        with pytest.raises(ReplayEnvironmentError, match="manifest"):
            replay(run_dir, segments=[0])
        write_manifest(NoisyDataset(48, 16, seed=9), manifest, progress=False)  # another dataset at the same path
        with pytest.raises(VerificationFailure):
            replay(run_dir, segments=[0])
    finally:
        shutil.copy(saved, manifest)
