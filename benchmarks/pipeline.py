"""End-to-end pipeline benchmark: one multi-seed run of the flow, cold cache; its wall time and every network's
test accuracy over the seeds, straight from the run's summary.json, and each step's wall time from its run.json.

    python benchmarks/pipeline.py [--profile fast] [--seeds 0 1 2] [-- extra flow options]

It runs `python flows/full_pipeline.py --seeds ...` as a user would, into a fresh output folder (so nothing is
reused from a cache; the decoded-data cache in ~/.cache/fmnist_pl is kept, as on any second run), with no
Prefect server configured unless PREFECT_API_URL is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOW = Path(__file__).resolve().parents[1] / "flows" / "full_pipeline.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="fast")
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("extra", nargs="*", help="further flow options, after --")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # a plain `kill` cleans up like Ctrl-C
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-") as out:
        command = [
            sys.executable,
            str(FLOW),
            "--profile",
            args.profile,
            "--seeds",
            *args.seeds,
            "--output-dir",
            out,
            *args.extra,
        ]
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
            sys.exit(f"pipeline failed:\n{stderr[-3000:]}")
        summary = json.loads((Path(out) / "latest" / "summary.json").read_text())
        steps = json.loads((Path(out) / "latest" / "run.json").read_text())["steps"]
    print(f"profile {args.profile}, seeds {' '.join(args.seeds)}: wall {wall:.1f} s")
    for network, r in summary["networks"].items():
        accuracy, time_ = r["test_accuracy"], r["training_wall_seconds"]
        std = f" ± {accuracy['std'] * 100:.2f}" if accuracy["std"] is not None else ""
        line = (
            f"  {network}: test accuracy {accuracy['mean']:.2%}{std} (min {accuracy['min']:.2%}, "
            f"max {accuracy['max']:.2%})"
        )
        if r["test_time_flip"]:
            line += f"; without flip TTA {r['test_accuracy_without_flip']['mean']:.2%}"
        print(
            f"{line}; training {time_['mean']:.0f} s (min {time_['min']:.0f}, max {time_['max']:.0f}); "
            f"{r['trainable_parameters']:,} parameters, {r['flops_per_image'] / 1e6:.2f} MFLOPs/image"
        )
    print(
        "  step wall times: "
        + ", ".join(
            f"{name} {step['wall_seconds']:.1f} s"
            for name, step in steps.items()
            if isinstance(step, dict) and "wall_seconds" in step
        )
    )
    print(summary["verdict"])


if __name__ == "__main__":
    main()
