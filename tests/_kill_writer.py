"""Checkpoint writer for tests/test_crash_kill.py, meant to be killed with SIGKILL.

Importing torch takes seconds, so this process imports once and then forks one writer
per request (a "zygote"). Protocol on stdin/stdout, one line each:

    test -> zygote:  RUN_DIR
    zygote -> test:  pid PID            (a writer now appends to RUN_DIR until killed)
    zygote -> test:  exit STATUS        (when that writer died; -9 = SIGKILL)

Each writer reopens RUN_DIR/ledger.jsonl with LedgerWriter (which verifies it and drops
a torn tail), continues after the last checkpoint the ledger records, and loops:
save ``checkpoints/step-N.safetensors`` with store.save_checkpoint, append two
buffered ``step`` records, then a durable ``checkpoint`` record naming the file and its
digest (and the Merkle root of its tensors). The checkpoint for step N holds
``model.w`` filled with N, so a reader can tell a checkpoint's content from its name.

Run by hand: ``python tests/_kill_writer.py`` and type a folder name.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from torch_integrity.ledger import LEDGER_FILE, LedgerWriter, read_records  # noqa: E402
from torch_integrity.store import save_checkpoint  # noqa: E402

WEIGHT_SHAPE = (128, 256)  # 128 KiB of float32 per checkpoint: a write takes a few ms


def checkpoint_state(step: int) -> dict[str, object]:
    """The state saved at ``step`` (a pure function of it)."""
    return {
        "model": {"w": torch.full(WEIGHT_SHAPE, float(step)), "b": torch.arange(64, dtype=torch.int64) + step},
        "optimizer": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step": step,
    }


def write_forever(run_dir: Path) -> None:
    """Append checkpoints and records to ``run_dir`` until killed."""
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    ledger_path = run_dir / LEDGER_FILE
    writer = LedgerWriter(ledger_path)
    step = 0
    if writer.head.count:
        for record in read_records(ledger_path):
            if record.kind == "checkpoint":
                step = record.body["step"] + 1
    else:
        writer.append("run_start", {"run_id": "crash-test"}, durable=True)
    while True:
        relative = f"checkpoints/step-{step:09d}.safetensors"
        saved = save_checkpoint(run_dir / relative, checkpoint_state(step), threads=2)
        for micro in range(2):
            writer.append("step", {"step": step, "micro": micro})
        writer.append(
            "checkpoint",
            {"step": step, "file": relative, "file_digest": str(saved.file_digest), "tensors": str(saved.tensors.root)},
            durable=True,
        )
        step += 1


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        run_dir = Path(line.strip())
        pid = os.fork()
        if pid == 0:  # the writer
            try:
                write_forever(run_dir)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(3)
            os._exit(0)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {code}", flush=True)


if __name__ == "__main__":
    main()
