"""The data-* commands, run as real subprocesses: exit codes 0/1/2 and what they print.

Starting Python and importing torch takes about two seconds, so the commands are
prepared once and started together, then each test reads its command's result.
Variations that need no new process run in-process through ``cli.main``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from torch_integrity.cli import build_parser, main
from torch_integrity.ledger import LedgerWriter
from torch_integrity.manifest import Transform, load_manifest, manifest_reference, write_manifest
from torch_integrity.proofs import prove_inclusion

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def _folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def _run_dir(path: Path, manifest_ref: dict[str, Any] | None) -> Path:
    path.mkdir()
    with LedgerWriter(path / "ledger.jsonl") as ledger:
        ledger.append("run_start", {"format": "torch-integrity-run-v1", "run_id": "abc123", "data_manifest": manifest_ref})
        for step, indices in enumerate([[0, 1], [2, 3], [3, 0]], start=1):
            ledger.append("step", {"step": step, "epoch": 0, "batch_idx": step - 1, "indices": indices})
        ledger.append("run_end", {"steps": 3}, durable=True)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("cli-data")
    data = _folder(base / "data", {"a.txt": "alpha", "b/c.txt": "gamma", "b/d.txt": "delta", "e.bin": "epsilon"})
    raw = write_manifest(data, base / "raw.manifest", progress=False)
    (base / "keep.py").write_text("def keep(ds):\n    return ds\n")
    (base / "other.py").write_text("def other(ds):\n    return ds[:1]\n")
    clean = _folder(base / "clean", {"a.txt": "alpha", "b/c.txt": "gamma"})
    write_manifest(clean, base / "clean.manifest", parent=raw, transform=Transform.from_file(base / "keep.py"), progress=False)
    changed = _folder(base / "changed", {"a.txt": "ALPHA", "b/c.txt": "gamma", "b/d.txt": "delta", "f.txt": "new"})
    linked = _folder(base / "linked", {"a.txt": "alpha"})
    (linked / "link.txt").symlink_to(linked / "a.txt")
    proof = prove_inclusion(load_manifest(base / "raw.manifest"), 1)
    (base / "proof.json").write_text(json.dumps(proof.to_json()))
    bad = proof.to_json()
    bad["path"][0] = ("1" if bad["path"][0][0] != "1" else "2") + bad["path"][0][1:]
    (base / "bad-proof.json").write_text(json.dumps(bad))
    (base / "garbage.json").write_text('{"format": "torch-integrity-inclusion-proof-v1"}')
    run = _run_dir(base / "run", manifest_reference(load_manifest(base / "raw.manifest")))
    tampered = _run_dir(base / "tampered-run", None)
    ledger = tampered / "ledger.jsonl"
    ledger.write_bytes(ledger.read_bytes().replace(b'"indices":[2,3]', b'"indices":[2,4]'))
    root, size = str(raw.root), str(raw.count)
    commands = {  # each exit code once, as a real process; other cases run in-process below
        "manifest": ["data-manifest", clean, "--out", base / "cli-clean.manifest", "--parent", base / "raw.manifest",
                     "--transform-code", base / "keep.py", "--transform-params", '{"k": 1}', "--license", "MIT",
                     "--source-url", "https://example.org/d", "--retrieved-at", "2024-05-01T00:00:00+00:00"],
        "check": ["data-check", changed, base / "raw.manifest"],
        "verify_garbage": ["data-verify-proof", base / "garbage.json", "--root", root, "--size", size],
        "usage": ["data-usage", run, "--index", "3", "--json", "--manifest", base / "raw.manifest"],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "torch_integrity", *map(str, argv)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=base,
        )
        for name, argv in commands.items()
    }
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=120)
        results[name] = Result(process.returncode, out, err)
    return {"base": base, "results": results, "raw": raw}


def test_data_manifest_records_provenance_parent_and_filter(setup: dict[str, Any]) -> None:
    result = setup["results"]["manifest"]
    assert result.code == 0, result.err
    manifest = load_manifest(setup["base"] / "cli-clean.manifest")
    assert f"root         {manifest.root}" in result.out and "2 files" in result.out
    assert manifest.parent == setup["raw"]
    assert manifest.transform is not None and manifest.transform.params == {"k": 1}
    provenance = manifest.provenance_of(1)
    assert provenance is not None and provenance.license == "MIT" and provenance.source_url == "https://example.org/d"
    assert manifest.root == load_manifest(setup["base"] / "clean.manifest").root  # same files, same root


def test_data_check_lists_changed_added_and_removed_files(setup: dict[str, Any]) -> None:
    result = setup["results"]["check"]
    assert result.code == 1
    assert "changed (1): a.txt" in result.out
    assert "added (1): f.txt" in result.out
    assert "removed (1): e.bin" in result.out
    assert result.err.startswith("INTEGRITY FAILURE")


def test_data_prove_prints_proofs_that_verify(setup: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data-prove", str(setup["base"] / "raw.manifest"), "--index", "1", "--index", "3"]) == 0
    text = capsys.readouterr().out
    proofs = json.loads(text)
    assert [p["index"] for p in proofs] == [1, 3]
    assert proofs[0]["sample_path"] == "b/c.txt"  # a.txt, b/c.txt, b/d.txt, e.bin
    (setup["base"] / "two.json").write_text(text)
    assert main(["data-verify-proof", str(setup["base"] / "two.json"),
                 "--root", str(setup["raw"].root), "--size", "4"]) == 0
    assert capsys.readouterr().out.count("verified: sample") == 2


def test_data_verify_proof_of_garbage_is_a_usage_error(setup: dict[str, Any]) -> None:
    result = setup["results"]["verify_garbage"]
    assert result.code == 2 and "not an inclusion proof" in result.err


def test_data_usage_reports_steps_as_json(setup: dict[str, Any]) -> None:
    result = setup["results"]["usage"]
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["steps"] == [2, 3] and report["run_id"] == "abc123"
    assert report["sample_path"] == "e.bin" and report["sample_digest"].startswith("sha256-sample-v1:")
    assert report["data_manifest"]["root"] == str(setup["raw"].root)


# --- in-process variations -----------------------------------------------------------------


def test_verify_proof_with_the_sample_file_and_a_bad_proof(
    setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    base, root = setup["base"], str(setup["raw"].root)
    assert main(["data-verify-proof", str(base / "proof.json"), "--root", root, "--size", "4",
                 "--sample-file", str(base / "data" / "b" / "c.txt")]) == 0
    assert "verified: sample 1 b/c.txt" in capsys.readouterr().out
    assert main(["data-verify-proof", str(base / "proof.json"), "--root", root, "--size", "4",
                 "--sample-file", str(base / "data" / "a.txt")]) == 1
    assert main(["data-verify-proof", str(base / "bad-proof.json"), "--root", root, "--size", "4"]) == 1
    assert main(["data-verify-proof", str(base / "proof.json"), "--root", root, "--size", "5"]) == 1
    assert capsys.readouterr().err.count("INTEGRITY FAILURE") == 3


def test_integrity_failures_exit_1(setup: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    base = setup["base"]
    assert main(["data-manifest", str(base / "linked"), "--out", str(base / "linked.manifest")]) == 1
    assert "link.txt" in capsys.readouterr().err and not (base / "linked.manifest").exists()
    assert main(["data-usage", str(base / "tampered-run"), "--index", "4"]) == 1
    assert main(["data-lineage", str(base / "raw.manifest"), str(base / "clean.manifest"),
                 "--code", str(base / "other.py")]) == 1
    assert "other.py" in capsys.readouterr().err


def test_lineage_diff_and_usage_text_in_process(setup: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    base = setup["base"]
    assert main(["data-lineage", str(base / "raw.manifest"), str(base / "clean.manifest"),
                 "--code", str(base / "keep.py")]) == 0
    assert "lineage verified" in capsys.readouterr().out
    assert main(["data-diff", str(base / "raw.manifest"), str(base / "raw.manifest")]) == 0
    assert main(["data-diff", str(base / "raw.manifest"), str(base / "clean.manifest")]) == 1
    assert "removed (2): b/d.txt, e.bin" in capsys.readouterr().out
    assert main(["data-usage", str(base / "run"), "--index", "0"]) == 0
    assert "trained at 2 step(s): 1, 3" in capsys.readouterr().out
    assert main(["data-usage", str(base / "run"), "--index", "0", "--manifest", str(base / "clean.manifest")]) == 1


def test_usage_errors_exit_2(setup: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    base = setup["base"]
    root = str(setup["raw"].root)
    cases = [
        ["data-prove", str(base / "raw.manifest"), "--index", "4"],
        ["data-prove", str(base / "missing.manifest"), "--index", "0"],
        ["data-verify-proof", str(base / "proof.json"), "--root", "not-a-digest", "--size", "4"],
        ["data-verify-proof", str(base / "proof.json"), "--root", root, "--size", "0"],
        ["data-manifest", str(base / "data"), "--out", str(base / "x.manifest"), "--transform-params", "{}"],
        ["data-manifest", str(base / "data"), "--out", str(base / "x.manifest"), "--retrieved-at", "yesterday"],
        ["data-check", str(base / "data"), str(base / "proof.json")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
    assert capsys.readouterr().err.count("error:") == len(cases)


def test_every_data_command_has_help() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    names = [n for n in commands.choices if n.startswith("data-")]
    assert sorted(names) == sorted(
        ["data-manifest", "data-check", "data-diff", "data-lineage", "data-prove", "data-verify-proof", "data-usage"]
    )
    for name in names:
        text = commands.choices[name].format_help()
        assert "Exit codes: 0 verified, 1 integrity failure, 2 usage error" in text, name
