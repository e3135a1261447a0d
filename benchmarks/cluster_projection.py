"""On paper: the wall time of a study's trainings and evaluations on N Dask workers of 2 cores each, from measured
step times, scheduled as the pipeline asks Dask to (each step its threads as a worker resource, the costliest
training first). A simulation, not a run: it ignores start-up, data loading from a shared folder and contention.

    python benchmarks/cluster_projection.py --seeds 4 --workers 1 2 4 8
"""

from __future__ import annotations

import argparse
import heapq

# Step seconds and threads measured on the AVX2-only AMD EPYC (2 cores, fp32), default pipeline, cold cache
# (benchmarks/README.md, "The default pipeline"): bn_cnn trains on both cores, dense and cnn on one thread each.
TRAINING = {"bn_cnn": (515.1, 2), "dense": (140.6, 1), "cnn": (148.4, 1)}
EVALUATION = {"bn_cnn": (58.0, 1), "dense": (9.3, 1), "cnn": (11.9, 1)}  # bn_cnn's: its work alone, not contended


def wall_seconds(seeds: int, workers: int, cores: int = 2) -> float:
    """Greedy list scheduling: whenever threads free up, the first waiting step (trainings costliest first, then
    each training's evaluation once it is trained) that fits on a worker starts there."""
    waiting = [
        ("train", n, s, *TRAINING[n]) for s in range(seeds) for n in sorted(TRAINING, key=lambda n: -TRAINING[n][0])
    ]
    free = [cores] * workers
    running: list[tuple[float, int, tuple]] = []  # (ends at, worker, step)
    now = 0.0
    while waiting or running:
        started = True
        while started:
            started = False
            for step in waiting:
                worker = next((w for w in range(workers) if free[w] >= step[4]), None)
                if worker is not None:
                    waiting.remove(step)
                    free[worker] -= step[4]
                    heapq.heappush(running, (now + step[3], worker, step))
                    started = True
                    break
        now, worker, step = heapq.heappop(running)
        free[worker] += step[4]
        if step[0] == "train":
            waiting.insert(0, ("evaluate", step[1], step[2], *EVALUATION[step[1]]))
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    for workers in args.workers:
        seconds = wall_seconds(args.seeds, workers)
        print(f"{workers} worker(s) x 2 cores, {args.seeds} seeds: {seconds:.0f} s ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
