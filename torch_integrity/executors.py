"""Where replay jobs run: this machine (``local``) or a Ray cluster (``ray``).

Segments are independent, so a replay is a list of jobs, each answered by one call of a
module-level function (``torch_integrity.replay._replay_one``). An :class:`Executor`
runs ``fn(job)`` for every job and yields ``(position, result)`` as each one finishes;
the caller reports progress in completion order and sorts the results afterwards.

* :class:`LocalExecutor` (the default): in this process when ``workers == 1``, otherwise
  a ``spawn`` process pool of ``workers`` processes on this machine.
* :class:`RayExecutor`: every job becomes a Ray task on an existing cluster
  (``ray.init(address=...)``). Ray is optional and imported only here, only when asked
  for: ``pip install 'torch-integrity[ray]'``.

See ``docs/scaling.md`` for how the run directory and the user's code reach the nodes.
"""

from __future__ import annotations

import abc
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from torch_integrity.errors import IntegrityError, ReplayEnvironmentError, UsageError

J = TypeVar("J")
R = TypeVar("R")

EXECUTORS = ("local", "ray")
RAY_INSTALL_HINT = "pip install 'torch-integrity[ray]'"
DEFAULT_CONNECT_TIMEOUT = 30.0
# Ray replaces a loopback address (127.0.0.1, localhost) by this machine's network address
# unless clusters are switched off; with them off, Ray stays on the loopback interface.
_RAY_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# how many times ray.init tries to reach the cluster's GCS (read when it connects)
_RAY_GCS_RETRIES_ENV = "RAY_gcs_server_port_wait_time_s"


