"""Entry point for replaying one segment of a distributed run (used by ``replay``).

    python -m torch_integrity.ddp_replay RUN_DIR SEGMENT --out RESULT.json

Lightning's DDP launcher re-runs this command line for every other rank; each rank
replays its own recorded batches, and rank zero writes the segment's result as JSON.
Exit codes follow the CLI: 1 integrity failure, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from torch_integrity.errors import InputError, VerificationFailure
from torch_integrity.replay import DDP_CHILD_ENV, replay_segment


def main(argv: list[str] | None = None) -> int:
    """Replay the segment; rank zero writes the result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("segment", type=int)
    parser.add_argument("--out", required=True)
    parser.add_argument("--factory")
    parser.add_argument("--tolerance", type=float)
    parser.add_argument("--allow-code-change", action="store_true")
    args = parser.parse_args(argv)
    os.environ[DDP_CHILD_ENV] = "1"
    try:
        result = replay_segment(args.run_dir, args.segment, factory=args.factory, tolerance=args.tolerance,
                                allow_code_change=args.allow_code_change)
    except VerificationFailure as exc:
        print(f"INTEGRITY FAILURE: {exc}", file=sys.stderr)
        return 1
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        with open(args.out, "w") as handle:
            json.dump(result.to_json(), handle, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
