"""Detection on real runs: THREATS.md rows 5-9 and 19, and state a checkpoint cannot hold.

Each test tampers with a captured run (or replays it with something changed) and
asserts the verdict or error, and the step, check or file/tensor it names.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.lightning_models import (
    SMALL,
    HiddenStateModule,
    LossWeightModule,
    PerturbableDataModule,
    SeededDataModule,
    TaggedModule,
    WarmupModule,
    capture,
    step_bodies,
)
from torch_integrity.demo import DemoDataModule, DemoModule
from torch_integrity.digest import digest_state_dict
from torch_integrity.errors import DigestMismatchError
from torch_integrity.replay import CodeChangedError, Verdict, replay
from torch_integrity.rundir import open_run
from torch_integrity.store import load_checkpoint_with_metadata, save_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

SEGMENTS = [(0, 5), (5, 10), (10, 12)]
MODELS = "tests.lightning_models"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DemoModule, 2 epochs of 6 batches, a checkpoint every 5 steps: segments 0-5, 5-10, 10-12."""
    run_dir = tmp_path_factory.mktemp("detect") / "base"
    capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL))
    return run_dir


@pytest.fixture(scope="module")
def other_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("detect") / "other"
    capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL), seed=77)
    return run_dir


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    """A private copy of the base run to tamper with."""
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:09d}.safetensors"


def _divergences(report) -> list[tuple[int, int, str, int | None, str | None]]:  # type: ignore[no-untyped-def]
    return [
        (s.start_step, s.end_step, s.verdict.value,
         None if s.divergence is None else s.divergence["step"],
         None if s.divergence is None else s.divergence["check"])
        for s in report.segments
    ]


# ---- row 5: a checkpoint swapped for another step's, or another run's --------------------------------


def test_checkpoint_swapped_for_another_steps_file(run: Path) -> None:
    shutil.copyfile(_ckpt(run, 5), _ckpt(run, 10))
    history = open_run(run)  # the ledger itself is intact
    with pytest.raises(DigestMismatchError, match=r"step-000000010\.safetensors"):
        history.load_checkpoint(history.checkpoint_at(10))
    with pytest.raises(DigestMismatchError, match=r"step-000000010\.safetensors"):
        replay(run, segments=[2])  # the segment starting from the swapped file
    with pytest.raises(DigestMismatchError, match=r"step-000000010\.safetensors"):
        capture(run, DemoModule, partial(DemoDataModule, **SMALL), ckpt_path=_ckpt(run, 10))


def test_checkpoint_swapped_for_another_runs_file(run: Path, other_run: Path) -> None:
    shutil.copyfile(_ckpt(other_run, 5), _ckpt(run, 5))
    history = open_run(run)
    with pytest.raises(DigestMismatchError, match=r"step-000000005\.safetensors") as caught:
        history.load_checkpoint(history.checkpoint_at(5))
    assert caught.value.expected == history.checkpoint_at(5).file_digest
    with pytest.raises(DigestMismatchError, match=r"step-000000005\.safetensors"):
        replay(run, segments=[1])
    # the segments that never load the swapped file still replay
    assert replay(run, segments=[2]).segments[0].verdict is Verdict.REPRODUCED


# ---- row 6: weights replaced by a fine-tuned copy --------------------------------------------------------


def test_fine_tuned_weights_in_a_checkpoint_file(run: Path) -> None:
    path = _ckpt(run, 10)
    state, metadata = load_checkpoint_with_metadata(path, expected=None)
    tuned = state["state_dict"]["net.3.weight"] + 1e-3 * torch.randn_like(state["state_dict"]["net.3.weight"])
    state["state_dict"]["net.3.weight"] = tuned
    keep = {k: metadata[k] for k in ("torch_integrity.run_id", "torch_integrity.step")}
    save_checkpoint(path, state, metadata=keep)  # same names, shapes and structure; nothing re-recorded

    history = open_run(run)
    entry = history.checkpoint_at(10)
    with pytest.raises(DigestMismatchError, match=r"step-000000010\.safetensors"):
        history.load_checkpoint(entry)
    with pytest.raises(DigestMismatchError, match=r"step-000000010\.safetensors"):
        history.load_model_state(entry)
    with pytest.raises(DigestMismatchError, match=r"step-000000010\.safetensors"):
        replay(run, segments=[2])
    # the weights as exported (no file digest to lean on) are located tensor by tensor
    computed = digest_state_dict(state["state_dict"])
    assert computed.root != entry.model.root
    assert computed.differing(entry.model) == ["net.3.weight"]


