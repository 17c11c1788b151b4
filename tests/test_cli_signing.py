"""The signing commands, run as real subprocesses, checked by exit code.

0 = done / verified, 1 = integrity failure, 2 = usage error or unreadable input.
Each ``python -m torch_integrity`` that touches a run imports torch (about 2 s), so
independent commands run two at a time.
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
from _fake_run import FakeRun, build_fake_run, drop_last_records

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


def test_keygen(tmp_path: Path) -> None:
    done = cli("keygen", "--out", tmp_path / "alice")
    assert done.returncode == 0, done.stderr
    assert KEY_ID.fullmatch(done.stdout.strip())
    assert stat.S_IMODE((tmp_path / "alice").stat().st_mode) == 0o600
    assert (tmp_path / "alice.pub").exists()
    entry = json.loads(done.stderr.split("policy file entry: ", 1)[1])
    assert entry["id"] == done.stdout.strip()
    again = cli("keygen", "--out", tmp_path / "alice")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    missing = cli("keygen")
    assert missing.returncode == 2


@pytest.mark.parametrize("command", ["keygen", "seal", "approve", "attest", "verify-attestation"])
def test_help(command: str) -> None:
    done = cli(command, "--help")
    assert done.returncode == 0
    assert "usage: torch-integrity " + command in done.stdout
    assert len(done.stdout) > 300  # a real description, not just the usage line


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[FakeRun, Path]:
    """A run sealed, approved at step 2 and attested at step 4 through the CLI."""
    from torch_integrity.keys import generate_key_files

    folder = tmp_path_factory.mktemp("cli")
    run = build_fake_run(folder / "run")
    generate_key_files(folder / "key")
    results = cli_many(
        [
            ["seal", run.run_dir, "--key", folder / "key"],
            ["approve", run.run_dir, "--step", "2", "--key", folder / "key", "--expires", "30d", "--reason", "eval ok"],
            ["attest", run.run_dir, "--step", "4", "--key", folder / "key", "--out", folder / "att.json"],
        ]
    )
    for done in results:
        assert done.returncode == 0, done.stderr
    assert len(list((run.run_dir / "seals").glob("*.json"))) == 1
    assert len(list((run.run_dir / "approvals").glob("*.json"))) == 1
    return run, folder


def test_signing_commands_exit_codes(signed: tuple[FakeRun, Path], tmp_path: Path) -> None:
    run, folder = signed
    key, pub, att = folder / "key", folder / "key.pub", folder / "att.json"
    from torch_integrity.keys import generate_key_files

    generate_key_files(tmp_path / "stranger")
    tampered = tmp_path / "tampered.json"
    document = json.loads(att.read_bytes())
    document["payloadType"] = "application/json"
    tampered.write_text(json.dumps(document))
    truncated = tmp_path / "truncated-run"
    shutil.copytree(run.run_dir, truncated)
    drop_last_records(truncated, 1)

    cases: list[tuple[int, list[str | Path]]] = [
        (0, ["verify-attestation", att, "--trusted-key", pub, "--run-dir", run.run_dir]),
        (1, ["verify-attestation", tampered, "--trusted-key", pub]),
        (1, ["verify-attestation", att, "--trusted-key", tmp_path / "stranger.pub"]),
        (1, ["verify-attestation", att, "--trusted-key", pub, "--run-dir", truncated]),
        (1, ["seal", truncated, "--key", key]),  # the key sealed 9 records; 8 are left
        (2, ["approve", run.run_dir, "--step", "99", "--key", key]),
        (2, ["approve", run.run_dir, "--step", "2", "--key", key, "--expires", "soon"]),
        (2, ["verify-attestation", tmp_path / "absent.json", "--trusted-key", pub]),
    ]
    results = cli_many([command for _, command in cases])
    for (expected, command), done in zip(cases, results, strict=True):
        assert done.returncode == expected, f"{command}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        if expected == 1:
            assert "INTEGRITY FAILURE" in done.stderr
    assert "OK: attestation" in results[0].stdout
