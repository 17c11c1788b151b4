"""The ``torch-integrity`` command line.

Exit codes: 0 verified, 1 integrity failure (tampering, mismatch, divergence),
2 usage error or unreadable input. Every error is handled here, in one place.

Each group of commands lives in its own module and registers its sub-parsers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from torch_integrity.errors import InputError, IntegrityError, VerificationFailure

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (one sub-command per verb)."""
    from torch_integrity.cli import data_commands, run_commands, signing_commands

    parser = argparse.ArgumentParser(
        prog="torch-integrity",
        description=(
            "Verify, replay and audit training runs recorded by torch-integrity's "
            "IntegrityCallback. Exit codes: 0 verified, 1 integrity failure, 2 usage error."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run_commands.register(commands)
    signing_commands.register(commands)
    data_commands.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except VerificationFailure as exc:
        print(f"INTEGRITY FAILURE: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except IntegrityError as exc:  # pragma: no cover - every error is one of the above
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
