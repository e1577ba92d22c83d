"""Executors: who runs the (model, dataset) groups of a run.

``run_groups`` yields each group's result as soon as it is finished, so the driver
(``benchmarks.run``) writes it to the store at once and a killed run loses only the groups
that were running. The driver alone writes the store; executors only compute.

- ``local``: the groups in turn, in this process, in suite order.
- ``ray``: every group as a Ray task, yielded in completion order. With no address a
  private local Ray is started (``num_cpus`` CPUs, default all) and shut down at the end;
  with ``ray_address`` (``host:port`` of a running cluster's GCS, ``ray://host:port``, or
  ``auto`` for the cluster ``ray start`` left on this machine) the run joins that cluster
  and the harness's packages are shipped to its workers. If the caller already called
  ``ray.init``, that connection is used as it is and left open.

Results equal the local executor's: CPU float results depend on torch's thread count
(training with 1 or 2 threads gives weights that differ by ~0.05 on the smoke suite), so
every task runs with the driver's ``torch.get_num_threads()`` and asks Ray for that many
CPUs (at most what the largest node has). The machines must have the same kind of CPU for
bit-identical numbers. Models are trained inside the tasks and cached in
``spec.cache_dir``, which must be a filesystem every node shares; the cache writes each
file atomically, so two tasks training the same model leave one whole copy.

Ray is imported only by the ray executor: ``pip install ray`` to use it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.engine.group import GroupResult, GroupSpec, failed_result, run_group
from cambench.benchmarks.engine.progress import log

EXECUTORS = ("local", "ray")
PROBE_TIMEOUT_S = 5.0  # an address that does not answer in this time is unreachable


def group_name(spec: GroupSpec) -> str:
    return spec.plan.name


def _failed(spec: GroupSpec, exc: BaseException, detail: str = "") -> GroupResult:
    """The result of a group that raised: error cells with the message; the traceback goes
    to the log, and the other groups run on."""
    log(f"group {group_name(spec)} failed:\n{detail or traceback.format_exc()}")
    return failed_result(spec.plan, exc)


def run_groups(
    specs: list[GroupSpec],
    *,
    executor: str = "local",
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> Iterator[tuple[GroupSpec, GroupResult]]:
    """Run the groups and yield ``(spec, result)`` for each as soon as it is finished: in
    suite order for ``local``, in completion order for ``ray``.

    Bad options raise ``UserError`` here; Ray is started (or joined) when iteration
    begins. A group that raises ``UserError`` re-raises it unchanged; a group that raises
    anything else (or whose Ray worker dies) yields a result of error cells with the
    message (``group.failed_result``), and the other groups run. Close the iterator (``contextlib.closing``)
    to cancel the groups still running when the driver stops early.

    >>> list(run_groups([]))
    []
    """
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor!r} is not an executor; choose one of: local, ray")
    if num_cpus is not None and (
        isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1
    ):
        raise UserError(f"--num-cpus must be a whole number >= 1, got {num_cpus!r}")
    specs = list(specs)
    if executor == "local":
        if ray_address is not None or num_cpus is not None:
            raise UserError("--ray-address and --num-cpus apply to --executor ray only; drop them")
        return _run_local(specs)
    if ray_address is not None and num_cpus is not None:
        raise UserError(
            f"--num-cpus applies to a local Ray only; the cluster at {ray_address} has its own "
            "CPUs: drop --num-cpus"
        )
    try:
        import ray
    except ImportError:
        raise UserError(
            "--executor ray needs Ray, which is not installed: pip install ray"
        ) from None
    return _run_ray(ray, specs, ray_address=ray_address, num_cpus=num_cpus)


def _run_local(specs: list[GroupSpec]) -> Iterator[tuple[GroupSpec, GroupResult]]:
    for spec in specs:
        try:
            result = run_group(spec)
        except UserError:
            raise
        except Exception as exc:
            result = _failed(spec, exc)
        yield spec, result


def _group_task(spec: GroupSpec, *, threads: int, cwd: str) -> GroupResult:
    """The body of a Ray task: one group with the driver's thread count and directory."""
    torch.set_num_threads(threads)
    if os.path.isdir(cwd):  # suite paths (dataset roots, checkpoints) may be relative
        os.chdir(cwd)
    if spec.device.startswith("cuda"):  # Ray exposes the GPU it assigned as cuda:0
        spec = dataclasses.replace(spec, device="cuda")
    return run_group(spec)


