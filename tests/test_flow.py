"""The Prefect pipeline on tiny data: whole flow, cache, retries, failure record, resume, DDP, fresh home, schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import FLOW_FILE, TINY_RUN_SEEDS, copy_of_tiny_run, tiny_run_settings, tiny_settings

from fmnist_pl.networks import NETWORKS
from fmnist_pl.pipeline import tasks

FAKE_SRUN = Path(__file__).with_name("fake_srun.py")
pytestmark = pytest.mark.integration  # real fits, a Prefect server, subprocesses


def cli_flow_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(FLOW_FILE),
        "--data-dir",
        str(data),
        "--no-require-official",
        "--val-size",
        "100",
        "--accelerator",
        "cpu",
        "--output-dir",
        str(out),
        *extra,
    ]


def test_whole_flow_trains_every_network_per_seed_writes_the_report_and_artifacts_then_reuses_every_step(
    pipeline, tiny_run: Path
) -> None:
    run_dir, tmp_path = tiny_run, tiny_run.parent  # the shared run: every network, seeds 0 and 1
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["seeds"] == TINY_RUN_SEEDS == [0, 1]
    assert record["networks"] == list(NETWORKS)  # the default: every registered network
    report = (run_dir / "report.md").read_text()
    assert [line for line in report.splitlines() if line.startswith("## ")][1:4] == [f"## {n}" for n in NETWORKS]
    trainings = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "steps").glob("train-*"))
    assert trainings == sorted(f"train-{n}-seed{s}" for n in NETWORKS for s in (0, 1))  # one step per network × seed
    for network in NETWORKS:
        for seed in (0, 1):
            metrics = json.loads((run_dir / network / f"seed-{seed}" / "evaluate" / "test_metrics.json").read_text())
            assert f"{metrics['accuracy']:.2%}" in report  # numbers come from the metrics files
            assert (run_dir / network / f"seed-{seed}" / "train" / "checkpoints" / "best.ckpt").is_file()
            assert list((run_dir / network / f"seed-{seed}" / "train").glob("events.out.tfevents.*"))  # TensorBoard
            assert not record["steps"][f"train-{network}-seed{seed}"]["cached"]
        # The report shows the first seed's training-set confusion matrix only: no other seed predicts that split.
        assert (run_dir / network / "seed-0" / "evaluate" / "predictions_train.csv").is_file()
        assert not (run_dir / network / "seed-1" / "evaluate" / "predictions_train.csv").exists()
        # Each network's first seed is exported, and the export says what the evaluation measured.
        exported = json.loads((run_dir / "export" / network / "model.json").read_text())
        evaluated = json.loads((run_dir / network / "seed-0" / "evaluate" / "test_metrics.json").read_text())
        assert exported["test_accuracy"] == pytest.approx(evaluated["accuracy"], abs=3 / 101)  # bf16 CPUs: a few images
        assert (run_dir / "export" / network / "model.onnx").is_file() and "## Where it fails" in (
            run_dir / "export" / network / "README.md"
        ).read_text()
    seeds_differ = [
        pd.read_csv(run_dir / "cnn" / f"seed-{s}" / "train" / "history.csv")["train/loss"].tolist() for s in (0, 1)
    ]
    assert seeds_differ[0] != seeds_differ[1]  # each seed its own training, not a copy

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = {artifact.key: artifact for artifact in client.read_artifacts()}
    assert {"fmnist-report", "fmnist-results"} <= set(artifacts)
    assert "data:image/png;base64," in artifacts["fmnist-report"].data  # figures the UI can show
    assert "](figures/" not in artifacts["fmnist-report"].data

    checkpoint = run_dir / "cnn" / "seed-1" / "train" / "checkpoints" / "best.ckpt"
    written = checkpoint.stat().st_mtime_ns
    again = Path(pipeline.full_pipeline(tiny_run_settings(tiny_run)))
    assert again != run_dir and (run_dir / "report.md").read_text() == report  # the earlier run is untouched
    steps = json.loads((again / "run.json").read_text())["steps"]
    assert all(
        steps[f"{kind}-{n}-seed{s}"]["cached"] for kind in ("train", "evaluate") for n in NETWORKS for s in (0, 1)
    )
    assert all(steps[f"export-{n}-seed0"]["cached"] for n in NETWORKS)
    assert checkpoint.stat().st_mtime_ns == written
    assert (tmp_path / "latest").resolve() == again.resolve()


def test_download_that_fails_once_succeeds_on_retry(
    pipeline, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_load = tasks.load_dataset

    def flaky_load(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("mirror unreachable")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(tasks, "load_dataset", flaky_load)
    monkeypatch.setattr(pipeline, "download_data", pipeline.download_data.with_options(retry_delay_seconds=0))
    # Into a copy of the shared run's outputs: the download always runs, every other step is reused.
    out = copy_of_tiny_run(tiny_run, tmp_path / "outputs")
    run_dir = Path(pipeline.full_pipeline(tiny_run_settings(tiny_run, out, models=["cnn"], seeds=[0])))
    assert len(calls) == 2
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_failed_step_is_recorded_with_its_reason(pipeline, tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="fit"):
        pipeline.full_pipeline(tiny_settings(tiny_data, tmp_path, models=["cnn"], val_size=5000))
    (record_file,) = tmp_path.glob("2*/run.json")
    record = json.loads(record_file.read_text())
    assert record["status"] == "failed" and record["failed_step"] == "train-cnn-seed0"
    assert not (tmp_path / "latest").exists()  # `latest` only ever points at a completed run
    assert "exit code 2" in record["error"]
    log = next((tmp_path / "steps").glob("train-cnn-seed0-*/train.log")).read_text()
    assert log.count("$ ") == 1  # a rejected option is not retried
    assert "val_size=5000 leaves no training images" in log


def test_killed_training_resumes_from_its_last_checkpoint(
    pipeline, prefect_api: str, tiny_data: Path, tmp_path: Path
) -> None:
    epochs = 10  # killed after 3: enough left to see that none is trained twice
    args = cli_flow_args(tiny_data, tmp_path, "--models", "dense", "--epochs", str(epochs))
    process = subprocess.Popen(
        args,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    history = None
    while time.monotonic() < deadline and process.poll() is None:
        history = (
            next((tmp_path / "steps").glob("train-dense-seed0-*/history.csv"), None)
            if (tmp_path / "steps").exists()
            else None
        )
        if history and len(pd.read_csv(history)) >= 3:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the flow, the training subprocess, everything
    process.wait()
    assert history is not None, "training never got going"
    finished_before_kill = len(pd.read_csv(history))
    assert finished_before_kill < epochs, "training finished before it could be killed"

    # --no-export: the run trains and evaluates, and exports nothing.
    run_dir = Path(
        pipeline.full_pipeline(tiny_settings(tiny_data, tmp_path, models=["dense"], epochs=epochs, export=False))
    )
    steps = json.loads((run_dir / "run.json").read_text())["steps"]
    assert steps["train-dense-seed0"]["resumed"] is True
    assert "evaluate-dense-seed0" in steps and not [s for s in steps if s.startswith("export")]
    assert not (run_dir / "export").exists() and not list((tmp_path / "steps").glob("export-*"))
    resumed = pd.read_csv(run_dir / "dense" / "seed-0" / "train" / "history.csv")
    assert list(resumed["epoch"]) == list(range(epochs))  # every finished epoch kept, none trained twice
    log = (run_dir / "dense" / "seed-0" / "train" / "train.log").read_text()
    assert "--ckpt_path=" in log and f"epoch 1/{epochs}" not in log.split("--ckpt_path=")[-1]


def test_fresh_home_no_server_two_slurm_nodes_through_the_train_launcher_quiet_console_and_no_traceback(
    tiny_data: Path, tmp_path: Path
) -> None:
    """A first run as a new user starts it: no Prefect server, a fresh home. Its training runs as multi-node DDP
    through the train launcher, here a stand-in for SLURM's srun (tests/fake_srun.py) making two nodes' tasks."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    launcher = f"{sys.executable} {FAKE_SRUN} --nodes 2 --ntasks-per-node 1"
    args = cli_flow_args(tiny_data, tmp_path / "out", "--models", "cnn", "--epochs", "1", "--no-export")
    args += ["--num-nodes", "2", "--devices", "1", "--strategy", "ddp", "--train-launcher", launcher]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=420)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output and "database is locked" not in output
    assert "epoch 1/1" in output  # the user sees training progress
    # A quiet console: no model summary, no Lightning start-up lines, no test table, nothing twice.
    lines = [line.split(" | ")[-1] for line in output.splitlines() if line.strip()]
    assert len(lines) <= 25, output
    assert len(set(lines)) == len(lines), output
    noise = ("Trainable params", "GPU available", "Test metric", "exists and is", "predictions of", "Restoring states")
    assert not any(word in output for word in noise)
    header = next(i for i, line in enumerate(lines) if "test accuracy (mean" in line)  # the closing results table
    assert lines[header + 1].startswith("cnn ") and lines[header + 2].startswith("report: ")
    run_dir = tmp_path / "out" / "latest"
    train_log = (run_dir / "cnn" / "seed-0" / "train" / "train.log").read_text()
    assert f"$ {launcher} " in train_log
    assert "MEMBER: 1/2" in train_log and "Starting with 2 processes" in train_log  # two SLURM tasks, one job
    metrics = json.loads((run_dir / "cnn" / "seed-0" / "evaluate" / "test_metrics.json").read_text())
    assert metrics["images"] == 101
    assert "Test metric" in (run_dir / "cnn" / "seed-0" / "evaluate" / "evaluate.log").read_text()  # in the step's log
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_serve_registers_a_scheduled_deployment_that_runs(prefect_api: str, tiny_data: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    args = cli_flow_args(tiny_data, tmp_path, "--models", "cnn", "--epochs", "1", "--no-export")
    args[2:2] = ["serve", "--cron", "0 3 * * *", "--name", "served"]
    server = subprocess.Popen(
        args,
        # The runner looks for due runs every second, not every 10 s (Prefect's default): less of the test waits.
        env={**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with get_client(sync_client=True) as client:
            deadline, deployment = time.monotonic() + 120, None
            while deployment is None and time.monotonic() < deadline:
                try:
                    deployment = client.read_deployment_by_name("fmnist-full-pipeline/served")
                except Exception:
                    time.sleep(1)
            assert deployment is not None, "serve never registered the deployment"
            assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
            run = client.create_flow_run_from_deployment(deployment.id)
            deadline = time.monotonic() + 300
            while not client.read_flow_run(run.id).state.is_final() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert client.read_flow_run(run.id).state.is_completed()
            from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            assert any("[cnn] epoch 1/1" in log.message for log in logs)  # training progress reaches the UI
        assert json.loads((tmp_path / "latest" / "run.json").read_text())["status"] == "completed"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
