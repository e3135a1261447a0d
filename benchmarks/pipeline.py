"""End-to-end pipeline benchmark: wall time and every network's test accuracy per seed, median and min–max.

    python benchmarks/pipeline.py [--profile fast] [--seeds 0 1 2] [-- extra flow options]

Each seed runs `python flows/full_pipeline.py` as a user would, into a fresh output folder (so nothing is
reused from a cache; the decoded-data cache in ~/.cache/fmnist_pl is kept, as on any second run), with no
Prefect server configured unless PREFECT_API_URL is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOW = Path(__file__).resolve().parents[1] / "flows" / "full_pipeline.py"


def run_once(profile: str, seed: int, extra: list[str]) -> dict:
    """One whole pipeline run; returns its wall time and summary."""
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-") as out:
        command = [sys.executable, str(FLOW), "--profile", profile, "--seed", str(seed), "--output-dir", out, *extra]
        started = time.perf_counter()
        # Its own process group, so that stopping the benchmark also stops the temporary Prefect server the flow
        # started: left running, it takes CPU from every later measurement.
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            _, stderr = process.communicate()
        finally:
            if process.poll() is None or process.returncode != 0:
                with contextlib.suppress(ProcessLookupError):  # the group may have exited already
                    os.killpg(process.pid, signal.SIGKILL)
        wall = time.perf_counter() - started
        if process.returncode != 0:
            sys.exit(f"pipeline failed (seed {seed}):\n{stderr[-3000:]}")
        summary = json.loads((Path(out) / "latest" / "summary.json").read_text())
        record = json.loads((Path(out) / "latest" / "run.json").read_text())
    steps = {name: step.get("wall_seconds") for name, step in record["steps"].items()}
    return {"seed": seed, "wall": wall, "steps": steps, "networks": summary["networks"]}


def describe(values: list[float], fmt: str) -> str:
    return (
        f"median {fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="fast")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("extra", nargs="*", help="further flow options, after --")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # a plain `kill` cleans up like Ctrl-C
    runs = []
    for seed in args.seeds:
        run = run_once(args.profile, seed, args.extra)
        runs.append(run)
        accuracies = ", ".join(f"{n} {r['test_accuracy']:.2%}" for n, r in run["networks"].items())
        steps = ", ".join(f"{s} {v:.0f}s" for s, v in run["steps"].items() if v is not None)
        print(f"seed {seed}: wall {run['wall']:.1f} s; test accuracy {accuracies}  [{steps}]", flush=True)
    print(f"profile {args.profile}, {len(runs)} runs: wall {describe([r['wall'] for r in runs], '{:.1f} s')}")
    for network, first in runs[0]["networks"].items():
        values = [r["networks"][network]["test_accuracy"] for r in runs]
        line = f"  {network}: test accuracy mean {statistics.mean(values):.2%}, {describe(values, '{:.2%}')}"
        if first.get("test_time_flip"):
            plain = [r["networks"][network]["test_accuracy_without_flip"] for r in runs]
            line += f"; without flip TTA mean {statistics.mean(plain):.2%} (min {min(plain):.2%})"
        trained = [r["networks"][network]["training_wall_seconds"] for r in runs]
        print(
            f"{line}; training {describe(trained, '{:.0f} s')}; {first['trainable_parameters']:,} parameters, "
            f"{first['flops_per_image'] / 1e6:.2f} MFLOPs/image"
        )


if __name__ == "__main__":
    main()
