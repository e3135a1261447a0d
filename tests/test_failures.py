"""Failure paths, one class at a time: each ends fast, in a line or two that name the problem, and loses nothing."""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    FLOW_FILE,
    copy_of_tiny_run,
    tiny_args,
    tiny_run_settings,
    tiny_settings,
)

from fmnist_pl.cli import main
from fmnist_pl.configs import profile_config
from fmnist_pl.io import PlaceError
from fmnist_pl.networks import NETWORKS
from fmnist_pl.pipeline import command, processes, run_record, step_cache, tasks


def cli_error(capsys: pytest.CaptureFixture, *args: str) -> list[str]:
    """Run `fmnist-pl ARGS`, expect exit code 2, return its stderr lines."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def fake_checkpoint(path: Path, network: str, weights_of: str | None = None) -> Path:
    """A checkpoint as `fmnist-pl fit` writes it, as far as the checks read it: hyper-parameters and weights."""
    weights = NETWORKS[weights_of or network]().state_dict()
    torch.save(
        {"hyper_parameters": {"network": network}, "state_dict": {f"network.{k}": v for k, v in weights.items()}}, path
    )
    return path


# ---- bad options: the line that matters first, exit 2, before anything trains ----------------------------------


@pytest.mark.parametrize(
    ("option", "first_line"),
    [
        ("--trainer.max_epochs=abc", "Parser key \"trainer.max_epochs\": Expected a <class 'int'>. Got value: abc"),
        (
            "--model.learning_rate=-0.1",
            "Parser key \"model.learning_rate\": Input should be greater than 0 (given '-0.1')",
        ),
        ("--model.netwrk=cnn", "unrecognized arguments: --model.netwrk=cnn"),
        ("--config={typo_yaml}", "does not accept option 'model.netwrk'"),  # a typo'd key in a config file
    ],
)
def test_argument_errors_put_the_key_line_first(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, option: str, first_line: str
) -> None:
    typo_yaml = tmp_path / "typo.yaml"
    typo_yaml.write_text("model:\n  netwrk: cnn\n")
    err = cli_error(capsys, "fit", *tiny_args(tiny_data, tmp_path), option.format(typo_yaml=typo_yaml))
    assert len(err) == 2 and err[0].startswith("fmnist-pl: error: ") and first_line in err[0]
    assert "--help" in err[1] and "usage" not in "\n".join(err)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--trainer.max_epochs=0"], "trainer.max_epochs must be ≥ 1"),
        ([f"--config={profile_config('fast', 'cnn')}", "--trainer.max_epochs=-1"], "one_cycle schedule needs a finite"),
    ],
)
def test_fit_with_no_epochs_or_an_endless_schedule_is_refused(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, options: list[str], message: str
) -> None:
    # The config first: the options after it override it, as on the command line.
    err = cli_error(capsys, "fit", *options[:1], *tiny_args(tiny_data, tmp_path), *options[1:])
    assert message in err[-1] and len(err) <= 2
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_this_machine_lacks_is_refused_by_the_cli_and_the_pipeline(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = cli_error(capsys, "fit", *tiny_args(tiny_data, tmp_path), "--trainer.accelerator=gpu")
    assert err[-1].startswith("fmnist-pl: error: ") and "gpu" in err[-1].lower() and len(err) <= 2
    with pytest.raises(SystemExit) as exit_:
        command.parse_args(["--accelerator", "gpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "this machine has no usable CUDA GPU" in err[0] and "--help" in err[1]


# ---- bad checkpoints: verified when read ---------------------------------------------------------------------------


def test_damaged_foreign_and_mismatched_checkpoints_are_refused_in_one_line(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dense = fake_checkpoint(tmp_path / "dense.ckpt", "dense")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(dense.read_bytes()[:5000])
    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(os.urandom(3000))
    renamed = fake_checkpoint(tmp_path / "renamed.ckpt", "bn_cnn", weights_of="cnn")  # says bn_cnn, holds a cnn
    cnn_config = f"--config={profile_config('fast', 'cnn')}"
    cases = [
        ([cnn_config, f"--ckpt_path={truncated}"], "truncated.ckpt is damaged or not a checkpoint"),
        ([cnn_config, f"--ckpt_path={random_bytes}"], "random.ckpt is damaged or not a checkpoint"),
        ([cnn_config, f"--ckpt_path={dense}"], "holds a 'dense' network, not 'cnn'"),
        (["--model.network=cnn", f"--ckpt_path={dense}"], "holds a 'dense' network, not 'cnn'"),
        ([f"--ckpt_path={renamed}"], "weights do not fit the current 'bn_cnn' architecture"),
    ]
    for options, message in cases:
        err = cli_error(capsys, "test", *options[:1], *tiny_args(tiny_data, tmp_path), *options[1:])
        assert len(err) <= 2 and message in err[-1], (options, err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_resume_with_another_epoch_count_is_refused_before_training_and_predict_names_its_files(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = f"--config={profile_config('fast', 'cnn')}"  # one-cycle schedule
    main(
        [
            "fit",
            config,
            *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=one"),
            "--trainer.max_epochs=1",
        ]
    )
    last = tmp_path / "runs" / "one" / "checkpoints" / "last.ckpt"
    history = (tmp_path / "runs" / "one" / "history.csv").read_text()
    capsys.readouterr()
    err = cli_error(
        capsys,
        "fit",
        config,
        *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=one"),
        "--trainer.max_epochs=2",
        f"--ckpt_path={last}",
    )
    assert (
        len(err) <= 2 and "one_cycle schedule planned for 1 epoch(s); resume it with --trainer.max_epochs 1" in err[-1]
    )
    assert (tmp_path / "runs" / "one" / "history.csv").read_text() == history  # nothing lost

    from PIL import Image

    images = tmp_path / "my_images"
    images.mkdir()
    for name in ("b_shoe.png", "a_shirt.png"):
        Image.new("L", (28, 28), 128).save(images / name)
    main(
        [
            "predict",
            config,
            *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=mine"),
            f"--ckpt_path={last}",
            f"--data.predict_path={images}",
        ]
    )
    written = tmp_path / "runs" / "mine" / "predictions.csv"
    predictions = pd.read_csv(written)
    assert predictions["file"].tolist() == ["a_shirt.png", "b_shoe.png"]  # each row says which image it is
    assert predictions["predicted_class"].notna().all()
    assert f"predictions of 2 images written to {written}" in capsys.readouterr().out


# ---- step results and run records --------------------------------------------------------------------------------


def test_a_step_is_recorded_as_finished_only_when_its_outputs_exist(tmp_path: Path) -> None:
    work = tmp_path / "train-cnn-seed0-key"
    work.mkdir()
    promised = [work / "checkpoints" / "best.ckpt", work / "history.csv"]
    (work / "history.csv").write_text("epoch\n")
    with pytest.raises(RuntimeError, match=r"ended without writing checkpoints/best.ckpt"):
        step_cache.mark_finished(work, run_record.StepResult("cnn", 0, str(work), 1.0), promised)
    assert not (work / "done.json").exists()
    promised[0].parent.mkdir()
    promised[0].write_bytes(b"x")
    assert step_cache.mark_finished(work, run_record.StepResult("cnn", 0, str(work), 1.0), promised).cached is False
    assert (work / "done.json").is_file()


def test_a_damaged_last_checkpoint_is_set_aside(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"PK\x03\x04 cut short")
    assert step_cache.set_aside_if_damaged(last) is True
    assert not last.exists() and len(list(tmp_path.glob("last.ckpt.damaged-*"))) == 1
    good = fake_checkpoint(tmp_path / "good.ckpt", "cnn")
    assert step_cache.set_aside_if_damaged(good) is False and good.is_file()


def test_runs_whose_process_is_gone_are_marked_killed(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name, pid, status in (
        ("dead", gone.pid, "running"),
        ("alive", os.getpid(), "running"),
        ("done", gone.pid, "completed"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(
            json.dumps({"status": status, "pid": pid, "host": socket.gethostname()})
        )
    assert run_record.mark_dead_runs(tmp_path, by=tmp_path / "new") == [tmp_path / "dead"]
    statuses = {n: json.loads((tmp_path / n / "run.json").read_text())["status"] for n in ("dead", "alive", "done")}
    assert statuses == {"dead": "killed", "alive": "running", "done": "completed"}


def test_report_on_an_incomplete_run_says_what_is_missing_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from conftest import write_fake_run

    run = write_fake_run(tmp_path, {"dense": 0.9, "cnn": 0.9})
    record = json.loads((run / "run.json").read_text())
    del record["steps"]["evaluate-cnn-seed0"]
    record.update(status="killed")
    (run / "run.json").write_text(json.dumps(record))
    err = cli_error(capsys, "report", str(run))
    assert len(err) == 1 and "is incomplete (status killed): no result for evaluate-cnn-seed0" in err[0]


def test_a_step_folder_has_one_owner_at_a_time_and_a_dead_owner_frees_it(tmp_path: Path) -> None:
    work = tmp_path / "step"
    order = []

    def second() -> None:
        with step_cache.step_lock(work):
            order.append("second")

    with step_cache.step_lock(work):
        assert f"PID {os.getpid()}" in (work / ".lock").read_text()
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(1.5)
        order.append("first done")
    waiter.join(timeout=10)
    assert order == ["first done", "second"]  # the second owner waited for the first

    holder = subprocess.Popen(  # another process takes the lock and is killed while holding it
        [
            sys.executable,
            "-c",
            f"import fcntl, time; f = open({str(work / '.lock')!r}, 'a'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    started = time.monotonic()
    with step_cache.step_lock(work):  # no stale lock: the kernel released the dead owner's
        pass
    assert time.monotonic() - started < 1


# ---- the pipeline: permanent errors not retried, damaged checkpoints recovered, concurrent runs, kills -------------


def test_damaged_data_files_stop_the_pipeline_before_it_starts(tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    (tiny_data / "t10k-labels-idx1-ubyte.gz").write_bytes(os.urandom(300))
    with pytest.raises(SystemExit) as exit_:
        command.parse_args(["--data-dir", str(tiny_data)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "t10k-labels-idx1-ubyte.gz: cannot be read" in err[0]
    (tiny_data / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(20)))
    with pytest.raises(SystemExit):
        command.parse_args(["--data-dir", str(tiny_data)])
    assert "t10k-labels-idx1-ubyte.gz: not an IDX labels file" in capsys.readouterr().err


@pytest.mark.integration
def test_bad_data_is_not_retried(pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fmnist_pl.errors import DataError

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (garbage / f"{stem}.gz").write_bytes(os.urandom(500))
    calls = []
    real_load = tasks.load_dataset
    monkeypatch.setattr(tasks, "load_dataset", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    with pytest.raises(DataError, match="cannot be read"):
        pipeline.full_pipeline(tiny_settings(garbage, tmp_path / "out", models=["dense"], epochs=1))
    assert len(calls) == 1  # permanent: one attempt, no waits
    assert not (tmp_path / "out" / "latest").exists()  # `latest` only ever points at a completed run


@pytest.mark.integration
def test_a_failed_download_is_retried_twice_then_stops_in_one_line(
    pipeline, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmnist_pl.errors import DownloadError

    calls = []

    def offline(*args, **kwargs):
        calls.append(1)
        raise DownloadError("could not download Fashion-MNIST (URLError: no network)")

    monkeypatch.setattr(tasks, "load_dataset", offline)
    monkeypatch.setattr(pipeline, "download_data", pipeline.download_data.with_options(retry_delay_seconds=0))
    with pytest.raises(DownloadError, match="could not download"):
        pipeline.full_pipeline(tiny_settings(tiny_data, tmp_path, models=["dense"], epochs=1))
    assert len(calls) == 3  # transient: the first try and two retries


@pytest.mark.integration
def test_a_damaged_last_checkpoint_in_a_step_folder_is_set_aside_and_training_restarts(
    pipeline, tiny_run: Path, tmp_path: Path
) -> None:
    out = copy_of_tiny_run(tiny_run, tmp_path / "outputs")
    settings = tiny_run_settings(tiny_run, out, models=["dense"], seeds=[0], export=False)
    step = (out / tiny_run.name / "dense" / "seed-0" / "train").resolve()
    (step / "done.json").unlink()  # as if the run had been killed after its last epoch
    last = step / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:4000])  # and the checkpoint cut short
    again = Path(pipeline.full_pipeline(settings))
    assert json.loads((again / "run.json").read_text())["status"] == "completed"
    assert len(list(step.glob("checkpoints/last.ckpt.damaged-*"))) == 1
    assert list(pd.read_csv(step / "history.csv")["epoch"]) == [0, 1]  # retrained whole, history intact
    commands = [line for line in (step / "train.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--ckpt_path" not in commands[1]


@pytest.mark.integration
@pytest.mark.parametrize("how", ["kill PID", "Ctrl-C"])
def test_a_terminated_flow_stops_its_trainings_and_server_and_says_so(
    prefect_api: str, tiny_data: Path, tmp_path: Path, how: str
) -> None:
    # How the next run resumes a stopped training is test_flow's test_killed_training_resumes_from_its_last_checkpoint:
    # the same last.ckpt whichever way the flow ended. 40 epochs: time to stop it in the middle of its training.
    # Ctrl-C, a laptop user's way, stops a run with its own temporary server (which the terminal's SIGINT must not
    # take from under the flow); `kill PID` one on a server it does not own (the session's).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    if how == "kill PID":
        env["PREFECT_API_URL"] = prefect_api
    args = [
        sys.executable,
        str(FLOW_FILE),
        "--data-dir",
        str(tiny_data),
        "--no-require-official",
        "--val-size",
        "100",
        "--accelerator",
        "cpu",
        "--output-dir",
        str(tmp_path),
        "--models",
        "dense",
        "--epochs",
        "40",
    ]
    flow = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob("steps/train-dense-*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(tmp_path.glob("steps/train-dense-*/checkpoints/last.ckpt")), "training never got going"
        if how == "kill PID":
            flow.send_signal(signal.SIGTERM)  # the flow's PID only, as `kill PID` does
        else:
            os.killpg(flow.pid, signal.SIGINT)  # every process of the group, as a terminal's Ctrl-C does
        output = flow.communicate(timeout=60)[0]
        # The training (in the flow's process group) and the temporary server (in a session of its own) went with it.
        server = f"--port\0{temporary_server_port(output)}\0" if how == "Ctrl-C" else None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(flow.pid, 0)
            except ProcessLookupError:
                if not server or not live_processes(server):
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"processes of the stopped flow are still running:\n{output[-3000:]}")
    finally:
        try:
            os.killpg(flow.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("2*/run.json")]
    assert record["status"] == "stopped" and flow.returncode == {"kill PID": 143, "Ctrl-C": 130}[how]
    assert not (tmp_path / "latest").exists()  # a stopped run never becomes `latest`
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert output.strip().splitlines()[-1].startswith("fmnist-pl pipeline stopped; run the same command again")


def temporary_server_port(output: str) -> str:
    """The port of the temporary Prefect server a flow's output names."""
    return output.split("temporary Prefect server on http://127.0.0.1:")[1].split("/")[0]


