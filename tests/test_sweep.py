"""The sweep flow (flows/sweep.py): search spaces and storages refused in one line, trials pruned and resumed,
SQLite and PostgreSQL, trials on Dask workers, and what a sweep writes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, write_idx_dir

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "flows" / "sweep.py"
# 1e-9 cannot learn. The epochs are the tests' own, not the packaged recipe's (which a sweep may change).
TRIAL_EPOCHS = 6
TINY_SPACE = f"model.learning_rate: [3.0e-3, 1.0e-9]\ndata.batch_size: [32, 64]\ntrainer.max_epochs: [{TRIAL_EPOCHS}]\n"


def sweep_settings(data: Path, out: Path, **overrides: object):
    from fmnist_pl.sweep.settings import SweepSettings

    space = out / "space.yaml"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text(TINY_SPACE)
    base = dict(
        network="cnn",
        space=str(space),
        data_dir=str(data),
        require_official=False,
        val_size=100,
        accelerator="cpu",
        output_dir=str(out),
    )
    return SweepSettings(**{**base, **overrides})


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("- 1\n- 2\n", "expected a mapping of `fit` options"),
        ("model.learning_rate: []\n", "an empty list of choices"),
        ("model.learning_rate: {low: 0.1, high: 0.01}\n", "low (0.1) must be below high (0.01)"),
        ("model.learning_rate: {low: 0, high: 0.1, log: true}\n", "a log scale needs low > 0"),
        ("model.learning_rate: {low: 0.1, hi: 1}\n", "expected a list of choices or {low, high"),
        ("model.learning_rate: {low: a, high: 1}\n", "must be numbers"),
        ("model.learning_rate: [1, 2\n", "cannot read it"),
    ],
)
def test_a_malformed_search_space_is_refused_in_one_line(tmp_path: Path, text: str, complaint: str) -> None:
    from fmnist_pl.errors import ConfigError
    from fmnist_pl.sweep.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_space(path)
    assert complaint in str(refused.value) and "\n" not in str(refused.value)


def test_a_search_space_file_becomes_optuna_distributions(tmp_path: Path) -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from fmnist_pl.sweep.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(
        "--model.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\ntrainer.max_epochs: {low: 3, high: 8}\n"
        "data.batch_size: [64, 128]\n"
    )
    assert load_space(path) == {
        "model.learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
        "trainer.max_epochs": IntDistribution(3, 8),
        "data.batch_size": CategoricalDistribution([64, 128]),
    }


def test_a_storage_that_does_not_answer_or_is_no_url_is_refused_in_one_line_within_15_s() -> None:
    from fmnist_pl.errors import ConfigError
    from fmnist_pl.sweep.settings import open_storage

    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        open_storage(f"postgresql://fmnist:secret@127.0.0.1:{free_port()}/sweeps")
    message = str(refused.value)
    assert time.monotonic() - started < 15, "the README promises a refusal within 15 s"
    assert message.startswith("--storage postgresql://fmnist:***@127.0.0.1") and "secret" not in message
    assert "\n" not in message and "cannot open the study's database: connection failed" in message
    assert "Connection refused" in message  # the server's answer, not a missing driver
    with pytest.raises(ConfigError, match="not a database URL"):
        open_storage("no url at all")


def test_the_confirmation_calls_the_winner_better_only_when_the_interval_excludes_zero() -> None:
    import numpy as np

    from fmnist_pl.report.statistics import paired_comparison
    from fmnist_pl.sweep.confirm import verdict

    rng = np.random.default_rng(0)
    default = rng.random((3, 1000)) < 0.88
    planted = default | (rng.random((3, 1000)) < 0.3)  # the tuned config also gets right ~30 % of its misses
    better = paired_comparison(planted, default, [0, 1, 2])
    assert better["ci_low"] > 0 and verdict(better).startswith("better")
    assert verdict(paired_comparison(default, planted, [0, 1, 2])) == "worse: keep the default"
    shuffled = np.stack([rng.permutation(row) for row in default])  # the same accuracy, other images right
    same = paired_comparison(shuffled, default, [0, 1, 2])
    assert same["ci_low"] <= 0 <= same["ci_high"] and verdict(same) == "no detectable difference, keep the default"


def test_of_equally_good_trials_the_one_with_fewest_epochs_is_best(tmp_path: Path) -> None:
    import optuna

    from fmnist_pl.configs import profile_config
    from fmnist_pl.sweep.outputs import best_config, best_trial

    epochs = optuna.distributions.IntDistribution(4, 8)
    study = optuna.create_study(direction="maximize")
    for value, n in ((0.9472, 6), (0.9472, 5), (0.9454, 4), (0.9472, 5)):  # 4736 of 5000 right, three times
        study.add_trial(
            optuna.trial.create_trial(
                params={"trainer.max_epochs": n},
                distributions={"trainer.max_epochs": epochs},
                value=value,
                user_attrs={"epochs": n},
            )
        )
    assert study.best_trial.number == 0  # Optuna's: the first of the equals
    assert best_trial(study).number == 1  # the cheaper recipe, the first of those
    assert best_config(study, profile_config("fast", "bn_cnn"))["trainer"]["max_epochs"] == 5
    better = optuna.trial.create_trial(
        params={"trainer.max_epochs": 8}, distributions={"trainer.max_epochs": epochs}, value=0.95
    )
    study.add_trial(better)
    assert best_trial(study).number == 4  # a better accuracy wins at any cost


@pytest.mark.integration
def test_an_option_fit_does_not_have_or_a_value_it_refuses_ends_the_command_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fmnist_pl.sweep.command import parse_args

    data = write_idx_dir(tmp_path / "fmnist")
    space = tmp_path / "space.yaml"
    args = ["--network", "cnn", "--space", str(space), "--data-dir", str(data), "--no-require-official"]
    args += ["--val-size", "100", "--output-dir", str(tmp_path / "out")]
    # The command users type, once; the same check in this process for the second space.
    space.write_text("model.no_such_option: [1, 2]\n")
    result = subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stderr
    space.write_text("model.optimizer: [adam, rmsprop]\n")
    with pytest.raises(SystemExit) as refused:
        parse_args(args)
    assert refused.value.code == 2
    for stderr, complaint in [
        (result.stderr, "unrecognized arguments: --model.no_such_option=1"),
        (capsys.readouterr().err, 'Parser key "model.optimizer"'),
    ]:
        first = stderr.splitlines()[0]
        assert first.startswith(f"sweep.py: error: --space {space}: `fmnist-pl fit` refuses it:")
        assert complaint in first and len(stderr.splitlines()) == 2  # the line and the --help hint
    assert not (tmp_path / "out" / "sweeps").exists()  # before any trial, and before Prefect started


@pytest.mark.integration
def test_every_packaged_search_space_is_taken_by_fit_with_its_network_s_fast_config() -> None:
    from fmnist_pl.configs import profile_config
    from fmnist_pl.networks import NETWORKS
    from fmnist_pl.sweep.space import check_against_fit, load_space, packaged_space

    for network in NETWORKS:
        check_against_fit(load_space(packaged_space(network)), profile_config("fast", network), packaged_space(network))


@pytest.mark.integration
def test_a_sweep_prunes_a_trial_that_cannot_learn_ends_with_n_trials_and_writes_a_best_config_fit_takes(
    prefect_api: str, tiny_data: Path, tmp_path: Path
) -> None:
    import optuna

    from fmnist_pl.cli import main as cli_main
    from fmnist_pl.sweep.flow import sweep
    from fmnist_pl.sweep.settings import open_storage

    settings = sweep_settings(tiny_data, tmp_path / "out", trials=2, prune_after=1, confirm_seeds=[0])
    storage = open_storage(settings.storage_url())  # makes its folder
    study = optuna.create_study(study_name=settings.study_name(), storage=storage, direction="maximize")
    study.enqueue_trial({"model.learning_rate": 3e-3, "data.batch_size": 32})  # learns: the median to beat
    study.enqueue_trial({"model.learning_rate": 1e-9, "data.batch_size": 32})  # cannot learn
    folder = Path(sweep(settings))

    study = optuna.load_study(study_name=settings.study_name(), storage=settings.storage_url())
    good, bad = study.trials
    assert good.state.name == "COMPLETE" and good.user_attrs["epochs"] == TRIAL_EPOCHS
    assert bad.state.name == "PRUNED" and bad.user_attrs["epochs"] < TRIAL_EPOCHS  # stopped inside its fit
    assert json.loads((Path(bad.user_attrs["dir"]) / "pruned.json").read_text())["epochs"] == bad.user_attrs["epochs"]
    assert sorted(bad.intermediate_values) == list(range(bad.user_attrs["epochs"]))  # reported by the fit, per epoch

    trials = (folder / "trials.csv").read_text().splitlines()
    assert trials[0].startswith(
        "number,params.data.batch_size,params.model.learning_rate,params.trainer.max_epochs,value,state,epochs,seconds"
    )
    assert [line.split(",")[5] for line in trials[1:]] == ["complete", "pruned"]
    for figure in ("optimization_history", "parallel_coordinates", "parameter_importances"):
        assert (folder / "figures" / f"{figure}.png").stat().st_size > 10_000
    report = (folder / "report.md").read_text()
    assert "## Confirmation on the test set" in report
    assert "Best: trial **0**" in report and "| 1 | 32 | 1e-09 |" in report
    assert '<img src="data:image/png;base64,' in (folder / "report.html").read_text()
    # The winner against the default, each trained on seed 0 and evaluated on the test set.
    confirmation = json.loads((folder / "confirmation.json").read_text())
    assert confirmation["seeds"] == [0] and set(confirmation["test_accuracy"]) == {"best", "default"}
    assert f"**{confirmation['verdict']}**" in report

    # best.yaml is a config fit takes as it is, with the best trial's options in it.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as parsed:
        cli_main(["fit", f"--config={folder / 'best.yaml'}", "--print_config"])
    assert parsed.value.code in (0, None)
    assert "learning_rate: 0.003" in printed.getvalue() and "batch_size: 32" in printed.getvalue()

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        keys = {a.key: a for a in artifact}
    assert "sweep-cnn-fast" in keys and "data:image/png;base64," in keys["sweep-cnn-fast"].data


@pytest.mark.integration
def test_a_trial_stopped_by_a_stop_signal_is_asked_again_not_counted_as_a_failure(
    prefect_api: str, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop signal's handler sets the run's stop flag, and Prefect may swallow the exit it raises: the trial
    it stopped fails as a step. The sweep must end as stopped with that trial asked again, not go on asking new
    trials that fail at once (found: four failed trials and no retry after a Ctrl-C)."""
    import optuna
    from prefect import task

    from fmnist_pl.pipeline.processes import StepFailed, current_run
    from fmnist_pl.sweep import flow

    @task(name="trial-stopped")
    def stopped_trial(**inputs: object) -> None:
        current_run().stopping.set()  # what the signal handler's stop_children() does
        raise StepFailed("`fmnist-pl fit` failed (exit code -15): stopped")

    monkeypatch.setattr(flow, "run_trial", stopped_trial)
    settings = sweep_settings(tiny_data, tmp_path / "out", trials=3)
    with pytest.raises(StepFailed, match="stopped"):
        flow.sweep(settings)
    study = optuna.load_study(study_name=settings.study_name(), storage=settings.storage_url())
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    assert study.trials[1].system_attrs["fixed_params"] == study.trials[0].params


