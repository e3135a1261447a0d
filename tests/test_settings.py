"""Pipeline settings declared once (argparse, Prefect parameters, CLI options derive from them) and the run layout."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest

from fmnist_pl import layout
from fmnist_pl.configs import packaged_configs, profile_config
from fmnist_pl.networks import NETWORKS
from fmnist_pl.pipeline import command, flow, processes, scheduling, step_cache, tasks
from fmnist_pl.pipeline.run_record import DataRecord, StepResult
from fmnist_pl.pipeline.settings import PipelineSettings, add_settings_arguments


def test_every_field_is_a_command_line_option_with_its_default_and_help() -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == set(PipelineSettings.model_fields)
    for name, info in PipelineSettings.model_fields.items():
        assert actions[name].option_strings[0] == "--" + name.replace("_", "-")
        assert actions[name].help == info.description and actions[name].default == info.default
    assert tuple(actions["models"].choices) == tuple(NETWORKS)  # the registry's networks, nothing retyped
    parsed = parser.parse_args(["--models", "cnn", "bn_cnn", "--epochs", "3", "--no-require-official"])
    assert (parsed.models, parsed.epochs, parsed.require_official) == (["cnn", "bn_cnn"], 3, False)


def test_flow_command_line_builds_the_settings(tiny_data: Path, tmp_path: Path) -> None:
    out = ["--output-dir", str(tmp_path)]
    args, settings = command.parse_args(["--epochs", "2", "--devices", "2", "--data-dir", str(tiny_data), *out])
    assert args.command == "run"
    assert settings == PipelineSettings(epochs=2, devices="2", data_dir=str(tiny_data), output_dir=str(tmp_path))
    args, settings = command.parse_args(["serve", "--cron", "0 3 * * *", "--models", "dense", *out])
    assert (args.command, args.cron, settings.models) == ("serve", "0 3 * * *", ["dense"])
    with pytest.raises(SystemExit):
        command.parse_args(["--models", "resnet"])


def test_settings_become_the_fit_options_of_a_training() -> None:
    settings = PipelineSettings(epochs=3, seeds=[7, 8], require_official=False, data_dir="/data")
    assert tasks.fit_options(settings) == [
        "--trainer.max_epochs=3",
        "--trainer.accelerator=auto",
        "--trainer.devices=auto",
        "--trainer.strategy=auto",
        "--trainer.num_nodes=1",
        "--data.require_official=false",
    ]  # None settings (batch size, val size) leave the config's values; the step adds the data's folder and seed


def test_an_evaluation_is_passed_only_the_options_it_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = []
    monkeypatch.setattr(tasks, "run_step_command", lambda command, log, **kwargs: commands.append(command))
    monkeypatch.setattr(tasks, "mark_finished", lambda work, result, outputs: result)
    monkeypatch.setattr(tasks, "get_run_logger", lambda: SimpleNamespace(info=print))
    train_dir = tmp_path / "train-cnn-seed0-key"
    (train_dir / "checkpoints").mkdir(parents=True)
    (train_dir / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    settings = PipelineSettings(epochs=3, batch_size=64, val_size=100, devices="2", strategy="ddp", data_dir="/d")
    data = DataRecord("/d", {"decoded": "x"}, 0.0)
    trained = StepResult("cnn", 0, str(train_dir), 1.0)
    tasks.evaluate_model.fn("cnn", 0, trained, settings, data, str(tmp_path))
    (command,) = commands
    assert command[0] == "evaluate" and "--data.val_size=100" in command and "--trainer.devices=1" in command
    assert not any(o.startswith(("--trainer.max_epochs", "--data.batch_size", "--trainer.strategy")) for o in command)


def test_default_networks_are_those_the_profile_has_configs_for() -> None:
    assert PipelineSettings().networks() == list(NETWORKS)
    assert PipelineSettings(profile="reference").networks() == ["dense", "cnn"]  # the study had no third network
    assert PipelineSettings(models=["bn_cnn"]).networks() == ["bn_cnn"]
    assert all(profile_config("fast", n) for n in NETWORKS)
    assert set(packaged_configs()) >= {"reference_dense", "reference_cnn", "fast_dense", "fast_cnn", "fast_bn_cnn"}


@pytest.mark.parametrize(
    "bad",
    [
        {"models": ["resnet"]},
        {"profile": "slow"},
        {"epochs": 0},
        {"batch_size": -1},
        {"epochs_typo": 3},
        {"seeds": []},
        {"seeds": [1, 1]},
        {"devices": "0"},
    ],
)
def test_bad_settings_are_rejected_before_any_work(bad: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        PipelineSettings(**bad)


def test_a_profile_without_a_config_for_a_network_is_one_clear_error() -> None:
    from fmnist_pl.errors import ConfigError

    with pytest.raises(ConfigError, match="profile 'reference' has no config for network 'bn_cnn'"):
        PipelineSettings(profile="reference").config_file("bn_cnn")


def test_step_keys_change_with_what_decides_the_result_only(tmp_path: Path) -> None:
    data = DataRecord("/d", {"train-images-idx3-ubyte": "a", "decoded": "b"}, 0.0)

    def key(network: str, seed: int, settings: PipelineSettings, data: dict, threads: int) -> str:
        # As the training task calls it.
        config = settings.config_file(network)
        return step_cache.training_key(network, seed, config, tasks.fit_options(settings), data, threads)

    base = key("bn_cnn", 0, PipelineSettings(), data, 2)
    assert base == key("bn_cnn", 0, PipelineSettings(train_launcher="srun"), data, 2)  # how, not what
    assert base == key("bn_cnn", 0, PipelineSettings(data_dir="/elsewhere"), data, 2)  # the checksums stand in
    changed = [
        key("bn_cnn", 1, PipelineSettings(), data, 2),
        key("bn_cnn", 0, PipelineSettings(epochs=2), data, 2),
        key("bn_cnn", 0, PipelineSettings(), data, 1),
        key("cnn", 0, PipelineSettings(), data, 2),
        key("bn_cnn", 0, PipelineSettings(), DataRecord("/d", {**data.sha256, "decoded": "c"}, 0.0), 2),
    ]
    assert len({base, *changed}) == 6  # seed, epochs, threads, network, the decoded data's checksum
    evaluation = step_cache.evaluation_key  # keyed on the checkpoint's bytes, not on where it lies
    for name, content in (("t.ckpt", b"weights"), ("moved.ckpt", b"weights"), ("u.ckpt", b"other weights")):
        (tmp_path / name).write_bytes(content)
    t, moved, u = tmp_path / "t.ckpt", tmp_path / "moved.ckpt", tmp_path / "u.ckpt"
    assert evaluation(t, data, True) == evaluation(moved, data, True)
    assert len({evaluation(t, data, True), evaluation(t, data, False), evaluation(u, data, True)}) == 3


def test_run_layout_names_every_file_once(tmp_path: Path) -> None:
    run = layout.RunFolder(tmp_path / "run")
    assert run.record == tmp_path / "run" / "run.json"
    seed = tmp_path / "run" / "cnn" / "seed-1"
    assert run.training("cnn", 1).best_checkpoint == seed / "train" / "checkpoints" / "best.ckpt"
    evaluation = run.evaluation("cnn", 1)
    assert evaluation.test_metrics == seed / "evaluate" / "test_metrics.json"
    assert evaluation.confusion_test.name == "confusion_matrix_test.csv"
    assert evaluation.predictions("train") == seed / "evaluate" / "predictions_train.csv"
    assert layout.step_folder(tmp_path, "train", "cnn", 1, "abc") == tmp_path / "train-cnn-seed1-abc"


@pytest.mark.integration  # a fresh interpreter
def test_importing_the_package_changes_nothing_global() -> None:
    """Warning filters, environment variables and matplotlib's backend are the entry points' business."""
    import subprocess
    import sys

    probe = (
        # The dependencies first: torch and Lightning set filters and variables of their own when imported.
        "import os, sys, warnings, torch, torchvision, lightning, torchmetrics, pandas, matplotlib, pydantic, prefect; "
        "import lightning.pytorch.cli, matplotlib.figure; "
        "backend = dict.__getitem__(matplotlib.rcParams, 'backend'); "
        "filters = list(warnings.filters); env = dict(os.environ); "
        "import fmnist_pl, fmnist_pl.cli, fmnist_pl.report, fmnist_pl.callbacks, fmnist_pl.pipeline.command; "
        "assert warnings.filters == filters, 'warning filters changed'; assert dict(os.environ) == env, 'env changed'; "
        "assert dict.__getitem__(matplotlib.rcParams, 'backend') == backend, 'matplotlib backend chosen'"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_pipeline_s_own_process_never_loads_lightning() -> None:
    """The flow's process (the script, a Prefect worker's flow run, a Dask worker's tasks) runs every step as an
    `fmnist-pl` subprocess. Lightning would only slow its start (1.3 s of imports), and errors.USER_ERRORS can
    leave Lightning's errors out because none can be raised there."""
    import subprocess
    import sys

    probe = (
        "import sys, fmnist_pl.pipeline.launch, fmnist_pl.pipeline.tasks, fmnist_pl.pipeline.flow; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'torchmetrics', 'jsonargparse'}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"the pipeline's process loads {result.stdout.strip()}"


def test_cpu_threads_follow_training_cost_and_use_every_core() -> None:
    shares = scheduling.cpu_thread_shares
    costs = {"dense": 1.2e12, "cnn": 0.5e12, "bn_cnn": 11e12}  # one clearly dominant training
    assert shares(costs, 2) == {"dense": 1, "cnn": 1, "bn_cnn": 2}  # it would otherwise finish alone on one core
    assert shares(costs, 4) == {"dense": 1, "cnn": 1, "bn_cnn": 2}
    assert shares(costs, 8) == {"dense": 2, "cnn": 1, "bn_cnn": 5}
    assert sum(shares(costs, 16).values()) == 16
    assert shares({"dense": 1.2e12, "cnn": 0.5e12}, 2) == {"dense": 1, "cnn": 1}  # no clear winner: no oversubscribing
    # The fast profile: bn_cnn's 5 epochs are 78 % of the estimated work beside dense's 8, under the 80 % that
    # oversubscribes, so on 2 cores it trains on one beside dense then cnn on the other: 533 s of training, against
    # about 557 s estimated for bn_cnn on both cores first, then dense (benchmarks/README.md, "The time condition").
    profile = {network: scheduling.training_cost(PipelineSettings(), network) for network in ("dense", "cnn", "bn_cnn")}
    assert 0.7 < profile["bn_cnn"] / sum(profile.values()) < 0.8
    assert shares(profile, 2) == {"dense": 1, "cnn": 1, "bn_cnn": 1}
    assert shares(profile, 8) == {"dense": 2, "cnn": 1, "bn_cnn": 5}


def test_a_networks_threads_depend_on_the_profile_and_the_cores_only() -> None:
    # Threads change a convolution's sums, so what else a run trains must not change a network's thread count.
    costs = {"bn_cnn": 11e12, "dense": 1.2e12, "cnn": 0.5e12}
    assert scheduling.training_plan(costs, 2) == {"bn_cnn": 2, "dense": 1, "cnn": 1}
    assert sum(scheduling.training_plan(costs, 16).values()) == 16  # all at once when the cores allow


def test_the_flow_gives_a_network_the_same_threads_whatever_else_it_trains(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    planned: dict[tuple[str, int], set] = {}

    def plan_training(network, seed, settings, data, steps_dir, threads, ticket):
        planned.setdefault((network, seed), set()).add((threads, processes.current_run().queue.budget))

    def stop(*args, **kwargs):
        raise RuntimeError("planned")

    monkeypatch.setattr(flow.train_model, "submit", plan_training)
    monkeypatch.setattr(flow.evaluate_model, "submit", stop)
    monkeypatch.setattr(
        flow.download_data, "submit", lambda *a: SimpleNamespace(result=lambda: DataRecord("x", {}, 0.0))
    )
    monkeypatch.setattr(scheduling.os, "cpu_count", lambda: 2)
    for models, seeds in ((["bn_cnn"], [0]), (None, [0]), (None, [0, 1, 2]), (["cnn"], [0, 1])):
        with pytest.raises(RuntimeError, match="planned"):
            flow.full_pipeline.fn(PipelineSettings(models=models, seeds=seeds, output_dir=str(tmp_path)))
    # Alone or beside the others, one seed or three: the profile's plan for 2 cores, one thread each.
    assert planned[("bn_cnn", 0)] == planned[("cnn", 0)] == planned[("cnn", 1)] == planned[("dense", 2)] == {(1, 2)}


def test_training_queue_starts_trainings_in_ticket_order_within_its_budget() -> None:
    import threading
    import time

    queue, started, running, most = scheduling.TrainingQueue(budget=2), [], [0], [0]
    lock = threading.Lock()

    def train(ticket: int, cached: bool = False) -> None:
        try:
            if cached:
                return
            with queue.turn(ticket):
                with lock:
                    started.append(ticket)
                    running[0] += 1
                    most[0] = max(most[0], running[0])
                time.sleep(0.02)
                with lock:
                    running[0] -= 1
        finally:
            queue.pass_turn(ticket)

    threads = [threading.Thread(target=train, args=(t, t == 2)) for t in (5, 4, 3, 2, 1, 0)]  # arrive in reverse
    for thread in threads:
        thread.start()
        time.sleep(0.005)
    for thread in threads:
        thread.join(timeout=10)
    assert started == [0, 1, 3, 4, 5] and most[0] == 2  # ticket 2 was cached: it held nobody up

    big = scheduling.TrainingQueue(budget=4)
    with big.turn(0, threads=2), big.turn(1, threads=2):  # 2 + 2 threads fit a budget of 4 ...
        blocked = threading.Thread(target=lambda: big.turn(2, threads=1).__enter__())
        blocked.start()
        blocked.join(timeout=1.5)
        assert blocked.is_alive()  # ... a fifth thread does not, until one of them ends
    blocked.join(timeout=5)
    assert not blocked.is_alive()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs: Input should be greater than or equal to 1"),
        (["--seeds", "1", "1"], "--seeds: each seed once"),
        (["--seeds", "-1"], "--seeds: seed -1 is out of range: a seed is a whole number from 0 to 4,294,967,295"),
        (["--seeds", "0", "4294967296"], "--seeds: seed 4294967296 is out of range"),
        (["--devices", "0"], "--devices: needs at least one device"),
        (["--profile", "reference", "--models", "bn_cnn"], "profile 'reference' has no config for network 'bn_cnn'"),
    ],
)
def test_bad_pipeline_options_stop_in_one_line_before_any_work(
    capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        command.parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and message in err[0] and "--help" in err[1]  # the error first, a hint after, no usage


@pytest.mark.integration  # a subprocess
def test_tests_and_the_processes_they_start_never_use_the_users_home(isolated_home: Path) -> None:
    import subprocess
    import sys

    from conftest import USERS_HOME

    probe = (
        "from pathlib import Path; from fmnist_pl.fashion_mnist import default_cache_dir; "
        "from prefect.settings import PREFECT_HOME; print(Path.home(), default_cache_dir(), PREFECT_HOME.value())"
    )
    home, cache, prefect_home = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert Path(home) == isolated_home and Path(prefect_home).is_relative_to(isolated_home)
    assert not any(Path(p).is_relative_to(USERS_HOME) for p in (home, cache, prefect_home))
