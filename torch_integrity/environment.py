"""What a run ran on, and what code it ran.

:func:`describe_environment` lists everything that can change floating-point results
(library versions, CUDA/cuDNN, GPU model, thread count, deterministic flags).
:func:`code_digest` hashes the source files that define the user's classes, so
replay can refuse edited code before anything runs.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch

from torch_integrity.canonical import canonical_json
from torch_integrity.digest import Digest


def describe_environment() -> dict[str, Any]:
    """Versions, devices and numeric settings of this process."""
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": [],
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if cuda:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append(
                {"name": props.name, "capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count}
            )
        try:
            info["cuda_driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except Exception:  # pragma: no cover - driver query is best effort
            info["cuda_driver"] = None
    return info


#: Keys whose difference means floating-point results may differ.
NUMERIC_KEYS = (
    "torch", "lightning", "numpy", "cuda", "cudnn", "gpus", "machine", "torch_threads",
    "deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark",
    "cublas_workspace_config", "matmul_tf32", "cudnn_tf32", "float32_matmul_precision",
)


def compare_environments(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences that may change numeric results ("key: was X, now Y")."""
    differences = []
    for key in NUMERIC_KEYS:
        if recorded.get(key) != current.get(key):
            differences.append(f"{key}: recorded {recorded.get(key)!r}, now {current.get(key)!r}")
    return differences


_LIBRARY_PACKAGES = frozenset(
    {"builtins", "abc", "typing", "collections", "torch", "lightning", "pytorch_lightning",
     "lightning_fabric", "lightning_utilities", "torchmetrics", "numpy", "torch_integrity"}
)


def _user_source_files(classes: Iterable[type]) -> dict[str, Path]:
    """Source files of the classes and their bases, leaving out the libraries we version."""
    files: dict[str, Path] = {}
    for cls in classes:
        for klass in inspect.getmro(cls):
            if klass.__module__.partition(".")[0] in _LIBRARY_PACKAGES:
                continue
            path = getattr(sys.modules.get(klass.__module__), "__file__", None)
            if path:
                files[klass.__module__] = Path(path).resolve()
    return files


def code_digest(classes: Iterable[type]) -> dict[str, Any]:
    """Digest of the source files defining ``classes`` (and their user-defined bases).

    Library code (torch, lightning, numpy, installed packages) is left out: its version
    is in the environment record.

    Returns:
        ``{"digest": "sha256:<hex>", "files": {module: "sha256:<hex>"}}``.
    """
    files = _user_source_files(classes)
    per_file = {}
    for module, path in sorted(files.items()):
        try:
            per_file[module] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            per_file[module] = "unreadable"
    total = hashlib.sha256(b"torch-integrity:code:v1\x00" + canonical_json(per_file)).hexdigest()
    return {"digest": str(Digest("sha256", total)), "files": per_file}


def import_path(obj: Any) -> str | None:
    """``module:QualName`` of an object's class, or None when it cannot be imported."""
    cls = obj if isinstance(obj, type) else type(obj)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    return f"{cls.__module__}:{cls.__qualname__}"
