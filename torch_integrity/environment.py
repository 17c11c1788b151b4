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
import re
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
        info["cuda_driver"] = nvidia_driver_version()
    return info


def nvidia_driver_version(proc_file: str = "/proc/driver/nvidia/version") -> str | None:
    """The NVIDIA kernel driver's version (``"550.54.15"``), or None where it cannot be read.

    Read from the driver's own ``/proc`` file on Linux (torch has no query for it).
    """
    try:
        text = Path(proc_file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


#: Keys whose difference means floating-point results may differ.
NUMERIC_KEYS = (
    "torch", "lightning", "numpy", "cuda", "cudnn", "gpus", "cuda_driver", "machine", "torch_threads",
    "deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark",
    "cublas_workspace_config", "matmul_tf32", "cudnn_tf32", "float32_matmul_precision",
)
#: Keys that matter only when the run computed on a GPU.
GPU_KEYS = frozenset({"cudnn", "gpus", "cuda_driver", "cudnn_deterministic", "cudnn_benchmark",
                      "cublas_workspace_config", "matmul_tf32", "cudnn_tf32"})


def compare_environments(recorded: Mapping[str, Any], current: Mapping[str, Any], *, gpu: bool = True) -> list[str]:
    """Human-readable differences that may change numeric results ("key: was X, now Y").

    Args:
        recorded: the environment in ``run_start``.
        current: this process's (:func:`describe_environment`).
        gpu: whether the run trained on a GPU; without one, GPU-only settings and the
            machine's GPUs are not compared (a CPU run replayed on a GPU machine).
    """
    differences = []
    for key in NUMERIC_KEYS:
        if not gpu and key in GPU_KEYS:
            continue
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
