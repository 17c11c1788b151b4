"""Dataset checks, manifest diffs, lineage chains, filter replay and per-sample usage in a run."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from torch_integrity.errors import DigestMismatchError, MalformedFileError, TamperedError, UsageError
from torch_integrity.ledger import LedgerWriter
from torch_integrity.lineage import (
    check_dataset,
    data_usage,
    diff_manifests,
    replay_transform,
    sample_usage,
    verify_lineage,
)
from torch_integrity.manifest import Manifest, Transform, build_manifest, manifest_reference

RAW = [(torch.tensor([float(i)]), i % 4) for i in range(20)]

FILTER_EVEN = '''
def keep_label(dataset, label):
    """Keep the samples whose label is ``label``."""
    return [dataset[i] for i in range(len(dataset)) if dataset[i][1] == label]
'''
FILTER_FIRST = '''
def first(dataset, count):
    """Keep the first ``count`` samples."""
    return [dataset[i] for i in range(count)]
'''


def _load(path: Path, name: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function: Callable[..., Any] = getattr(module, name)
    return function


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, Any]:
    """raw -> (keep_label label=1) -> labelled -> (first count=3) -> train."""
    (tmp_path / "keep_label.py").write_text(FILTER_EVEN)
    (tmp_path / "first.py").write_text(FILTER_FIRST)
    keep_label = _load(tmp_path / "keep_label.py", "keep_label")
    first = _load(tmp_path / "first.py", "first")
    raw = build_manifest(RAW, progress=False)
    labelled_data = keep_label(RAW, label=1)
    labelled = build_manifest(
        labelled_data, parent=raw, transform=Transform.from_file(tmp_path / "keep_label.py", {"label": 1}), progress=False
    )
    train = build_manifest(
        first(labelled_data, count=3),
        parent=labelled,
        transform=Transform.from_file(tmp_path / "first.py", {"count": 3}),
        progress=False,
    )
    return {
        "dir": tmp_path, "raw": raw, "labelled": labelled, "train": train,
        "labelled_data": labelled_data, "keep_label": keep_label, "first": first,
    }


# --- check_dataset and diff_manifests -----------------------------------------------------


def test_an_unchanged_dataset_matches() -> None:
    manifest = build_manifest(RAW, progress=False)
    assert check_dataset(RAW, manifest) == []
    check_dataset(list(RAW), manifest, enforce=True)


def test_a_changed_sample_is_found_by_index() -> None:
    manifest = build_manifest(RAW, progress=False)
    changed = list(RAW)
    changed[13] = (torch.tensor([13.0 + 1e-6]), 1)
    assert check_dataset(changed, manifest) == [13]
    with pytest.raises(DigestMismatchError, match="indices 13"):
        check_dataset(changed, manifest, enforce=True)


def test_added_and_removed_samples_are_found_by_index() -> None:
    manifest = build_manifest(RAW, progress=False)
    assert check_dataset([*RAW, RAW[0], RAW[1]], manifest) == [20, 21]
    assert check_dataset(RAW[:17], manifest) == [17, 18, 19]
    swapped = [RAW[1], RAW[0], *RAW[2:]]
    assert check_dataset(swapped, manifest) == [0, 1]


def test_enforce_names_the_first_indices_and_the_count() -> None:
    manifest = build_manifest(RAW, progress=False)
    shifted = RAW[1:]  # every index moves
    with pytest.raises(DigestMismatchError, match=r"20 differing samples .* indices 0, 1, 2, .* and 10 more"):
        check_dataset(shifted, manifest, enforce=True)


def test_diff_manifests_by_index() -> None:
    a = build_manifest(RAW, progress=False)
    b = build_manifest([*RAW[:5], ("other", 0), *RAW[6:], RAW[0]], progress=False)
    diff = diff_manifests(a, b)
    assert (diff.changed, diff.added, diff.removed) == ([5], [20], [])
    assert diff_manifests(b, a).removed == [20]
    assert diff_manifests(a, a).identical


def test_diff_of_folder_manifests_names_files_by_path(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("b", "c", "d"):
        (folder / name).write_text(name)
    before = build_manifest(folder, progress=False)
    (folder / "a").write_text("new")  # shifts every index
    (folder / "c").write_text("edited")
    (folder / "d").unlink()
    diff = diff_manifests(before, build_manifest(folder, progress=False))
    assert (diff.added_paths, diff.changed_paths, diff.removed_paths) == (["a"], ["c"], ["d"])
    assert diff.changed == [0, 1, 2]
    assert check_dataset(folder, before) == [0, 1, 2]


# --- lineage ------------------------------------------------------------------------------


def test_a_chain_from_raw_data_to_the_training_set_verifies(chain: dict[str, Any]) -> None:
    d = chain["dir"]
    report = verify_lineage(chain["raw"], chain["labelled"], chain["train"], code_files=[d / "keep_label.py", d / "first.py"])
    assert report.manifests == (chain["raw"].reference, chain["labelled"].reference, chain["train"].reference)
    assert report.code_checked == (True, True)
    assert [t.params for t in report.transforms if t] == [{"label": 1}, {"count": 3}]
    assert report.notes == ()


def test_a_chain_of_files_verifies(chain: dict[str, Any]) -> None:
    d = chain["dir"]
    for name in ("raw", "labelled", "train"):
        chain[name].save(d / f"{name}.manifest")
    report = verify_lineage(d / "raw.manifest", str(d / "labelled.manifest"), d / "train.manifest")
    assert report.code_checked == (False, False)


def test_filters_swapped_between_manifests_are_detected(chain: dict[str, Any]) -> None:
    d = chain["dir"]
    with pytest.raises(DigestMismatchError, match=r"first\.py for manifest 1"):
        verify_lineage(chain["raw"], chain["labelled"], chain["train"], code_files=[d / "first.py", d / "keep_label.py"])


def test_an_edited_filter_is_detected(chain: dict[str, Any]) -> None:
    d = chain["dir"]
    (d / "first.py").write_text(FILTER_FIRST.replace("range(count)", "range(count + 1)"))
    with pytest.raises(DigestMismatchError, match="manifest 2"):
        verify_lineage(chain["raw"], chain["labelled"], chain["train"], code_files=[None, d / "first.py"])


def test_a_broken_parent_link_is_detected(chain: dict[str, Any]) -> None:
    other_raw = build_manifest(RAW[:-1], progress=False)
    with pytest.raises(DigestMismatchError, match="parent of manifest 1"):
        verify_lineage(other_raw, chain["labelled"])
    with pytest.raises(DigestMismatchError, match="parent of manifest 1"):
        verify_lineage(chain["raw"], chain["train"])  # a link skipped
    orphan = build_manifest(chain["labelled_data"], progress=False)
    with pytest.raises(DigestMismatchError, match="no parent"):
        verify_lineage(chain["raw"], orphan)


def test_a_link_without_a_filter_is_noted_and_cannot_pass_a_code_check(chain: dict[str, Any]) -> None:
    child = build_manifest(chain["labelled_data"], parent=chain["raw"], progress=False)
    report = verify_lineage(chain["raw"], child)
    assert any("records no filter" in note for note in report.notes)
    with pytest.raises(DigestMismatchError, match="no filter recorded"):
        verify_lineage(chain["raw"], child, code_files=[chain["dir"] / "first.py"])


def test_a_chain_that_starts_mid_way_is_noted(chain: dict[str, Any]) -> None:
    report = verify_lineage(chain["labelled"], chain["train"])
    assert "not given" in report.notes[0]


def test_lineage_usage_errors(chain: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        verify_lineage()
    with pytest.raises(UsageError, match="one code file"):
        verify_lineage(chain["raw"], chain["labelled"], code_files=[])


# --- replay_transform ---------------------------------------------------------------------


def test_replaying_the_filter_confirms_the_child(chain: dict[str, Any]) -> None:
    replay_transform(RAW, chain["keep_label"], chain["labelled"])
    replay_transform(chain["labelled_data"], chain["first"], chain["train"])


def test_replay_on_a_changed_parent_dataset_fails(chain: dict[str, Any]) -> None:
    poisoned = list(RAW)
    poisoned[2] = (torch.tensor([99.0]), 2)  # not kept by the filter, but part of the parent
    with pytest.raises(DigestMismatchError, match="parent dataset"):
        replay_transform(poisoned, chain["keep_label"], chain["labelled"])


def test_replay_of_a_filter_that_does_not_give_the_child_fails(chain: dict[str, Any], tmp_path: Path) -> None:
    # the recorded code, but a child manifest whose samples were edited after filtering
    edited = [*chain["labelled_data"][:2], ("poison", 1), *chain["labelled_data"][3:]]
    child = build_manifest(
        edited, parent=chain["raw"], transform=chain["labelled"].transform, progress=False
    )
    with pytest.raises(DigestMismatchError, match="indices 2"):
        replay_transform(RAW, chain["keep_label"], child)


def test_replay_with_other_filter_code_fails(chain: dict[str, Any]) -> None:
    with pytest.raises(DigestMismatchError, match="filter code"):
        replay_transform(RAW, chain["first"], chain["labelled"])
    with pytest.raises(DigestMismatchError):  # skipping the code check still compares samples
        replay_transform(RAW, lambda ds, label: ds, chain["labelled"], check_code=False)


def test_replay_needs_a_recorded_parent_and_filter() -> None:
    with pytest.raises(UsageError):
        replay_transform(RAW, lambda ds: ds, build_manifest(RAW, progress=False))


# --- data usage ---------------------------------------------------------------------------


def _run(tmp_path: Path, batches: list[list[int] | None], manifest: Manifest | None = None) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with LedgerWriter(run_dir / "ledger.jsonl") as ledger:
        ledger.append(
            "run_start",
            {
                "format": "torch-integrity-run-v1",
                "run_id": "abc123",
                "data_manifest": manifest_reference(manifest) if manifest else None,
            },
            durable=True,
        )
        for step, indices in enumerate(batches, start=1):
            ledger.append("step", {"step": step, "epoch": 0, "batch_idx": step - 1, "indices": indices})
        ledger.append("run_end", {"steps": len(batches)}, durable=True)
    return run_dir


def test_data_usage_lists_the_steps_that_trained_a_sample(tmp_path: Path) -> None:
    manifest = build_manifest(RAW, progress=False)
    run_dir = _run(tmp_path, [[0, 1, 2], [3, 4, 5], [5, 0, 7], None, [1, 5, 5]], manifest)
    assert data_usage(run_dir, 5) == [2, 3, 5]
    assert data_usage(str(run_dir), 0) == [1, 3]
    assert data_usage(run_dir, 19) == []
    usage = sample_usage(run_dir, 5)
    assert usage.run_id == "abc123"
    assert usage.steps_without_indices == 1
    assert usage.data_manifest == [manifest_reference(manifest)]


def test_data_usage_verifies_the_ledger_first(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, [[0, 1], [2, 3]])
    ledger = run_dir / "ledger.jsonl"
    ledger.write_bytes(ledger.read_bytes().replace(b'"indices":[2,3]', b'"indices":[2,9]'))
    with pytest.raises(TamperedError):
        data_usage(run_dir, 9)


def test_data_usage_refuses_bad_indices_and_records(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, [[0, "x"]])
    with pytest.raises(MalformedFileError):
        data_usage(run_dir, 3)
    with pytest.raises(UsageError):
        data_usage(run_dir, -1)
