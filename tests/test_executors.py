"""Executors: the local pool and Ray tasks give the same verdicts; Ray's errors are usage errors.

The Ray tests start a one-machine Ray cluster on the loopback interface only
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address=127.0.0.1``, 2
CPUs, no dashboard, no usage stats) in a process group of its own, and end that group
when the module is done. They are skipped where Ray is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.lightning_models import SMALL, capture
from torch_integrity.cli import main as cli
from torch_integrity.demo import DemoDataModule, DemoModule
from torch_integrity.errors import UsageError
from torch_integrity.executors import LocalExecutor, default_pythonpath, make_executor, parse_runtime_env, ray_runtime_env
from torch_integrity.replay import SegmentResult, Verdict, replay

HAVE_RAY = importlib.util.find_spec("ray") is not None

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _summary(results: list[SegmentResult]) -> list[tuple]:
    return [
        (s.index, s.start_step, s.end_step, s.verdict, s.steps_checked,
         None if s.divergence is None else (s.divergence["step"], s.divergence["check"]))
        for s in results
    ]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps, a checkpoint every 2: three segments that reproduce."""
    run_dir = tmp_path_factory.mktemp("executors") / "good"
    capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL), max_epochs=1, every=2)
    return run_dir


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A Ray head on 127.0.0.1 with 2 CPUs; yields its address, ends its process group afterwards."""
    port = _free_port()
    folder = tempfile.mkdtemp(prefix="ti-ray-")  # short: Ray's socket paths must fit 107 bytes
    log = Path(folder) / "head.log"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli) if ray_cli.exists() else shutil.which("ray") or "ray", "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
               "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={folder}"]
    with log.open("wb") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop() -> None:
        # SIGTERM first (Ray's graceful shutdown), then SIGKILL for what is left after 5 s
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)  # the group this fixture started, and only that
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(folder, ignore_errors=True)

    deadline = time.monotonic() + 60
    try:
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        assert "Local node IP: 127.0.0.1" in log.read_text(errors="replace"), "the Ray head left the loopback interface"
    except BaseException:
        stop()
        raise
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop()


# ---- without a cluster ----------------------------------------------------------------------


def test_local_executor_yields_every_job_with_its_position() -> None:
    with LocalExecutor(1) as runner:
        assert sorted(runner.map_as_completed(abs, [-3, 1, -2])) == [(0, 3), (1, 1), (2, 2)]
    with pytest.raises(UsageError):
        LocalExecutor(0)


def test_ray_options_need_the_ray_executor(good_run: Path) -> None:
    with pytest.raises(UsageError, match="--ray-address"):
        make_executor("local", ray_address="127.0.0.1:1")
    with pytest.raises(UsageError, match="unknown executor"):
        make_executor("spark")
    assert cli(["replay", str(good_run), "--ray-address", "127.0.0.1:1"]) == 2


def test_without_ray_installed_the_ray_executor_says_what_to_install(
    good_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'torch-integrity\[ray\]'"):
        replay(good_run, executor="ray", ray_address="127.0.0.1:6379")
    assert cli(["replay", str(good_run), "--executor", "ray", "--ray-address", "127.0.0.1:6379"]) == 2
    assert "torch-integrity[ray]" in capsys.readouterr().err


def test_runtime_env_from_json_or_file_and_the_default_pythonpath(tmp_path: Path) -> None:
    assert parse_runtime_env(None) is None
    assert parse_runtime_env('{"working_dir": "."}') == {"working_dir": "."}
    path = tmp_path / "env.json"
    path.write_text('{"py_modules": ["/opt/code"]}')
    assert parse_runtime_env(str(path)) == {"py_modules": ["/opt/code"]}
    for bad in ("[1]", "{oops", str(tmp_path / "missing.json")):
        with pytest.raises(UsageError):
            parse_runtime_env(bad)
    root = str(Path(__file__).resolve().parent.parent)
    assert root in default_pythonpath().split(os.pathsep)  # this checkout (conftest puts it on sys.path)
    assert default_pythonpath().endswith("${PYTHONPATH}")  # the workers' own path still follows
    env = ray_runtime_env({"working_dir": "."})
    assert env["working_dir"] == "." and env["env_vars"]["PYTHONPATH"] == default_pythonpath()
    mine = ray_runtime_env({"env_vars": {"PYTHONPATH": "/srv/code", "X": "1"}})
    assert mine["env_vars"] == {"PYTHONPATH": "/srv/code", "X": "1"}  # the user's own PYTHONPATH wins


# ---- Ray ----------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["nohost", "127.0.0.1:http", "127.0.0.1:0", "tcp://127.0.0.1:6379"])
@pytest.mark.ray
@pytest.mark.skipif(not HAVE_RAY, reason="needs the optional ray extra")
def test_malformed_ray_addresses_are_usage_errors(good_run: Path, address: str) -> None:
    with pytest.raises(UsageError, match="HOST:PORT"):
        replay(good_run, executor="ray", ray_address=address)


@pytest.mark.ray
@pytest.mark.skipif(not HAVE_RAY, reason="needs the optional ray extra")
def test_no_address_is_a_usage_error(good_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UsageError, match="RAY_ADDRESS"):
        replay(good_run, executor="ray")


@pytest.mark.ray
@pytest.mark.skipif(not HAVE_RAY, reason="needs the optional ray extra")
def test_unreachable_address_fails_fast_with_exit_2(
    good_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{_free_port()}"  # closed: nothing listens there
    began = time.monotonic()
    with pytest.raises(UsageError, match="cannot reach a Ray cluster at " + address):
        replay(good_run, executor="ray", ray_address=address)
    monkeypatch.setenv("RAY_ADDRESS", address)  # the default address
    assert cli(["replay", str(good_run), "--executor", "ray"]) == 2
    assert f"cannot reach a Ray cluster at {address}" in capsys.readouterr().err
    assert time.monotonic() - began < 10


@pytest.mark.ray
@pytest.mark.skipif(not HAVE_RAY, reason="needs the optional ray extra")
def test_ray_tasks_give_the_local_pools_verdicts(mixed_run: Path, ray_cluster: str) -> None:
    local = replay(mixed_run, workers=2)
    seen: list[tuple[int, int, int]] = []
    remote = replay(mixed_run, executor="ray", ray_address=ray_cluster,
                    progress=lambda result, done, total: seen.append((result.index, done, total)))
    assert _summary(remote.segments) == _summary(local.segments)
    # the run really has both verdicts, so the comparison above means something
    assert [s.verdict for s in remote.segments] == [Verdict.REPRODUCED, Verdict.DIVERGED, Verdict.DIVERGED]
    assert remote.ok is local.ok is False
    # progress as segments finish (any order), the report in segment order
    assert sorted(index for index, _, _ in seen) == [0, 1, 2]
    assert [(done, total) for _, done, total in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [s.index for s in remote.segments] == [0, 1, 2]


@pytest.mark.ray
@pytest.mark.skipif(not HAVE_RAY, reason="needs the optional ray extra")
def test_cli_replays_a_run_through_ray(good_run: Path, ray_cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    code = cli(["replay", str(good_run), "--executor", "ray", "--ray-address", ray_cluster,
                "--ray-runtime-env", '{"env_vars": {"TI_TEST": "1"}}', "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report
    assert report["replayed"] == report["total_segments"] == 3
    assert [s["verdict"] for s in report["segments"]] == ["reproduced"] * 3
    import ray

    assert not ray.is_initialized()  # the connection it opened is closed again


@pytest.mark.ray
@pytest.mark.skipif(not HAVE_RAY, reason="needs the optional ray extra")
def test_a_port_that_is_not_ray_times_out(good_run: Path) -> None:
    """Something listens, but it is no Ray head: bounded by the connect timeout. (Runs last: the
    abandoned connection attempt goes on for about 40 s in a daemon thread.)"""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        began = time.monotonic()
        with pytest.raises(UsageError, match="within 3 s"):
            replay(good_run, executor="ray", ray_address=address, ray_connect_timeout=3)
        assert time.monotonic() - began < 8
