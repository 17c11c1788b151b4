"""The package's public names all resolve, and the CLI documents every command."""

from __future__ import annotations

import pytest

import torch_integrity
from torch_integrity.cli import build_parser


@pytest.mark.parametrize("name", torch_integrity.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(torch_integrity, name) is not None


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError):
        torch_integrity.no_such_thing  # noqa: B018


def test_every_command_has_help() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for expected in ("verify", "replay", "log", "rollback", "check-weights", "keygen", "seal", "approve", "attest",
                     "data-manifest", "data-usage"):
        assert expected in commands
    for name, sub in commands.items():
        assert sub.description and len(sub.description) > 20, f"{name} has no --help description"
