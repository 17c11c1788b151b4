"""verify / log / rollback / check-weights / replay on a real run, through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from torch_integrity import IntegrityCallback
from torch_integrity.audit import check_weights, rollback, verify_run
from torch_integrity.cli import main as cli
from torch_integrity.demo import DemoDataModule, DemoModule
from torch_integrity.errors import DigestMismatchError, MissingFileError, TamperedError, UnsafePathError
from torch_integrity.safetensors_io import load_safetensors_buffer, write_safetensors

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "run"
    pl.seed_everything(3, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_epochs=1, deterministic=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[IntegrityCallback(path, checkpoint_every_n_steps=4)])
        trainer.fit(DemoModule(), DemoDataModule(size=48))
    return path


@pytest.fixture
def copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch_integrity", *args], capture_output=True, text=True, env=env, timeout=300)


def test_verify_passes_and_lists_every_checkpoint(run_dir: Path) -> None:
    report = verify_run(run_dir)
    assert report.checkpoints_verified == [0, 4, 6]
    assert report.finished and report.steps == 6 and report.extra_files == []


def test_cli_verify_log_rollback_check_weights(run_dir: Path, tmp_path: Path) -> None:
    assert run_cli("verify", str(run_dir)).returncode == 0
    log = run_cli("log", str(run_dir), "--json")
    assert log.returncode == 0
    history = json.loads(log.stdout)
    assert [c["step"] for c in history["checkpoints"]] == [0, 4, 6]
    assert all(Path(c["path"]).is_file() for c in history["checkpoints"])
    out = tmp_path / "w.safetensors"
    assert run_cli("rollback", str(run_dir), "--step", "4", "--out", str(out)).returncode == 0
    result = run_cli("check-weights", str(out), str(run_dir))
    assert result.returncode == 0 and "step 4" in result.stdout


def test_flipped_bit_in_a_checkpoint_is_named(copy: Path) -> None:
    victim = copy / "checkpoints" / "step-000000004.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match="step-000000004"):
        verify_run(copy)
    assert cli(["verify", str(copy)]) == 1


def test_checkpoint_swapped_for_another_step_is_detected(copy: Path) -> None:
    shutil.copy(copy / "checkpoints" / "step-000000006.safetensors", copy / "checkpoints" / "step-000000004.safetensors")
    with pytest.raises(DigestMismatchError, match="step-000000004"):
        verify_run(copy)


def test_missing_symlinked_and_extra_files(copy: Path) -> None:
    (copy / "notes.txt").write_text("hello")
    assert verify_run(copy).extra_files == ["notes.txt"]
    target = copy / "checkpoints" / "step-000000004.safetensors"
    moved = copy.parent / "elsewhere.safetensors"
    target.rename(moved)
    with pytest.raises(MissingFileError):
        verify_run(copy)
    target.symlink_to(moved)
    with pytest.raises(UnsafePathError):
        verify_run(copy)
    assert cli(["verify", str(copy)]) == 1


def test_truncated_ledger_is_reported_or_caught_against_a_head(copy: Path) -> None:
    head = verify_run(copy).head
    ledger = copy / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:-1]))  # drop run_end
    report = verify_run(copy)
    assert not report.finished and any("truncation cannot be ruled out" in n for n in report.notes)
    from torch_integrity.errors import TruncatedError

    with pytest.raises(TruncatedError):
        verify_run(copy, head=head)
    assert cli(["verify", str(copy), "--head", f"{head.count}:{head.hash}"]) == 1


def test_check_weights_names_the_differing_tensor(run_dir: Path, tmp_path: Path) -> None:
    out = rollback(run_dir, 6, tmp_path / "final.safetensors")
    assert check_weights(out, run_dir).step == 6
    tensors, _ = load_safetensors_buffer(bytearray(out.read_bytes()), what="x")
    tuned = {name: t.clone() for name, t in tensors.items()}
    tuned["net.3.bias"] += 1e-3  # a "fine-tuned" copy: same names and shapes
    tampered = tmp_path / "tuned.safetensors"
    with open(tampered, "wb") as handle:
        write_safetensors(handle, sorted(tuned.items()))
    with pytest.raises(DigestMismatchError) as caught:
        check_weights(tampered, run_dir)
    assert caught.value.differing == ("net.3.bias",)
    assert cli(["check-weights", str(tampered), str(run_dir)]) == 1


def test_pickle_is_refused_with_usage_exit(run_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.safetensors"
    torch.save({"x": Evil()}, evil)
    assert cli(["check-weights", str(evil), str(run_dir)]) == 2
    assert not marker.exists()


def test_tampered_ledger_record_fails_verify_and_replay(copy: Path) -> None:
    ledger = copy / "ledger.jsonl"
    text = ledger.read_text().replace('"epoch":0', '"epoch":1', 1)
    ledger.write_text(text)
    with pytest.raises(TamperedError):
        verify_run(copy)
    assert cli(["replay", str(copy)]) == 1


def test_cli_replay_reproduces_and_writes_json(run_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "replay.json"
    result = run_cli("replay", str(run_dir), "--json", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["ok"] and [s["verdict"] for s in data["segments"]] == ["reproduced", "reproduced"]
    assert "REPRODUCED BIT FOR BIT" in result.stdout


def test_usage_errors_exit_2(run_dir: Path, tmp_path: Path) -> None:
    assert cli(["rollback", str(run_dir), "--step", "3", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert cli(["replay", str(run_dir), "--sample", "1"]) == 2
    assert cli(["verify", str(tmp_path / "nope")]) == 2