def start_and_wait_for_trial(command: list[str], env: dict, log: Path, settings, number: int):
    """Start the sweep `command` (a new process group, as a terminal runs it); return the process and trial
    `number` once its fit has reported an epoch and written the checkpoint a rerun resumes from (the epoch's
    value reaches the study a moment before its last.ckpt: a kill in between rightly starts that trial afresh)."""
    import optuna

    from fmnist_pl import layout

    def every_trial_folder_has_a_checkpoint() -> bool:
        folders = list((Path(settings.output_dir) / "steps").glob("trial-*"))
        return bool(folders) and all((folder / layout.LAST_CHECKPOINT).is_file() for folder in folders)

    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        with contextlib.suppress(Exception):  # the study's database may not exist yet
            study = optuna.load_study(study_name=settings.study_name(), storage=settings.storage_url())
            running = [t for t in study.trials if t.number == number and t.intermediate_values]
            if running and running[0].state.name == "RUNNING" and every_trial_folder_has_a_checkpoint():
                return process, running[0]
    raise AssertionError(log.read_text()[-3000:])


@pytest.mark.integration
def test_a_stopped_or_killed_sweep_run_again_keeps_its_finished_trials_asks_the_running_one_again_trains_nothing_twice(
    prefect_api: str, tmp_path: Path
) -> None:
    import optuna
    import pandas as pd
    import psutil

    data = write_idx_dir(tmp_path / "fmnist")
    settings = sweep_settings(data, tmp_path / "out", trials=3)
    command = [sys.executable, str(SWEEP), "--network", "cnn", "--trials", "3", "--space", settings.space]
    command += ["--data-dir", str(data), "--no-require-official", "--val-size", "100"]
    command += ["--output-dir", settings.output_dir]
    # The session's Prefect server for the runs that are stopped (test_failures stops a run's temporary server with
    # it); the last run, which finishes, starts its own.
    env = {**os.environ, "PREFECT_API_URL": prefect_api}

    # Ctrl-C (SIGINT to the terminal's process group) during trial 0: it stops, says so, leaves no fit running.
    first, trial = start_and_wait_for_trial(command, env, tmp_path / "first.log", settings, 0)
    fits = [p for p in psutil.Process(first.pid).children(recursive=True) if "fit" in p.cmdline()]
    assert fits
    os.killpg(first.pid, signal.SIGINT)
    assert first.wait(timeout=120) == 130
    last = (tmp_path / "first.log").read_text().strip().splitlines()[-1]
    assert last.startswith("fmnist-pl sweep stopped: its running trials were stopped and marked failed")
    assert not [p for p in fits if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    study = optuna.load_study(study_name=settings.study_name(), storage=settings.storage_url())
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # asked again, first, on the next run

    # SIGKILL to the flow during trial 2 (the retry of 0 is trial 1): nothing of it gets to tidy up.
    second, running = start_and_wait_for_trial(command, env, tmp_path / "second.log", settings, 2)
    second.send_signal(signal.SIGKILL)
    second.wait()
    own_server = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    again = subprocess.run(command, capture_output=True, text=True, env=own_server, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "trials [2] were running when their sweep was killed: marked failed and asked again" in again.stderr
    assert "fmnist-pl sweep: temporary Prefect server on http://" in again.stdout  # named as the sweep's own
    study = optuna.load_study(study_name=settings.study_name(), storage=settings.storage_url())
    states = {t.number: t.state.name for t in study.trials}
    assert states[0] == "FAIL" and states[1] == "COMPLETE" and states[2] == "FAIL"
    assert sum(state in ("COMPLETE", "PRUNED") for state in states.values()) == 3
    assert study.trials[1].params == trial.params and study.trials[1].user_attrs["retry_of"] == 0
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == 2)
    assert retry.params == running.params and retry.state.name == "COMPLETE"
    # Each stopped trial resumed in its own folder from its last finished epoch: two fit commands, not a new start.
    # The stopped one (Ctrl-C) shows every epoch once; the killed flow's fit ran on for a moment with no one
    # reading its lines (its epoch in progress is trained again), so its folder is checked by its history.
    for resumed in (study.trials[1], retry):
        folder = Path(resumed.user_attrs["dir"])
        log = (folder / "train.log").read_text()
        assert log.count("$ ") == 2 and "Restored all states from the checkpoint" in log
        assert pd.read_csv(folder / "history.csv")["epoch"].tolist() == list(range(TRIAL_EPOCHS))
    stopped = (Path(study.trials[1].user_attrs["dir"]) / "train.log").read_text()
    assert [stopped.count(f"[cnn] epoch {epoch}/{TRIAL_EPOCHS}:") for epoch in range(1, TRIAL_EPOCHS + 1)] == [
        1
    ] * TRIAL_EPOCHS, stopped
    finished = [t for t in study.trials if t.state.name == "COMPLETE" and "retry_of" not in t.user_attrs]
    assert finished and all((Path(t.user_attrs["dir"]) / "train.log").read_text().count("$ ") == 1 for t in finished)


def postgres_binaries() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server (Debian's package) on a free loopback port, in a folder of its own, for this module:
    yields the URL of an empty database. Root starts it as the postgres user, which the server insists on."""
    binaries = postgres_binaries()
    if binaries is None or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql), or this is not root")
    folder = Path(tempfile.mkdtemp(prefix="fmnist-postgres-"))
    shutil.chown(folder, "postgres", "postgres")
    port = free_port()

    def as_postgres(*command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=60)

    as_postgres(str(binaries / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "postgres")
    options = f"-p {port} -k {folder} -h 127.0.0.1"
    as_postgres(
        str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-o", options, "-l", str(folder / "log"), "-w", "start"
    )
    try:
        as_postgres(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "sweeps")
        yield f"postgresql://postgres@127.0.0.1:{port}/sweeps"
    finally:
        as_postgres(str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.integration
def test_two_trials_at_a_time_on_dask_workers_share_one_study_in_postgresql(
    prefect_api: str, postgres: str, tiny_data: Path, tmp_path: Path
) -> None:
    import optuna

    from fmnist_pl.sweep.flow import sweep

    settings = sweep_settings(tiny_data, tmp_path / "out", trials=2, parallel=2, storage=postgres, dask_workers=2)
    sweep(settings)
    study = optuna.load_study(study_name=settings.study_name(), storage=postgres)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    first, second = study.trials
    assert second.datetime_start < first.datetime_complete  # at the same time
    workers = {json.loads((Path(t.user_attrs["dir"]) / "done.json").read_text())["worker"]["pid"] for t in study.trials}
    assert os.getpid() not in workers  # trained on the LocalCluster's worker processes, not in the flow's
    # A second machine's sweep of the same study sees those trials: one more trial makes three, not two more.
    sweep(settings.model_copy(update={"trials": 3, "dask_workers": None, "parallel": 1}))
    assert len(optuna.load_study(study_name=settings.study_name(), storage=postgres).trials) == 3