def test_replay_names_the_tensor_when_end_weights_differ(tmp_path: Path) -> None:
    """Replay computes weights that differ from the recorded end checkpoint (a buffer the
    loss never sees): the segment diverges at its end step on "weights", naming the tensor."""
    run_dir = tmp_path / "run"
    capture(run_dir, TaggedModule, partial(DemoDataModule, **SMALL))
    report = replay(run_dir, factory=f"{MODELS}:changed_tag_factory")
    assert _divergences(report) == [(a, b, "diverged", b, "weights") for a, b in SEGMENTS]
    for segment in report.segments:
        names = [t["name"] for t in segment.divergence["tensors"]]
        assert names == ["tag"], segment.reason
        assert "tag" in segment.reason


def test_fingerprints_locate_the_first_step_with_different_weights(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    capture(run_dir, TaggedModule, partial(DemoDataModule, **SMALL), callback_kwargs={"fingerprint_every_n_steps": 1})
    assert all("fp" in b for b in step_bodies(run_dir))
    report = replay(run_dir, factory=f"{MODELS}:changed_tag_factory")
    assert _divergences(report) == [(a, b, "diverged", a + 1, "weights") for a, b in SEGMENTS]


# ---- row 7: one training sample changed after the run --------------------------------------------------


def test_changed_training_sample_diverges_at_the_first_step_that_used_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    capture(run_dir, DemoModule, partial(PerturbableDataModule, **SMALL))
    bodies = step_bodies(run_dir)
    changed = bodies[2]["indices"][3]  # a sample of step 3 (and of some step in epoch 1)
    monkeypatch.setenv("TI_TEST_CHANGED_SAMPLE", str(changed))

    report = replay(run_dir, factory=f"{MODELS}:perturbed_sample_factory")
    expected = []
    for start, end in SEGMENTS:
        used = [b["step"] for b in bodies if start < b["step"] <= end and changed in b["indices"]]
        expected.append((start, end, "diverged", used[0], "data") if used else (start, end, "reproduced", None, None))
    assert _divergences(report) == expected
    assert expected[0][3] == 3
    assert sum(1 for e in expected if e[2] == "diverged") == 2  # once per epoch
    for segment in report.segments:
        if segment.divergence is not None:
            assert segment.divergence["batch_idx"] == next(
                b["batch_idx"] for b in bodies if b["step"] == segment.divergence["step"])

    # the unchanged data reproduces everything (the factory itself changes nothing else)
    monkeypatch.setenv("TI_TEST_CHANGED_SAMPLE", "-1")
    assert all(s.verdict is Verdict.REPRODUCED for s in replay(run_dir, factory=f"{MODELS}:perturbed_sample_factory").segments)


def test_changed_data_seed_hyperparameter_diverges_on_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    capture(run_dir, DemoModule, partial(SeededDataModule, data_seed=0, **SMALL))
    monkeypatch.setenv("TI_TEST_DATA_SEED", "1")
    report = replay(run_dir, factory=f"{MODELS}:changed_data_seed_factory")
    assert _divergences(report) == [(a, b, "diverged", a + 1, "data") for a, b in SEGMENTS]


# ---- row 8: learning rate or another hyperparameter changed for replay -------------------------------


def test_changed_learning_rate_diverges_at_the_first_step(tmp_path: Path) -> None:
    """A module that sets its lr from its hyperparameter every batch (hand-written warmup)."""
    run_dir = tmp_path / "run"
    capture(run_dir, WarmupModule, partial(DemoDataModule, **SMALL))
    lrs = [b["lr"][0][0] for b in step_bodies(run_dir)]
    assert lrs[:5] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01])
    report = replay(run_dir, factory=f"{MODELS}:changed_warmup_lr_factory")
    assert _divergences(report) == [(a, b, "diverged", a + 1, "lr") for a, b in SEGMENTS]
    first = report.segments[0].divergence
    assert first["recorded"] == [[0.0025]] and first["reproduced"] == [[0.005]]


def test_lr_from_configure_optimizers_comes_from_the_verified_checkpoint(base_run: Path) -> None:
    """DemoModule(lr=...) only sets the optimizer's initial lr; replay restores the optimizer
    state (lr included) from the verified checkpoint, so the replay trains with the recorded
    lr, checks it at every step, and truthfully reproduces."""
    report = replay(base_run, factory=f"{MODELS}:changed_lr_factory")
    assert all(s.verdict is Verdict.REPRODUCED for s in report.segments), _divergences(report)
    assert {b["lr"][0][0] for b in step_bodies(base_run)} == {0.01}
    # ... and the report says the factory did not build what the run recorded
    assert all(any("hyperparameters lr" in note for note in s.factory_differences) for s in report.segments)
    assert "factory's objects differ" in report.segments[0].reason


