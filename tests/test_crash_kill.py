"""THREATS row 14 for real: a checkpoint writer killed with SIGKILL at random moments.

``tests/_kill_writer.py`` saves checkpoints and appends a durable ``checkpoint`` record
after each one. We kill it KILLS times (delays from a fixed seed) and after every kill
check what a crash may and may not leave behind:

* the ledger verifies, and still holds every record that was there before the kill;
  a torn last line is tolerated only because reopening the writer removes it;
* every checkpoint the ledger records exists, matches its recorded digest, loads, and
  holds the content of its step (so it is not a partial or mixed file);
* temporary files (``fsutil.TEMP_PREFIX``) are never recorded;
* the next writer resumes the chain after the last recorded checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

from torch_integrity.digest import Digest, digest_state_dict
from torch_integrity.errors import TruncatedError
from torch_integrity.fsutil import TEMP_PREFIX, resolve_inside
from torch_integrity.ledger import LEDGER_FILE, LedgerHead, LedgerWriter, read_records, verify_ledger
from torch_integrity.store import load_checkpoint

HELPER = Path(__file__).with_name("_kill_writer.py")
KILLS = 24
SEED = 20240614


class Zygote:
    """The helper process; forks one writer per ``start``."""

    def __init__(self, log: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(HELPER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        assert self._readline() == "ready"

    def _readline(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line:
            raise AssertionError(f"the writer helper died: {self.process.wait()}")
        return line

    def start(self, run_dir: Path) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{run_dir}\n")
        self.process.stdin.flush()
        word, pid = self._readline().split()
        assert word == "pid"
        return int(pid)

    def wait_exit(self) -> int:
        word, code = self._readline().split()
        assert word == "exit"
        return int(code)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def check_after_kill(run_dir: Path, previous: LedgerHead | None, verified: dict[str, str]) -> tuple[LedgerHead, bool]:
    """All the invariants; returns the ledger head and whether a torn tail was repaired."""
    ledger_path = run_dir / LEDGER_FILE
    torn = False
    try:
        verify_ledger(ledger_path)
    except TruncatedError:
        # Allowed only if reopening the writer removes it (and nothing else).
        torn = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            LedgerWriter(ledger_path).close()
        assert any("cut short" in str(w.message) or "lacked its newline" in str(w.message) for w in caught)
    head = verify_ledger(ledger_path, head=previous)  # everything recorded before is still there
    recorded_files = set()
    last_step = -1
    for record in read_records(ledger_path):
        if record.kind != "checkpoint":
            continue
        body = record.body
        assert not Path(body["file"]).name.startswith(TEMP_PREFIX)
        assert body["step"] == last_step + 1  # one checkpoint per step, in order, across resumes
        last_step = body["step"]
        recorded_files.add(body["file"])
        if body["file"] in verified:  # loaded at an earlier kill; its bytes are re-hashed below
            assert verified[body["file"]] == body["file_digest"]
            continue
        path = resolve_inside(run_dir, body["file"])  # exists, no symlink on the way
        state = load_checkpoint(path, expected=Digest.parse(body["file_digest"]))  # whole and unaltered
        assert state["step"] == body["step"]
        assert torch.equal(state["model"]["w"], torch.full((128, 256), float(body["step"])))
        assert str(digest_state_dict(safetensors.torch.load_file(path)).root) == body["tensors"]
        verified[body["file"]] = body["file_digest"]
    # Nothing recorded earlier was lost, rewritten or changed on disk since.
    for relative, digest in verified.items():
        assert relative in recorded_files
        assert Digest.parse(digest).hex == hashlib.sha256(resolve_inside(run_dir, relative).read_bytes()).hexdigest()
    return head, torn


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_loses_nothing_recorded(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rng = random.Random(SEED)
    zygote = Zygote(tmp_path / "writer.log")
    head: LedgerHead | None = None
    verified: dict[str, str] = {}
    torn_tails = 0
    kills_with_temp_files = 0
    temp_files_seen: set[str] = set()
    try:
        for _ in range(KILLS):
            pid = zygote.start(run_dir)
            time.sleep(rng.uniform(0.02, 0.35))
            os.kill(pid, signal.SIGKILL)
            code = zygote.wait_exit()
            assert code == -signal.SIGKILL, (tmp_path / "writer.log").read_text()
            temps = {p.name for p in run_dir.glob(f"checkpoints/{TEMP_PREFIX}*")}
            kills_with_temp_files += bool(temps - temp_files_seen)
            temp_files_seen |= temps
            new_head, torn = check_after_kill(run_dir, head, verified)
            torn_tails += torn
            assert head is None or new_head.count >= head.count
            head = new_head
        # Resume once more by hand: the chain continues.
        with LedgerWriter(run_dir / LEDGER_FILE) as writer:
            assert writer.head == head
            writer.append("run_end", {"kills": KILLS}, durable=True)
        assert verify_ledger(run_dir / LEDGER_FILE, head=head).count == head.count + 1
    finally:
        zygote.close()
    recorded = len(verified)
    print(
        f"{KILLS} kills: {recorded} checkpoints recorded, {len(temp_files_seen)} partial temp files left by "
        f"{kills_with_temp_files} kills, {torn_tails} torn ledger tails repaired"
    )
    assert recorded >= KILLS  # the writer made progress between kills (this is not a vacuous pass)
    assert kills_with_temp_files >= 1  # some kills did land in the middle of writing a checkpoint