def live_processes(text: str) -> dict[int, str]:
    """The running (not zombie) processes whose command line, its arguments joined by NUL, holds `text`: their
    PIDs and command lines."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            line = cmdline.read_text(errors="replace")
            if text in line and "zombie" not in (cmdline.parent / "status").read_text():
                found[int(cmdline.parent.name)] = line.replace("\0", " ")[:200]
    return found


@pytest.mark.integration
def test_a_flow_killed_outright_leaves_no_prefect_server_behind(tiny_data: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # its own temporary server
    args = [
        sys.executable,
        str(FLOW_FILE),
        "--data-dir",
        str(tiny_data),
        "--no-require-official",
        "--val-size",
        "100",
        "--accelerator",
        "cpu",
        "--output-dir",
        str(tmp_path),
        "--models",
        "dense",
        "--epochs",
        "40",
    ]
    flow = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = flow.stdout.readline()
        while "temporary Prefect server on" not in first:
            assert first, "the flow ended before it started its server"
            first = flow.stdout.readline()
        server = f"--port\0{temporary_server_port(first)}\0"
        assert len(live_processes(server)) == 1
        flow.kill()  # SIGKILL: nothing in the flow can react
        flow.wait(timeout=10)
        deadline = time.monotonic() + 20
        while live_processes(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not live_processes(server), "the server outlived its flow"
    finally:
        if flow.poll() is None:
            flow.kill()


@pytest.mark.integration
def test_a_lost_prefect_server_ends_the_run_in_one_line_within_seconds(tiny_data: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")},
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--no-ui", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    out = tmp_path / "out"
    args = [
        sys.executable,
        str(FLOW_FILE),
        "--data-dir",
        str(tiny_data),
        "--no-require-official",
        "--val-size",
        "100",
        "--accelerator",
        "cpu",
        "--output-dir",
        str(out),
        "--models",
        "dense",
        "--epochs",
        "200",
    ]
    flow = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # a dedicated server, as `prefect server start` gives a user
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.5)
        flow = subprocess.Popen(
            args,
            env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 180
        while not list(out.glob("steps/train-dense-*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(out.glob("steps/train-dense-*/checkpoints/last.ckpt")), "training never got going"
        os.killpg(server.pid, signal.SIGKILL)
        lost = time.monotonic()
        output = flow.communicate(timeout=60)[0]
        # Not minutes of retries against a dead server; the margin is for a loaded CI machine.
        assert time.monotonic() - lost < 30, "the README promises a lost server ends the run within seconds"
    finally:
        for process in (flow, server):
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL) if process is server else process.kill()
    last = output.strip().splitlines()[-1]
    assert flow.returncode == 1 and last.startswith(
        f"fmnist-pl pipeline failed: lost the Prefect server at http://127.0.0.1:{port}/api"
    )
    assert "Traceback" not in output
    (record,) = out.glob("2*/run.json")
    assert json.loads(record.read_text())["status"] == "failed"
    time.sleep(1)
    survivors = live_processes(str(out))  # its training went with it: nothing still works in the run's output folder
    assert not survivors, survivors


# ---- training that diverges stops, in one line, before its epoch is checkpointed ---------------------------------


@pytest.mark.parametrize(
    ("train_loss", "val_loss", "val_accuracy", "stops"),
    [
        (float("nan"), 2.3, 0.09, True),
        (0.5, float("inf"), 0.8, True),  # not finite
        (1412.0, 900.0, 0.10, True),  # exploded: far above a uniform guess's 2.30, at chance
        (30.0, 2.0, 0.60, False),
        (2.2, 2.2, 0.12, False),  # high but learning; slow but not exploding
    ],
)
def test_divergence_rule(train_loss: float, val_loss: float, val_accuracy: float, stops: bool) -> None:
    from fmnist_pl.errors import TrainingDiverged
    from fmnist_pl.module import check_not_diverged

    check = functools.partial(check_not_diverged, 0, train_loss, val_loss, val_accuracy, {"learning_rate": 1000.0})
    if stops:
        with pytest.raises(TrainingDiverged, match=r"diverged in epoch 1: .* lower --model.learning_rate \(now 1000\)"):
            check()
    else:
        check()


@pytest.mark.integration
def test_a_diverged_fit_exits_2_in_one_line_without_a_best_checkpoint(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = f"--config={profile_config('fast', 'dense')}"
    options = ["--trainer.logger.init_args.version=fit", "--trainer.max_epochs=2", "--model.learning_rate=1000"]
    err = cli_error(capsys, "fit", config, *tiny_args(tiny_data, tmp_path, *options))
    errors = [line for line in err if "error" in line.lower()]
    assert errors == [errors[0]] and "training diverged in epoch 1" in errors[0]
    assert not (tmp_path / "runs" / "fit" / "checkpoints" / "best.ckpt").exists()


def test_a_fresh_training_sets_aside_an_earlier_attempts_checkpoints(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "best.ckpt").write_text("old")
    (folder / "best-v1.ckpt").write_text("older")
    assert {p.name for p in step_cache.set_aside_stale_checkpoints(folder)} == {"best.ckpt", "best-v1.ckpt"}
    assert not list(folder.glob("*.ckpt")) and len(list(folder.glob("*.ckpt.stale-*"))) == 2  # kept, not evaluated


@pytest.mark.integration
def test_fit_into_a_folder_with_an_old_best_checkpoint_replaces_it(tiny_data: Path, tmp_path: Path) -> None:
    old = tmp_path / "runs" / "fit" / "checkpoints" / "best.ckpt"
    old.parent.mkdir(parents=True)
    old.write_text("an earlier attempt's")
    main(
        [
            "fit",
            *tiny_args(
                tiny_data,
                tmp_path,
                "--trainer.logger.init_args.version=fit",
                "--trainer.max_epochs=1",
                "--model.network=cnn",
            ),
        ]
    )
    assert sorted(p.name for p in old.parent.iterdir()) == ["best.ckpt", "last.ckpt"]  # no best-v1.ckpt beside it
    assert torch.load(old, weights_only=True)["hyper_parameters"]["network"] == "cnn"


# ---- bad input files: one line each, no traceback, no warning before it ------------------------------------------


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width×height pixels (8-bit grayscale) and holds none: all a size check reads."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("side", [12_000, 20_000])  # above PIL's warning limit, and above its error limit
def test_a_huge_image_to_predict_is_refused_in_one_line_without_a_warning(tmp_path: Path, side: int) -> None:
    import warnings

    from fmnist_pl.errors import DataError
    from fmnist_pl.predict_images import load_predict_images

    folder = tmp_path / "images"
    folder.mkdir()
    png_header(folder / "huge.png", side, side)
    with (
        warnings.catch_warnings(record=True) as seen,
        pytest.raises(DataError, match=rf"huge.png: image has {side**2:,} pixels, far too many") as error,
    ):
        warnings.simplefilter("always")
        load_predict_images(folder)
    assert "\n" not in str(error.value) and not seen


def test_one_image_file_is_accepted_to_predict_on(tmp_path: Path) -> None:
    from PIL import Image

    from fmnist_pl.predict_images import load_predict_images

    Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).save(tmp_path / "shoe.png")
    images, names = load_predict_images(tmp_path / "shoe.png")
    assert images.shape == (1, 28, 28) and int(images[0, 0, 0]) == 200 and names == ["shoe.png"]


def test_a_config_that_is_not_utf8_text_stops_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "latin1.yaml"
    config.write_bytes("model:\n  network: cnn  # caf\xe9\n".encode("latin-1"))
    err = cli_error(capsys, "fit", f"--config={config}")
    assert err == [
        f"fmnist-pl: error: config {config} is not UTF-8 text (invalid continuation byte at byte 28); pass a YAML file"
    ]


@pytest.mark.parametrize("record", ['{"status": "completed", "ste', "[1, 2]", '{"status": "completed"}'])
def test_report_on_a_damaged_run_record_stops_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, record: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(record)
    err = cli_error(capsys, "report", str(run))
    assert len(err) == 1 and "run.json is damaged or not a pipeline run record" in err[0]


# ---- a full disk, a read-only folder: one line naming the folder, exit 2, no retries -----------------------------


@pytest.mark.integration
def test_a_read_only_output_folder_is_refused_in_one_line(
    tiny_data: Path, mount, capsys: pytest.CaptureFixture
) -> None:
    read_only = mount("ro", "ro,size=1m")
    err = cli_error(capsys, "fit", *tiny_args(tiny_data, read_only, "--model.network=cnn", "--trainer.max_epochs=1"))
    assert len(err) == 1 and f"{read_only}" in err[0] and "read-only" in err[0]
    with pytest.raises(SystemExit) as exit_:  # the pipeline: before Prefect's server starts
        command.parse_args(["--output-dir", str(read_only / "runs")])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and f"{read_only}: cannot write there, the file system is read-only" in err[0]


@pytest.mark.integration
def test_a_full_disk_fails_the_pipeline_in_one_line_without_retries(
    pipeline,
    tiny_data: Path,
    mount,
) -> None:
    full = mount("full", "size=2m")  # room for the run folder and logs, not for the dense net's 27 MB checkpoint
    with pytest.raises(Exception, match="no space left on the device") as error:
        pipeline.full_pipeline(tiny_settings(tiny_data, full, models=["dense"], epochs=1))
    assert f"{full}/steps/train-dense-seed0-" in str(error.value).split("cannot write there")[0]  # names the folder
    assert isinstance(error.value, (processes.BadInputError, PlaceError))  # permanent: exit 2, not retried
    (log,) = full.glob("steps/train-dense-*/train.log")
    assert log.read_text().count("$ ") == 1  # one attempt
    (record,) = full.glob("*/run.json")
    assert json.loads(record.read_text())["status"] == "failed"


@pytest.mark.parametrize("case", ["val-size", "no folder", "half a file", "half a .gz file"])
def test_data_the_pipeline_can_check_is_refused_before_prefect_starts_in_its_own_words(
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    case: str,
) -> None:
    argv = ["--data-dir", str(tiny_data), "--no-require-official", "--output-dir", str(tmp_path / "out")]
    expected = {
        "val-size": "--val-size 640 leaves no training images",
        "no folder": "--data-dir /nonexistent does not exist",
        "half a file": "header says 640 images but the file holds",
        "half a .gz file": "header says 640 images but the file holds",
    }[case]
    images = tiny_data / "train-images-idx3-ubyte.gz"
    if case == "val-size":
        argv += ["--val-size", "640"]
    elif case == "no folder":
        argv[1] = "/nonexistent"
    elif case == "half a file":
        raw = gzip.decompress(images.read_bytes())
        images.unlink()
        images.with_suffix("").write_bytes(raw[: len(raw) // 2])
    else:
        images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[: 16 + 320 * 784]))
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        command.parse_args(argv)
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and expected in err[0] and len(err) == 2  # the error, then the --help hint
    assert time.perf_counter() - started < 5, "the README promises these refusals within seconds"


def test_a_stop_signal_wrapped_by_the_code_it_interrupted_still_ends_as_a_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Ctrl-C while the flow submits its steps to Dask: pydantic, serializing Prefect's context, turns the handler's
    # SystemExit(130) into a PydanticSerializationError (seen in CI). It is still the user's stop, not a failure.
    import argparse

    from fmnist_pl.pipeline import launch
    from fmnist_pl.pipeline.settings import PipelineSettings

    def interrupted_while_submitting(settings):
        try:
            launch.stop_on_signal(signal.SIGINT, None)
        except SystemExit as e:
            raise ValueError(f"Error calling function `_ser_model`: SystemExit: {e.code}") from None

    monkeypatch.setattr(launch, "full_pipeline", interrupted_while_submitting)
    monkeypatch.setattr(launch, "prefect_api", lambda output_dir: contextlib.nullcontext())
    monkeypatch.setattr(launch, "STOP_SIGNALS", [])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exit_:
            launch.launch(argparse.Namespace(command="run"), PipelineSettings(output_dir=str(tmp_path)))
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert exit_.value.code == 130
    assert "fmnist-pl pipeline stopped" in capsys.readouterr().err
