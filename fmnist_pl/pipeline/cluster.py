"""Where a run's training, evaluation and export steps run: the flow's own threads (the default), or the workers of
a Dask cluster through prefect-dask's `DaskTaskRunner` (`--dask-address tcp://HOST:8786`, or `--dask-workers N`
for a `LocalCluster` on this machine). On a cluster, Dask's scheduler decides which step runs where and when: each
training asks for its threads as a worker resource (`dask worker --resources threads=N`) and the costliest goes
first (a Dask priority); the flow's own queue (scheduling.py) serves only the local runner, where it measured
faster than a one-worker LocalCluster.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fmnist_pl.errors import ConfigError
from fmnist_pl.pipeline.processes import allow_steps, stop_children

if TYPE_CHECKING:
    from prefect import Task
    from prefect.futures import PrefectFuture
    from prefect_dask import DaskTaskRunner

CONNECT_SECONDS = 5  # a scheduler that does not answer: refused within this, before any Prefect server starts


def is_loopback(url: str) -> bool:
    """Whether `url`'s host (tcp://HOST:PORT, http://HOST:PORT/api) is this machine's loopback."""
    host = urlsplit(url if "://" in url else f"tcp://{url}").hostname or "localhost"
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except OSError:  # a name that does not resolve is no loopback; connecting says what is wrong with it
        return False


def check_cluster_reachable(address: str) -> None:
    """Before Prefect starts: the scheduler at `address` answers, and its workers can reach the run's Prefect API
    (with no PREFECT_API_URL, the run's temporary server listens on this machine's loopback only)."""
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()

    try:
        with Client(address, timeout=CONNECT_SECONDS):
            pass
    except (OSError, TimeoutError, ValueError) as e:
        raise ConfigError(
            f"--dask-address {address}: no Dask scheduler answers there within {CONNECT_SECONDS} s "
            f"({str(e).splitlines()[0]}); start one with `dask scheduler`"
        ) from None
    if not is_loopback(address) and (api_url is None or is_loopback(api_url)):
        server = "this run's temporary Prefect server" if api_url is None else f"PREFECT_API_URL {api_url}"
        raise ConfigError(
            f"--dask-address {address}: workers on other hosts cannot reach {server} on this machine's loopback; "
            "start `prefect server start --host 0.0.0.0` and set PREFECT_API_URL=http://THIS-HOST:4200/api"
        )


def sees_shared_folders(token_file: str, token: str, data_dir: str, version: str) -> str | None:
    """On a worker: what is wrong with it for this run (None: nothing), checked before anything trains."""
    import fmnist_pl

    if fmnist_pl.__version__ != version:
        return f"has fmnist-pl {fmnist_pl.__version__}, the flow {version}: install the same version on every worker"
    try:
        if Path(token_file).read_text() != token:
            raise OSError("another run's token")
    except OSError:
        return f"does not see the output folder {Path(token_file).parent} (the flow's token file is not there)"
    if not Path(data_dir).is_dir():
        return f"does not see the data folder {data_dir}"
    return None


class StepRunner:
    """Submits the pipeline's steps: to the flow's task runner (`runner` None) or to a Dask cluster's workers,
    each training with the threads it asks for and the priority of its place in the plan."""

    def __init__(self, runner: DaskTaskRunner | None = None) -> None:
        self.runner = runner

    def submit(self, task: Task, parameters: dict, threads: int = 1, gpus: int = 0, priority: int = 0) -> PrefectFuture:
        """`task` with `parameters`; on a cluster, on a worker with `gpus` GPUs free (a GPU run), else `threads`."""
        if self.runner is None:
            return task.submit(**parameters)
        import dask

        with dask.annotate(resources={"GPU": gpus} if gpus else {"threads": threads}, priority=priority):
            return self.runner.submit(task, parameters)

    def worker_threads(self, gpus: int = 0) -> int | None:
        """The fewest threads any worker offers (every training then fits on any worker); None on the local runner
        and on a GPU run (`gpus` per training), where some worker must offer that many GPUs."""
        if self.runner is None:
            return None
        workers = self.runner.client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            raise ConfigError("the Dask cluster has no workers; start one with `dask worker SCHEDULER-ADDRESS`")
        if gpus:
            if not any(w.get("resources", {}).get("GPU", 0) >= gpus for w in workers.values()):
                raise ConfigError(
                    f"no Dask worker declares {gpus} GPU(s), which each training asks for: start the GPU machines' "
                    f"workers with `dask worker ... --resources GPU=N` (N: its GPUs)"
                )
            return None
        lacking = [address for address, w in workers.items() if "threads" not in w.get("resources", {})]
        if lacking:
            raise ConfigError(
                f"Dask worker {lacking[0]} declares no threads: start it with `dask worker ... --resources threads=N`"
                " (N: its cores)"
            )
        return int(min(w["resources"]["threads"] for w in workers.values()))

    def check_workers(self, output_dir: Path, data_dir: str) -> None:
        """Every worker sees the output folder and the data at the flow's paths and runs the flow's fmnist-pl."""
        if self.runner is None:
            return
        import fmnist_pl

        token = uuid.uuid4().hex
        token_file = output_dir / f".worker-check-{token}"
        token_file.write_text(token)
        try:
            client = self.runner.client
            client.run(allow_steps)  # an earlier run's stop on these workers does not apply to this one
            found = client.run(sees_shared_folders, str(token_file), token, data_dir, fmnist_pl.__version__)
        finally:
            token_file.unlink(missing_ok=True)
        for worker, problem in sorted(found.items()):
            if problem:
                raise ConfigError(f"Dask worker {worker} {problem}")

    def stop(self) -> None:
        """The flow is stopping: no training is left running on this machine or on any worker."""
        stop_children()
        if self.runner is not None:
            with contextlib.suppress(Exception):  # a cluster already gone has nothing left running for this run
                self.runner.client.run(stop_children)


@contextlib.contextmanager
def step_runner(dask_address: str | None, dask_workers: int | None) -> Iterator[StepRunner]:
    """The run's StepRunner, connected to (or running) its Dask cluster for the block's duration."""
    if not dask_address and not dask_workers:
        yield StepRunner()
        return
    from prefect_dask import DaskTaskRunner

    # The scheduler's and the workers' comings and goings are Dask's business; the steps' own lines are the run's.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if dask_address:
        runner = DaskTaskRunner(address=dask_address, client_kwargs={"timeout": CONNECT_SECONDS})
    else:  # one machine: its cores shared out among the workers, each declaring its share
        # The LocalCluster's worker processes print into this console: Dask's configuration from the environment
        # (read when a worker starts, or restarts after a kill) keeps their start-up lines out of it too.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        threads = max(1, (os.cpu_count() or 1) // dask_workers)
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": dask_workers,
                "threads_per_worker": threads,
                "resources": {"threads": threads},
                "dashboard_address": None,
            }
        )
    with runner:
        yield StepRunner(runner)