def test_changed_loss_hyperparameter_diverges_at_the_first_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    capture(run_dir, LossWeightModule, partial(DemoDataModule, **SMALL))
    report = replay(run_dir, factory=f"{MODELS}:changed_loss_weight_factory")
    assert _divergences(report) == [(a, b, "diverged", a + 1, "loss") for a, b in SEGMENTS]


# ---- row 9: model code edited between capture and replay ----------------------------------------------


MODEL_SOURCE = '''
from torch_integrity.demo import DemoModule

TRAINED = [0]


class EditableModule(DemoModule):
    def training_step(self, batch, batch_idx):
        TRAINED[0] += 1
        return super().training_step(batch, batch_idx)
'''


@pytest.fixture
def editable_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    folder = tmp_path / "usercode"
    folder.mkdir()
    source = folder / "ti_editable_model.py"
    source.write_text(textwrap.dedent(MODEL_SOURCE))
    monkeypatch.syspath_prepend(str(folder))
    import importlib

    module = importlib.import_module("ti_editable_model")
    yield module, source
    sys.modules.pop("ti_editable_model", None)


def test_edited_model_code_is_refused_before_training(tmp_path: Path, editable_module) -> None:  # type: ignore[no-untyped-def]
    module, source = editable_module
    run_dir = tmp_path / "run"
    capture(run_dir, module.EditableModule, partial(DemoDataModule, **SMALL))
    recorded = open_run(run_dir).start[0]
    assert recorded["module"] == "ti_editable_model:EditableModule"
    assert "ti_editable_model" in recorded["code"]["files"]

    source.write_text(source.read_text() + "\n# an edit after the run\n")
    module.TRAINED[0] = 0
    with pytest.raises(CodeChangedError, match="ti_editable_model"):
        replay(run_dir)
    assert module.TRAINED[0] == 0  # refused before anything trained

    report = replay(run_dir, allow_code_change=True)
    assert module.TRAINED[0] > 0
    for segment in report.segments:
        assert "CHANGED CODE" in segment.reason
        assert segment.code_changed and segment.code_changed[0].startswith("ti_editable_model")
        assert segment.verdict is Verdict.REPRODUCED  # a comment changes nothing that runs


def test_edited_model_code_is_refused_with_a_factory_too(tmp_path: Path, editable_module) -> None:  # type: ignore[no-untyped-def]
    module, source = editable_module
    run_dir = tmp_path / "run"
    capture(run_dir, module.EditableModule, partial(DemoDataModule, **SMALL), max_epochs=1)
    source.write_text(source.read_text().replace("TRAINED[0] += 1", "TRAINED[0] += 2"))
    module.TRAINED[0] = 0
    with pytest.raises(CodeChangedError, match="ti_editable_model"):
        replay(run_dir, factory=f"{MODELS}:changed_lr_factory")
    assert module.TRAINED[0] == 0


# ---- row 19: environment differences ----------------------------------------------------------------------


def test_environment_differences_are_reported(base_run: Path) -> None:
    recorded = open_run(base_run).start[0]["environment"]["torch_threads"]
    before = torch.get_num_threads()
    torch.set_num_threads(2 if recorded == 1 else 1)
    try:
        report = replay(base_run, segments=[0])
    finally:
        torch.set_num_threads(before)
    segment = report.segments[0]
    assert any(d.startswith("torch_threads") for d in segment.environment_differences), segment.environment_differences
    if segment.verdict is Verdict.REPRODUCED:  # (a bigger model may honestly diverge here)
        assert "environment that differs" in segment.reason
    same = replay(base_run, segments=[0]).segments[0]
    assert same.environment_differences == []
    assert same.reason == "reproduced bit for bit"


# ---- state outside the state dict -------------------------------------------------------------------------


def test_state_outside_the_state_dict_is_never_falsely_reproduced(tmp_path: Path) -> None:
    """HiddenStateModule scales its loss by a plain tensor attribute that grows every step.
    A checkpoint cannot hold it, so a replay that starts after step 0 computes different
    losses: those segments must diverge (on "loss", at their first step). Segment 0 starts
    from the same fresh state as the run did and honestly reproduces."""
    run_dir = tmp_path / "run"
    capture(run_dir, HiddenStateModule, partial(DemoDataModule, **SMALL))
    report = replay(run_dir)
    assert _divergences(report) == [
        (0, 5, "reproduced", None, None),
        (5, 10, "diverged", 6, "loss"),
        (10, 12, "diverged", 11, "loss"),
    ]
