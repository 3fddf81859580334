"""The ``ray`` executor: each sweep point is a Ray task running an ordinary ``fusion_core.run``.

Without ``address`` a local Ray is started (``ray.init(num_cpus=jobs or 2)``) and
shut down when the sweep ends; with ``address`` the executor joins an existing
cluster, after checking within ``connect_timeout_s`` that its head answers (an
unreachable address fails fast with one line instead of Ray's long retries).

Tasks receive the job's config *mapping* (models and datasets referenced by path)
and a :class:`fusion_lab.executors.WorkerEnv` naming the plugins to load; nothing
heavy goes through the object store.  On a cluster, paths in the config must be
valid on every node (a shared filesystem), and the plugins installed there.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import attrs
from fusion_lab.executors import Executor, one_line, run_job

from fusion_core import InputError, PluginError, option, positive

RAY_HINT = "pip install 'ray>=2.9' (or reinstall the plugin with its dependencies: pip install fusion-ray)"


def import_ray():
    """``import ray``, or one line naming what to install."""
    try:
        import ray
    except ImportError:
        raise PluginError(f"the ray executor (plugin fusion-ray) needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``ray://host:port`` or ``[v6]:port`` → (host, port); default ports 6379 (GCS) / 10001 (client)."""
    text = address.strip()
    client = text.startswith("ray://")
    if client:
        text = text[len("ray://"):]
    default = 10001 if client else 6379
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise InputError(f"malformed Ray address {address!r}: expected host:port (e.g. 10.0.0.5:6379)")
    try:
        return host, int(port) if port else default
    except ValueError:
        raise InputError(f"malformed Ray address {address!r}: the port {port!r} is not a number") from None


def check_reachable(address: str, timeout: float) -> None:
    """Open (and close) a TCP connection to the cluster head, or fail with one line."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise InputError(
            f"cannot reach the Ray cluster at {address} ({host}:{port}) within {timeout:g}s: {reason}; "
            "check --address (the head node's host:port) or omit it to start a local Ray"
        ) from None


@attrs.frozen
class RayConfig:
    address: str | None = option(
        None, help="Cluster to join: the head's host:port (GCS, default port 6379), ray://host:10001 (Ray Client) "
                   "or 'auto'; default: start a local Ray for the sweep.")
    jobs: int | None = option(None, help="CPUs of the local Ray (default 2); a cluster schedules on its own CPUs.",
                              validator=positive)
    connect_timeout_s: float = option(10.0, help="Seconds to wait for the cluster head before giving up.",
                                      validator=positive)


class RayExecutor(Executor):
    """Runs each job as a Ray task (one CPU each) and hands results back as they finish."""

    name = "ray"
    summary = "Runs sweep points as Ray tasks: a local Ray, or an existing cluster with --address."
    reference_url = "https://docs.ray.io/en/latest/ray-core/tasks.html"
    Config = RayConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._owned = False

    def check(self) -> None:
        import_ray()
        address = self.config.address
        if address and address != "auto":
            check_reachable(address, self.config.connect_timeout_s)

    def start(self) -> None:
        ray = import_ray()
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        if self.config.address:
            kwargs["address"] = self.config.address
        else:
            kwargs["num_cpus"] = self.config.jobs or 2
        try:
            ray.init(**kwargs)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            where = f"the Ray cluster at {self.config.address}" if self.config.address else "a local Ray"
            raise InputError(f"cannot start or join {where}: {one_line(exc)}") from None
        self._owned = True

    def stop(self) -> None:
        if self._owned:
            import_ray().shutdown()
            self._owned = False

    def map(self, jobs, env, on_result, *, plugin_manager=None, registry=None):
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            self.start()
        pending: dict = {}
        try:
            remote = ray.remote(num_cpus=1, max_retries=0)(run_job)
            pending = {remote.remote(job, env): job for job in jobs}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # the worker died, or Ray could not run the task
                        result = {"status": "failed", "error": one_line(exc)}
                    on_result(job, result)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if started_here:
                self.stop()
