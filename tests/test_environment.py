"""The environment recorded in run_start and the differences replay reports."""

from __future__ import annotations

from pathlib import Path

from torch_integrity.environment import compare_environments, describe_environment, nvidia_driver_version

# As the NVIDIA kernel module writes it (two real layouts: open and proprietary modules).
PROPRIETARY = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)\n"


def test_driver_version_is_read_from_the_kernel_module_file(tmp_path: Path) -> None:
    for text, expected in [(PROPRIETARY, "550.54.15"), (OPEN, "570.86.15"), ("garbage\n", None)]:
        path = tmp_path / "version"
        path.write_text(text)
        assert nvidia_driver_version(str(path)) == expected
    assert nvidia_driver_version(str(tmp_path / "absent")) is None


def test_gpu_settings_are_compared_only_for_gpu_runs() -> None:
    here = describe_environment()
    for key in ("torch", "cuda", "cudnn", "gpus", "torch_threads", "deterministic_algorithms", "matmul_tf32"):
        assert key in here
    gpu_box = {**here, "gpus": [{"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132}],
               "cudnn": 91002, "cuda_driver": "550.54.15"}
    cpu_run = {**here, "gpus": [], "cudnn": None, "cuda_driver": None}
    assert compare_environments(cpu_run, gpu_box, gpu=False) == []
    found = compare_environments(cpu_run, gpu_box, gpu=True)
    assert {line.split(":")[0] for line in found} == {"gpus", "cudnn", "cuda_driver"}
    other_gpu = {**gpu_box, "gpus": [{"name": "NVIDIA A100-SXM4-80GB", "capability": "8.0", "sm_count": 108}]}
    assert [line.split(":")[0] for line in compare_environments(gpu_box, other_gpu)] == ["gpus"]
    # a CPU-only setting still counts without a GPU
    assert [line.split(":")[0] for line in compare_environments(cpu_run, {**cpu_run, "torch": "0.0"}, gpu=False)] == ["torch"]