def _probe(address: str) -> None:
    """Fail fast on an address nothing answers at: ray.init would retry it for ever."""
    if address == "auto":
        return  # Ray itself says at once when it finds no cluster on this machine
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(
            f"--ray-address {address!r} is not an address; give host:port of the cluster's "
            "head (e.g. 10.0.0.5:6379), ray://host:10001, or auto"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"--ray-address {address}: no Ray cluster answers there ({reason}); start one with "
            "`ray start --head` or drop --ray-address to use a local Ray"
        ) from None


def _staged_code() -> str:
    """A folder ``cambench/`` holding copies of the four packages this process runs, for
    Ray's ``py_modules``: the workers import ``cambench.*`` as this checkout has it (a Ray
    module must be one folder; the packages are installed under one namespace, not in one
    folder of the checkout)."""
    from cambench import benchmarks, cams, datasets, metrics

    stage = Path(tempfile.mkdtemp(prefix="cambench-ray-")) / "cambench"
    for package in (benchmarks, cams, datasets, metrics):
        source = Path(package.__file__).parent
        shutil.copytree(
            source, stage / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return str(stage)


def _connect(ray, *, address: str | None, num_cpus: int | None) -> bool:
    """Start or join Ray unless the caller already did; True if this call started it."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = dict(
        include_dashboard=False,
        log_to_driver=True,  # the runner's error tracebacks go to the worker's stderr
        logging_level=logging.WARNING,
        ignore_reinit_error=True,
    )
    if address is None:
        # "local": a private Ray, never a cluster that RAY_ADDRESS or `ray start` left around
        options.update(address="local", num_cpus=num_cpus)
    else:
        _probe(address)
        options.update(address=address)
    # the workers run this checkout's code, whatever version their machine has installed
    staged = _staged_code()
    options.update(runtime_env={"py_modules": [staged]})
    try:
        ray.init(**options)  # packs and uploads the staged folder: no longer needed after
    except Exception as exc:
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if _needs_token(exc):
            detail += (
                "; the cluster wants its auth token: set RAY_AUTH_TOKEN (see `ray get-auth-token`)"
            )
        what = f"--ray-address {address}: could not join Ray" if address else "Ray did not start"
        raise UserError(f"{what} ({detail})") from None
    finally:
        shutil.rmtree(Path(staged).parent, ignore_errors=True)
    return True


def _needs_token(exc: BaseException | None) -> bool:
    """Ray's ConnectionError hides the AuthenticationError of a token-protected cluster."""
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _task_cpus(ray, threads: int) -> int:
    """The task's CPU request: its thread count, but no more than the largest node has, so a
    task never waits for ever on a node that cannot exist."""
    largest = max(
        (node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")),
        default=0,
    )
    return max(1, min(threads, int(largest))) if largest else 1


def _run_ray(
    ray, specs: list[GroupSpec], *, ray_address: str | None, num_cpus: int | None
) -> Iterator[tuple[GroupSpec, GroupResult]]:
    if not specs:
        return
    started = _connect(ray, address=ray_address, num_cpus=num_cpus)
    pending: dict[Any, GroupSpec] = {}
    try:
        threads = torch.get_num_threads()
        cpus = _task_cpus(ray, threads)
        remote = ray.remote(_group_task)
        cwd = os.getcwd()
        for spec in specs:
            # absolute paths: a worker's directory is wherever its node's Ray was started
            root = spec.plan.root
            shipped = dataclasses.replace(
                spec,
                plan=dataclasses.replace(
                    spec.plan, root=str(Path(root).resolve()) if root else None
                ),
                cache_dir=str(Path(spec.cache_dir).resolve()),
            )
            ref = remote.options(
                num_cpus=cpus,
                num_gpus=1 if spec.device.startswith("cuda") else 0,
                name=f"group {group_name(spec)}",
            ).remote(shipped, threads=threads, cwd=cwd)
            pending[ref] = spec
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, UserError):
                    raise cause from None
                result = _failed(spec, cause if cause is not None else exc, str(exc))
            except ray.exceptions.RayError as exc:  # a worker or node died
                result = _failed(spec, exc, str(exc))
            yield spec, result
    finally:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # already finished or its worker already gone
                pass
        if started:
            ray.shutdown()
