"""A stand-in for SLURM's `srun` on one machine: starts the command once per task of a pretend allocation of
`--nodes` nodes × `--ntasks-per-node` tasks, each with the environment variables SLURM sets and Lightning reads
(SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, ...), all on 127.0.0.1. Exits with the first failing
task's code.

    python tests/fake_srun.py --nodes 2 --ntasks-per-node 1 python -m fmnist_pl fit ... --trainer.num_nodes 2
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--ntasks-per-node", type=int, default=1)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    tasks = args.nodes * args.ntasks_per_node
    shared = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "fmnist-pl",
        "SLURM_NTASKS": str(tasks),
        "SLURM_NNODES": str(args.nodes),
        "SLURM_NTASKS_PER_NODE": str(args.ntasks_per_node),
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    processes = []
    for rank in range(tasks):
        env = {
            **os.environ,
            **shared,
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % args.ntasks_per_node),
            "SLURM_NODEID": str(rank // args.ntasks_per_node),
        }
        # Only rank 0's output is passed on, as the CLI writes files and progress from rank 0 alone.
        processes.append(
            subprocess.Popen(
                args.command,
                env=env,
                stdout=None if rank == 0 else subprocess.DEVNULL,
                stderr=None if rank == 0 else subprocess.DEVNULL,
            )
        )
    codes = [process.wait() for process in processes]
    sys.exit(next((code for code in codes if code), 0))


if __name__ == "__main__":
    main()