class Executor(abc.ABC):
    """Runs jobs and yields ``(position in jobs, result)`` as each one finishes.

    Use it as a context manager: entering connects (or starts nothing), leaving releases
    whatever it holds. An exception raised by a job is raised by :meth:`map_as_completed`
    as the job raised it, and the jobs not yet finished are cancelled.
    """

    name: ClassVar[str]

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:  # noqa: B027 - optional hook
        """Acquire what the executor needs (a cluster connection); idempotent."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`start` acquired."""

    @abc.abstractmethod
    def map_as_completed(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[tuple[int, R]]:
        """Call ``fn(job)`` for every job; yield ``(position, result)`` in completion order."""


# ---- local --------------------------------------------------------------------------------


class LocalExecutor(Executor):
    """This machine: in this process (``workers == 1``) or a spawn process pool."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise UsageError("--workers must be at least 1")
        self.workers = workers

    def map_as_completed(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[tuple[int, R]]:
        if self.workers == 1 or len(jobs) <= 1:
            for position, job in enumerate(jobs):
                yield position, fn(job)
            return
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(jobs)), mp_context=context,
                                   initializer=_worker_init, initargs=(list(sys.path),))
        try:
            futures = {pool.submit(fn, job): position for position, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=futures.__getitem__):
                    yield futures[future], future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(paths: list[str]) -> None:
    """Start of a pool process: the parent's import path, one torch thread per process."""
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    torch.set_num_threads(1)


# ---- Ray ----------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UsageError(f"--executor ray needs Ray, which is not installed ({exc}): {RAY_INSTALL_HINT}") from None
    return ray


def parse_runtime_env(text: str | None) -> dict[str, Any] | None:
    """A Ray ``runtime_env`` from JSON text or from a JSON file's path (``None`` stays ``None``)."""
    if text is None:
        return None
    source = text
    if not text.lstrip().startswith("{"):
        try:
            source = Path(text).read_text()
        except OSError as exc:
            raise UsageError(f"--ray-runtime-env {text!r}: neither a JSON object nor a readable file ({exc.strerror})") from None
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--ray-runtime-env: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UsageError("--ray-runtime-env must be a JSON object, e.g. '{\"working_dir\": \".\"}'")
    return value


def split_address(address: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of ``HOST:PORT``, ``[IPv6]:PORT`` or ``ray://HOST:PORT``."""
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or scheme not in ("", "ray"):
        raise UsageError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:PORT")
    return scheme, host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe(host: str, port: int, address: str, timeout: float) -> None:
    """Fail fast, with a clear message, where nothing accepts connections at the address."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except TimeoutError:
        why = f"no answer within {timeout:g} s"
    except OSError as exc:
        why = exc.strerror or str(exc)
    raise UsageError(
        f"cannot reach a Ray cluster at {address} ({why}); start one with `ray start --head` on that machine, "
        "or pass the right --ray-address / RAY_ADDRESS"
    )


def _stay_on_loopback() -> None:
    """Keep a loopback address on loopback (Ray would swap in this machine's network address).

    A cluster started with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head
    --node-ip-address=127.0.0.1`` listens on 127.0.0.1 only; a driver that swapped the
    address would wait for it in vain. Ray reads the switch when it is first imported; if
    it already was, the module constant it came from is set as well. Clusters listening
    on every interface accept the loopback driver too. An explicit setting is respected.
    """
    if _RAY_SINGLE_MACHINE_ENV in os.environ:
        return
    os.environ[_RAY_SINGLE_MACHINE_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        vars(constants)["ENABLE_RAY_CLUSTER"] = False


def default_pythonpath() -> str:
    """This process's import path, less the interpreter's own folders, then the workers' own.

    So code importable here (a checkout on ``sys.path``, ``PYTHONPATH``, the current
    directory) is importable in Ray workers on this machine, or on nodes that hold the
    same paths (a shared filesystem).
    """
    own = {Path(p).resolve() for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}}
    paths: list[str] = []
    for entry in sys.path:
        path = Path(entry or os.getcwd()).resolve()
        if not path.is_dir() or any(path == p or p in path.parents for p in own) or str(path) in paths:
            continue
        paths.append(str(path))
    return os.pathsep.join([*paths, "${PYTHONPATH}"])


def ray_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """The ``runtime_env`` the tasks run in: the user's, with a default ``PYTHONPATH``.

    The default (:func:`default_pythonpath`) is added unless ``env_vars`` names
    ``PYTHONPATH`` itself; Ray puts a ``working_dir`` or ``py_modules`` in front of it.
    """
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars") or {})
    env_vars.setdefault("PYTHONPATH", default_pythonpath())
    env["env_vars"] = env_vars
    return env


class RayExecutor(Executor):
    """Every job a Ray task on an existing cluster.

    Args:
        address: the cluster's ``HOST:PORT`` (the head's GCS port, 6379 unless changed),
            ``ray://HOST:PORT`` (Ray Client) or ``auto`` (the cluster ``ray start`` started
            on this machine). Default: the ``RAY_ADDRESS`` environment variable.
        runtime_env: Ray ``runtime_env`` for the tasks (``working_dir``, ``py_modules``,
            ``pip``, ``env_vars``, ...); a default ``PYTHONPATH`` is added (see
            :func:`ray_runtime_env`).
        connect_timeout: seconds allowed to reach and join the cluster.
        num_cpus, num_gpus: resources each task asks for; ``num_gpus=1`` for runs recorded
            on CUDA (Ray hides GPUs from tasks that do not ask for them).

    If Ray is already connected in this process (``ray.init`` called by the caller), that
    connection is used and left open; ``address`` and ``connect_timeout`` are then unused.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        runtime_env: dict[str, Any] | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        num_cpus: float = 1,
        num_gpus: float = 0,
    ) -> None:
        self.ray = _import_ray()
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is None and not self.ray.is_initialized():
            raise UsageError("--executor ray needs the address of a running cluster: --ray-address HOST:PORT or RAY_ADDRESS "
                             "(start one with `ray start --head`)")
        if not connect_timeout > 0:
            raise UsageError("--ray-connect-timeout must be a positive number of seconds")
        if address is not None and address != "auto":
            split_address(address)
        self.address = address
        self.runtime_env = runtime_env
        self.connect_timeout = float(connect_timeout)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self._owns_connection = False
        self._task_env: dict[str, Any] | None = None

    def start(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            # the caller's connection: tasks get the runtime_env, the job keeps its own
            self._task_env = ray_runtime_env(self.runtime_env) if self.runtime_env is not None else None
            return
        assert self.address is not None
        if self.address != "auto":
            _, host, port = split_address(self.address)
            _probe(host, port, self.address, min(5.0, self.connect_timeout))
            if _is_loopback(host):
                _stay_on_loopback()
        outcome: dict[str, Any] = {}

        def connect() -> None:
            try:
                ray.init(address=self.address, runtime_env=ray_runtime_env(self.runtime_env), log_to_driver=False,
                         logging_level="warning", configure_logging=False)
            except BaseException as exc:  # reported by the caller's thread
                outcome["error"] = exc

        # ray.init can wait many minutes for a port that accepts connections but is no Ray
        # cluster (or one that hangs); a daemon thread bounds the wait. (Off the main thread
        # Ray installs no SIGTERM handler of its own, and says so: that notice is dropped.)
        # One connection attempt instead of Ray's 20 (about 40 s each where nothing answers
        # like a GCS), so an abandoned attempt ends soon too; a live head answers the first.
        retries_set = _RAY_GCS_RETRIES_ENV not in os.environ
        if retries_set:
            os.environ[_RAY_GCS_RETRIES_ENV] = "1"
        notice = _DropMessage("SIGTERM handler is not set")
        ray_logger = logging.getLogger("ray._private.worker")
        ray_logger.addFilter(notice)
        try:
            thread = threading.Thread(target=connect, name="ti-ray-connect", daemon=True)
            thread.start()
            thread.join(self.connect_timeout)
        finally:
            ray_logger.removeFilter(notice)
            if retries_set:
                os.environ.pop(_RAY_GCS_RETRIES_ENV, None)
        if thread.is_alive():
            raise UsageError(f"could not join the Ray cluster at {self.address} within {self.connect_timeout:g} s (something "
                             "answers at that address, but it does not act like a Ray head's GCS port); check --ray-address")
        error = outcome.get("error")
        if error is not None:
            if isinstance(error, IntegrityError):
                raise error
            raise UsageError(f"could not join the Ray cluster at {self.address}: {type(error).__name__}: {error}") from None
        self._owns_connection = True

    def close(self) -> None:
        if self._owns_connection:
            self._owns_connection = False
            self.ray.shutdown()

    def map_as_completed(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[tuple[int, R]]:
        ray = self.ray
        if not ray.is_initialized():
            self.start()
        self._check_fits()
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self._task_env is not None:
            options["runtime_env"] = self._task_env
        task = ray.remote(fn).options(**options)
        refs = {task.remote(job): position for position, job in enumerate(jobs)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield refs[ref], self._get(ref)
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # the task may be finishing; nothing to cancel
                    pass

    def _check_fits(self) -> None:
        """Refuse tasks no live node can run (Ray would keep them pending forever)."""
        nodes = [n.get("Resources") or {} for n in self.ray.nodes() if n.get("Alive")]
        if any(r.get("CPU", 0) >= self.num_cpus and r.get("GPU", 0) >= self.num_gpus for r in nodes):
            return
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no live node"
        raise UsageError(f"no node of the Ray cluster has the {self.num_cpus:g} CPU and {self.num_gpus:g} GPU one replay task "
                         f"needs (nodes: {have}); runs recorded on CUDA ask for a GPU per recorded process, "
                         "--ray-gpus-per-task 0 replays them on CPU")

    def _get(self, ref: Any) -> Any:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, IntegrityError):
                raise cause from None
            raise ReplayEnvironmentError(f"a Ray task failed: {_first_line(cause or exc)}; the user's code and "
                                         "torch-integrity must be importable on every node (see docs/scaling.md)") from None
        except ray.exceptions.RayError as exc:
            raise ReplayEnvironmentError(f"a Ray task could not run: {_first_line(exc)}") from None


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


# ---- choosing one -------------------------------------------------------------------------


def make_executor(
    name: str = "local",
    *,
    workers: int = 1,
    ray_address: str | None = None,
    ray_runtime_env: dict[str, Any] | None = None,
    ray_connect_timeout: float | None = None,
    ray_gpus_per_task: float | None = None,
) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``); checks the options without connecting."""
    if name == "local":
        given = [flag for flag, value in (("--ray-address", ray_address), ("--ray-runtime-env", ray_runtime_env),
                                          ("--ray-connect-timeout", ray_connect_timeout),
                                          ("--ray-gpus-per-task", ray_gpus_per_task)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need(s) --executor ray")
        return LocalExecutor(workers)
    if name == "ray":
        if ray_gpus_per_task is not None and not ray_gpus_per_task >= 0:
            raise UsageError("--ray-gpus-per-task must be 0 or more")
        return RayExecutor(ray_address, runtime_env=ray_runtime_env,
                           connect_timeout=DEFAULT_CONNECT_TIMEOUT if ray_connect_timeout is None else ray_connect_timeout,
                           num_gpus=ray_gpus_per_task or 0)
    raise UsageError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
