"""Placeholder: commands of this group are registered here."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    """Add this group's sub-commands to ``commands``."""
    del commands
    _ = argparse
