"""The signing commands, run as real subprocesses, checked by exit code.

0 = done / verified, 1 = integrity failure, 2 = usage error or unreadable input.
Each ``python -m torch_integrity`` imports torch (about 2 s), so independent commands
run two at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _fake_run import build_fake_run, drop_last_records

ROOT = Path(__file__).resolve().parent.parent
KEY_ID = re.compile(r"ed25519:[0-9a-f]{32}")


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "torch_integrity", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False,
    )


def cli_many(commands: Sequence[Sequence[str | Path]]) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda c: cli(*c), commands))


def test_missing_required_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from torch_integrity.cli import main

    for argv in (["keygen"], ["approve", "run", "--key", "k"], ["verify-attestation", "f"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["keygen", "seal", "approve", "attest", "verify-attestation"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process: every subprocess here pays for importing torch, and --help needs none of it.
    from torch_integrity.cli import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "usage: torch-integrity " + command in text
    assert len(text) > 300  # a real description, not just the usage line


def test_signing_commands_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torch_integrity.attest import attest, verify_attestation
    from torch_integrity.cli import main
    from torch_integrity.keys import generate_key_files, load_private_key
    from torch_integrity.signing import check_seals, seal_run

    run = build_fake_run(tmp_path / "run")
    generate_key_files(tmp_path / "key")
    generate_key_files(tmp_path / "stranger")
    key, pub = tmp_path / "key", tmp_path / "key.pub"
    private = load_private_key(key)
    att = tmp_path / "att.json"
    attest(run.run_dir, 4, private, out=att)
    tampered = tmp_path / "tampered.json"
    document = json.loads(att.read_bytes())
    document["payloadType"] = "application/json"
    tampered.write_text(json.dumps(document))

    # Real subprocesses, two at a time: every verb's success, and one failure of each kind.
    cases: list[tuple[int, list[str | Path]]] = [
        (0, ["keygen", "--out", tmp_path / "alice"]),
        (2, ["keygen", "--out", key]),  # exists: never overwritten
        (0, ["seal", run.run_dir, "--key", key]),
        (0, ["approve", run.run_dir, "--step", "2", "--key", key, "--expires", "30d", "--reason", "eval ok"]),
        (0, ["attest", run.run_dir, "--step", "4", "--key", key, "--out", tmp_path / "cli-att.json"]),
        (0, ["verify-attestation", att, "--trusted-key", pub, "--run-dir", run.run_dir]),
        (1, ["verify-attestation", tampered, "--trusted-key", pub]),
        (2, ["approve", run.run_dir, "--step", "99", "--key", key]),
    ]
    results = cli_many([command for _, command in cases])
    for (expected, command), done in zip(cases, results, strict=True):
        assert done.returncode == expected, f"{command}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        if expected == 1:
            assert "INTEGRITY FAILURE" in done.stderr
    keygen = results[0]
    assert KEY_ID.fullmatch(keygen.stdout.strip())
    assert stat.S_IMODE((tmp_path / "alice").stat().st_mode) == 0o600
    assert (tmp_path / "alice.pub").exists()
    assert json.loads(keygen.stderr.split("policy file entry: ", 1)[1])["id"] == keygen.stdout.strip()
    assert "refusing to overwrite" in results[1].stderr
    assert "OK: attestation" in results[5].stdout
    # What the CLI wrote verifies through the Python API.
    assert len(check_seals(run.run_dir, [pub]).trusted) == 1
    assert verify_attestation(tmp_path / "cli-att.json", [pub], run_dir=run.run_dir).step == 4
    assert len(list((run.run_dir / "approvals").glob("*.json"))) == 1

    # More failures through the same entry point, in-process (no torch import per case).
    truncated = tmp_path / "truncated-run"
    shutil.copytree(run.run_dir, truncated)
    seal_run(truncated, private)
    drop_last_records(truncated, 1)
    in_process: list[tuple[int, list[str]]] = [
        (1, ["verify-attestation", str(att), "--trusted-key", str(tmp_path / "stranger.pub")]),
        (1, ["verify-attestation", str(att), "--trusted-key", str(pub), "--run-dir", str(truncated)]),
        (1, ["seal", str(truncated), "--key", str(key)]),  # this key sealed 9 records; 8 are left
        (2, ["approve", str(run.run_dir), "--step", "2", "--key", str(key), "--expires", "soon"]),
        (2, ["verify-attestation", str(tmp_path / "absent.json"), "--trusted-key", str(pub)]),
        (2, ["seal", str(run.run_dir), "--key", str(tmp_path / "no-such-key")]),
    ]
    for expected, argv in in_process:
        assert main(argv) == expected, argv
    capsys.readouterr()
