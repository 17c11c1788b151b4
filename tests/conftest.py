"""Shared test set-up: import the package from this checkout, and skip GPU tests without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests run against this checkout even when it is not installed
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 steps, a checkpoint every 5: segment 0 reproduces, 1 and 2 diverge (state outside
    the state dict). Shared by the replay and executor tests."""
    from functools import partial

    from tests.lightning_models import SMALL, HiddenStateModule, capture
    from torch_integrity.demo import DemoDataModule

    run_dir = tmp_path_factory.mktemp("mixed") / "run"
    capture(run_dir, HiddenStateModule, partial(DemoDataModule, **SMALL), max_epochs=2, every=5)
    return run_dir
