"""CPU scheduling: which trainings run at once and on how many threads each, when they share one machine's cores.

Prefect's global concurrency limits (`concurrency(name, occupy=n)`) would count the threads too, but they are
server objects a user must create first, and they admit waiting tasks in no particular order; this queue needs
neither and starts the costliest training first, which sets the run's pace.

Dask does not replace it on one machine: a `LocalCluster` of one worker with the cores as its `threads` resource
(`--dask-workers 1`) gave the default pipeline identical results but took 903 s against this queue's 714 s
(1.27x, 25 % more CPU time: the worker's and the flow's Dask machinery beside a 2-thread training on 2 cores;
benchmarks/README.md). On a cluster, Dask's scheduler does this job (cluster.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import yaml

from fmnist_pl.hardware import on_cpu
from fmnist_pl.networks import NETWORKS, forward_flops
from fmnist_pl.pipeline.processes import stopping
from fmnist_pl.pipeline.settings import PipelineSettings


class TrainingQueue:
    """Trainings in their planned order, within a budget of threads (each training costs its thread count). The
    flow's task threads arrive in any order; ticket k starts only after every earlier ticket has started, been
    found cached, or failed."""

    def __init__(self, budget: int) -> None:
        self.budget, self.running, self.next, self.passed = budget, 0, 0, set()
        self.changed = threading.Condition()

    def pass_turn(self, ticket: int) -> None:
        """Ticket `ticket` needs no slot (its result is cached, or it failed): later tickets may go ahead."""
        with self.changed:
            self.passed.add(ticket)
            while self.next in self.passed:
                self.next += 1
            self.changed.notify_all()

    @contextlib.contextmanager
    def turn(self, ticket: int, threads: int = 1) -> Iterator[None]:
        with self.changed:  # a retried ticket (ticket < next) only waits for room in the budget
            while not ((self.running == 0 or self.running + threads <= self.budget) and ticket <= self.next):
                if stopping():
                    raise RuntimeError("the pipeline is stopping")
                self.changed.wait(timeout=1)
            self.running += threads
        self.pass_turn(ticket)
        try:
            yield
        finally:
            with self.changed:
                self.running -= threads
                self.changed.notify_all()


def training_cost(settings: PipelineSettings, network: str) -> float:
    """A training's relative CPU cost: forward FLOPs per image × epochs (every network sees the same images)."""
    config = yaml.safe_load(settings.config_file(network).read_text())
    epochs = settings.epochs or config.get("trainer", {}).get("max_epochs", 1)
    return forward_flops(NETWORKS[network]()) * epochs


def cpu_schedule(settings: PipelineSettings, cores: int | None = None) -> tuple[list[str], int, dict[str, int]]:
    """The run's networks costliest first, the thread budget of trainings at once, and threads per network
    (empty: each training uses what Lightning picks, as on GPUs or with several devices). `cores`: those of one
    machine that runs trainings (default: this one's)."""
    profile_costs = {n: training_cost(settings, n) for n in PipelineSettings(profile=settings.profile).networks()}
    networks = sorted(settings.networks(), key=lambda n: -profile_costs[n])
    if on_cpu(settings.accelerator) and settings.devices in ("auto", "1"):
        # Independent trainings on CPU: each its share of the cores, rather than all of them oversubscribing
        # every core, and no more threads at once than the cores.
        cores = cores or os.cpu_count() or 1
        return networks, cores, training_plan(profile_costs, cores)
    return networks, len(networks) * len(settings.seeds), {}


def training_plan(profile_costs: dict[str, float], cores: int) -> dict[str, int]:
    """Threads per network for trainings that share `cores` CPU cores, and no more threads than cores run at once.

    A network's thread count depends on the profile's networks and the core count only, never on which of them or
    how many seeds a run trains: a convolution's floating-point sums depend on the number of threads (bn_cnn's
    validation loss after 30 steps: 0.53756 on 1 thread, 0.53587 on 2), so the same seed always trains on the same
    threads on the same machine, alone or beside others, and a cached step is the one a rerun would compute.
    The costliest runs first; two 2-thread bn_cnn trainings side by side on 2 cores took about 4.5 minutes per
    epoch each, against about 45 s for one alone, hence the budget.
    """
    return cpu_thread_shares(profile_costs, cores)


def cpu_thread_shares(costs: dict, cores: int) -> dict:
    """Threads per training when trainings share `cores`: one each, and the cores left over in proportion to cost,
    so that the costliest training does not end up alone on one core while the others sit idle."""
    total, spare = sum(costs.values()), cores - len(costs)
    if spare <= 0:  # no more cores than trainings: one each, and a clearly dominant training may use every core
        threads = dict.fromkeys(costs, 1)
        costliest = max(costs, key=costs.get)
        # FLOPs are a rough proxy (a dense layer's FLOP is cheaper on a CPU than a small convolution's), so only
        # a training estimated at most of the total work is worth oversubscribing the cores for.
        if costs[costliest] > 0.8 * total:
            threads[costliest] = cores
        return threads
    shares = {network: spare * cost / total for network, cost in costs.items()}
    threads = {network: 1 + int(share) for network, share in shares.items()}
    left = cores - sum(threads.values())  # whole cores still unassigned: to the largest remainders
    for network in sorted(shares, key=lambda n: shares[n] - int(shares[n]), reverse=True)[:left]:
        threads[network] += 1
    return threads
