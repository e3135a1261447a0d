"""Scale-out on one machine: multi-node DDP (torchrun with a local rendezvous) and a Prefect work-pool deployment
from prefect.yaml, run by a worker. The README's scale-out commands are these; the flow's multi-node training through
SLURM's srun (faked) is test_flow's fresh-home test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import FLOW_FILE, N_TEST, free_port, tiny_args

from fmnist_pl.pipeline.processes import descendants

pytestmark = pytest.mark.integration  # several processes, a Prefect server
REPO = FLOW_FILE.parents[1]


def torchrun_nodes(args: list[str], nodes: int = 2, per_node: int = 1) -> list[subprocess.Popen]:
    """`torchrun -m fmnist_pl ARGS` once per pretend node, as each node of a cluster would start it (static
    rendezvous at 127.0.0.1)."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                str(nodes),
                "--nproc-per-node",
                str(per_node),
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "-m",
                "fmnist_pl",
                *args,
                f"--trainer.num_nodes={nodes}",
                f"--trainer.devices={per_node}",
                "--trainer.strategy=ddp",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in range(nodes)
    ]


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    assert [p.returncode for p in processes] == [0] * len(processes), "\n".join(o[-3000:] for o in outputs)
    return outputs


def test_two_node_ddp_with_torchrun_trains_on_every_rank_resumes_and_counts_each_test_image_once(
    tiny_data: Path, tmp_path: Path
) -> None:
    # A multi-node fit killed mid-run resumes from its last checkpoint, every epoch kept once.
    fit = [
        "fit",
        *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=fit"),
        "--trainer.max_epochs=8",
        "--model.network=cnn",
    ]
    nodes = torchrun_nodes(fit)
    run = tmp_path / "runs" / "fit"
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not last.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    for node in nodes:  # each node dies whole: the torchrun agent and its workers (in sessions of their own)
        for pid in [node.pid, *descendants(node.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.wait()
    time.sleep(1)
    assert last.is_file(), "the multi-node fit never wrote a checkpoint"
    assert len(pd.read_csv(run / "history.csv")) < 8, "it finished before it could be killed"
    node0, node1 = finish(torchrun_nodes([*fit, f"--ckpt_path={last}"]))
    assert "Starting with 2 processes" in node0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in node1  # every rank trained
    assert "epoch 8/8" in node0 and "epoch" not in node1  # progress and files from rank 0 alone
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == list(range(8))
    assert not [p for p in run.rglob("*") if "rank" in p.name]

    best = f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}"
    # 2 ranks on 2 nodes over 101 images (tests/test_ddp.py: 2 and 3 ranks on one node).
    finish(torchrun_nodes(["test", *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=test2"), best]))
    two = json.loads((tmp_path / "runs" / "test2" / "test_metrics.json").read_text())
    matrix = pd.read_csv(tmp_path / "runs" / "test2" / "confusion_matrix_test.csv", index_col=0).to_numpy()
    assert two["devices"] == 2 and two["images"] == matrix.sum() == N_TEST  # each test image exactly once
    from fmnist_pl.cli import main

    main(["test", *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=test1"), best])
    one = json.loads((tmp_path / "runs" / "test1" / "test_metrics.json").read_text())
    assert two["accuracy"] == one["accuracy"]  # the same answer as one process


def test_the_work_pool_deployment_in_prefect_yaml_runs_on_a_worker_to_a_report(
    prefect_api: str, tiny_data: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    pool = "fmnist"  # prefect.yaml's: `prefect deploy --all` takes each deployment's own work pool

    def prefect(*args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            ["prefect", "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout

    prefect("work-pool", "create", pool, "--type", "process")
    prefect("deploy", "--all")  # every deployment prefect.yaml defines, as `--name NAME --pool fmnist` does each

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("fmnist-full-pipeline/nightly")
        assert nightly.work_pool_name == pool and [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
        assert nightly.parameters == {}  # the flow's defaults, as `serve` registers them
        sweep = client.read_deployment_by_name("fmnist-sweep/sweep")  # the sweep's form: every SweepSettings field
        assert sweep.parameters == {"settings": {"network": "dense", "trials": 20}}
        form = sweep.parameter_openapi_schema["definitions"]["SweepSettings"]["properties"]
        assert {"network", "trials", "parallel", "storage", "confirm_seeds", "dask_address"} <= set(form)
        deployment = client.read_deployment_by_name("fmnist-full-pipeline/cluster")
        assert deployment.work_pool_name == pool and deployment.parameters == {"settings": {"dask_workers": 2}}
        # The cluster deployment's run, as the UI's form sends it: its settings with the tiny data's.
        settings = {
            **deployment.parameters["settings"],
            "data_dir": str(tiny_data),
            "require_official": False,
            "val_size": 100,
            "epochs": 1,
            "models": ["cnn"],
            "accelerator": "cpu",
            "output_dir": str(tmp_path / "out"),
            "export": False,
        }
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"settings": settings})
        prefect("worker", "start", "--pool", pool, "--run-once", timeout=300)  # picks the run up, runs it, exits
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), state
    report = tmp_path / "out" / "latest" / "report.md"
    assert report.is_file() and "## cnn" in report.read_text()
    record = json.loads((tmp_path / "out" / "latest" / "run.json").read_text())
    trained_by, flow_pid = record["steps"]["train-cnn-seed0"]["worker"]["pid"], record["pid"]
    assert trained_by != flow_pid  # on one of the run's Dask workers, not in the flow's process
