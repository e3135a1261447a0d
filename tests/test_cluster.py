"""The pipeline's steps on a real Dask cluster (`dask scheduler` and two `dask worker` processes), on loopback and,
as root, with each worker in a network namespace of its own (another host on the network), through prefect-dask's
DaskTaskRunner: where the steps ran, the results against the local runner's, what Prefect's API saw, a stop, a
killed worker, and the refusals before anything trains."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import FLOW_FILE, TINY_RUN_SEEDS, free_port, tiny_run_settings, tiny_settings

from fmnist_pl import layout
from fmnist_pl.errors import ConfigError
from fmnist_pl.pipeline import cluster
from fmnist_pl.pipeline.scheduling import cpu_schedule

pytestmark = pytest.mark.integration  # a Dask scheduler, its workers, real fits


def dask_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("dask")), *args]


def wait_for_workers(address: str, count: int, timeout: float = 60) -> list[int]:
    """The PIDs of the cluster's worker processes, once `count` of them have joined."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(count, timeout=timeout)
        return sorted(client.run(os.getpid).values())


def stop_processes(processes: list[subprocess.Popen], grace: float = 3) -> None:
    """Stop a fixture's scheduler, workers and server (each the leader of a session of its own): SIGTERM, then
    SIGKILL to whatever of their sessions is left after `grace` seconds. Nothing of theirs is kept: a polite stop
    took 8-16 s here, workers draining their Prefect events."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the session: a worker's nanny and the worker it started
        process.wait()


@pytest.fixture(scope="module")
def loopback_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[int]]]:
    """`dask scheduler` and two `dask worker` processes on loopback, each worker in its own working folder and
    declaring one thread; yields the scheduler's address and the workers' PIDs."""
    root = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    log = open(root / "cluster.log", "w")  # noqa: SIM115 - open for the fixture's whole life
    processes = [
        subprocess.Popen(
            dask_command("scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ]
    for name in ("a", "b"):
        (root / name).mkdir()
        worker = ["worker", address, "--nworkers", "1", "--nthreads", "1", "--resources", "threads=1"]
        worker += ["--no-dashboard", "--name", name, "--local-directory", str(root / name)]
        processes.append(
            subprocess.Popen(
                dask_command(*worker), cwd=root / name, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    try:
        yield address, wait_for_workers(address, 2)
    finally:
        stop_processes(processes)
        log.close()


def one_thread_networks(settings) -> list[str]:
    """The profile's networks that the local runner trains on one thread on this machine, as each training on a
    one-thread worker is: their floating-point sums, hence their results, are the same on both runners."""
    _, _, threads = cpu_schedule(settings)
    return [network for network in settings.networks() if threads.get(network) == 1]


def test_a_run_on_the_cluster_trains_on_the_workers_and_matches_the_local_runner(
    pipeline, tiny_run: Path, loopback_cluster: tuple[str, list[int]], tmp_path: Path
) -> None:
    address, worker_pids = loopback_cluster
    networks = one_thread_networks(tiny_run_settings(tiny_run))[:2]
    if len(networks) < 2:
        pytest.skip("this machine's local plan trains fewer than two networks on one thread")
    seed = TINY_RUN_SEEDS[0]  # two trainings at once, one per one-thread worker; other seeds are the same code path
    settings = tiny_run_settings(
        tiny_run, tmp_path / "outputs", models=networks, seeds=[seed], dask_address=address, export=False
    )
    run = layout.RunFolder(Path(pipeline.full_pipeline(settings)))
    steps = json.loads(run.record.read_text())["steps"]
    for network in networks:
        for step in ("train", "evaluate"):
            worker = steps[layout.step_name(step, network, seed)]["worker"]
            assert worker["pid"] in worker_pids and worker["pid"] != os.getpid(), (step, network, worker)
        on_cluster = json.loads(run.evaluation(network, seed).test_metrics.read_text())
        local = json.loads(layout.RunFolder(tiny_run).evaluation(network, seed).test_metrics.read_text())
        assert on_cluster["accuracy"] == local["accuracy"], network
        assert on_cluster["loss"] == pytest.approx(local["loss"], rel=1e-6), network
    # Both workers took part: Dask spread the two trainings, one on each.
    assert {steps[layout.step_name("train", n, seed)]["worker"]["pid"] for n in networks} == set(worker_pids)


def test_a_scheduler_that_does_not_answer_is_one_line_before_prefect_starts(tiny_data: Path, tmp_path: Path) -> None:
    import distributed  # noqa: F401  (imported before the clock starts: the bound is on connecting, not importing)

    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match="no Dask scheduler answers there within 5 s"):
        cluster.check_cluster_reachable(address)
    # Our 5 s, not distributed's default 30 s connect timeout; the margin is for a loaded CI machine. The whole
    # command's time is not bounded here: its Python start-up is what a loaded machine stretches (25.2 s seen in CI).
    assert time.monotonic() - started < 15, "the README promises this refusal within about 10 s"
    result = subprocess.run(
        [sys.executable, str(FLOW_FILE), "--data-dir", str(tiny_data), "--no-require-official"]
        + ["--output-dir", str(tmp_path), "--dask-address", address],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "no Dask scheduler answers there within 5 s" in lines[0] and "dask scheduler" in lines[0], lines
    assert "Prefect" not in result.stdout + result.stderr and not (tmp_path / "steps").exists()


def test_a_worker_without_the_run_s_folders_or_threads_is_refused_naming_it(
    loopback_cluster: tuple[str, list[int]], tmp_path: Path
) -> None:
    from fmnist_pl.pipeline.cluster import sees_shared_folders, step_runner

    address, _ = loopback_cluster
    with step_runner(address, None) as steps:
        assert steps.worker_threads() == 1
        with pytest.raises(ConfigError, match=r"no Dask worker declares 2 GPU\(s\).*--resources GPU=N"):
            steps.worker_threads(gpus=2)  # a GPU run on a cluster of CPU workers
        steps.check_workers(tmp_path, str(tmp_path))  # on loopback every worker sees the flow's folders
        with pytest.raises(ConfigError, match=r"Dask worker tcp://127\.0\.0\.1:\d+ does not see the data folder /no"):
            steps.check_workers(tmp_path, "/nowhere")
    # What a worker on another host says when the folder is not shared, or its package differs.
    import fmnist_pl

    token, version = tmp_path / ".token", fmnist_pl.__version__
    assert "does not see the output folder" in sees_shared_folders(str(token), "t", str(tmp_path), version)
    token.write_text("t")
    assert sees_shared_folders(str(token), "t", str(tmp_path), version) is None
    assert "install the same version" in sees_shared_folders(str(token), "t", str(tmp_path), "0.0.0")


def test_ctrl_c_stops_the_trainings_on_every_worker(
    prefect_api: str, loopback_cluster: tuple[str, list[int]], tiny_data: Path, tmp_path: Path
) -> None:
    address, _ = loopback_cluster
    worker_pids = wait_for_workers(address, 2)  # a worker killed by an earlier test has a new process
    args = [sys.executable, str(FLOW_FILE), "--data-dir", str(tiny_data), "--no-require-official", "--val-size=100"]
    args += ["--epochs=50", "--accelerator=cpu", "--models", "dense", "cnn", "--output-dir", str(tmp_path)]
    flow = subprocess.Popen(  # the session's Prefect server: stopping a run's own is test_failures'
        [*args, "--dask-address", address],
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def trainings() -> list[psutil.Process]:
        return [c for pid in worker_pids for c in psutil.Process(pid).children(recursive=True) if c.is_running()]

    deadline = time.monotonic() + 120
    while len(trainings()) < 2 and time.monotonic() < deadline and flow.poll() is None:
        time.sleep(0.5)
    assert len(trainings()) == 2, "the two trainings never started on the workers"
    flow.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    while trainings() and time.monotonic() - stopped < 15:
        time.sleep(0.2)
    assert not trainings(), "a training outlived the stop on a worker"
    output, _ = flow.communicate(timeout=60)
    assert flow.returncode == 130, output
    assert "fmnist-pl pipeline stopped" in output


def test_a_step_command_on_a_worker_gets_its_planned_threads_not_dask_s_worker_settings(
    loopback_cluster: tuple[str, list[int]],
) -> None:
    from distributed import Client

    from fmnist_pl.pipeline.processes import THREAD_VARIABLES, step_environment

    def on_worker(threads: int | None) -> tuple[dict, str]:
        environment = step_environment(threads)
        probe = "import torch; print(torch.get_num_threads())"
        torch_threads = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True)
        return {name: environment.get(name) for name in (*THREAD_VARIABLES, "MALLOC_TRIM_THRESHOLD_")}, (
            torch_threads.stdout.strip()
        )

    with Client(loopback_cluster[0], timeout=30) as client:
        caps = client.run(
            lambda: {name: os.environ.get(name) for name in (*THREAD_VARIABLES, "MALLOC_TRIM_THRESHOLD_")}
        )
        # What a step would inherit from its worker: one thread, and memory handed back to the system at once.
        assert all(
            c == {**dict.fromkeys(THREAD_VARIABLES, "1"), "MALLOC_TRIM_THRESHOLD_": "65536"} for c in caps.values()
        )
        # As tasks, where steps run (client.run runs beside them, outside any task).
        workers = list(caps)
        planned = client.gather([client.submit(on_worker, 2, workers=[w], pure=False) for w in workers])
        unplanned = client.gather([client.submit(on_worker, None, workers=[w], pure=False) for w in workers])
    for variables, torch_threads in planned:
        assert variables == {**dict.fromkeys(THREAD_VARIABLES, "2"), "MALLOC_TRIM_THRESHOLD_": None}
        assert torch_threads == "2"
    for variables, torch_threads in unplanned:  # the machine's defaults: torch's own choice of threads
        assert set(variables.values()) == {None} and int(torch_threads) == psutil.cpu_count(logical=False)


def test_a_worker_killed_during_a_training_is_retried_elsewhere_and_resumes_from_its_last_checkpoint(
    pipeline, loopback_cluster: tuple[str, list[int]], tiny_data: Path, tmp_path: Path
) -> None:
    address, _ = loopback_cluster
    epochs, killed = 12, {}
    cluster_run = tiny_settings(
        tiny_data, tmp_path / "cluster", models=["dense"], epochs=epochs, dask_address=address, export=False
    )

    def kill_the_worker_after_two_epochs() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            history = next((tmp_path / "cluster" / "steps").glob("train-dense-seed0-*/history.csv"), None)
            if history and len(pd.read_csv(history)) >= 2:
                for pid in wait_for_workers(address, 2):
                    training = psutil.Process(pid).children(recursive=True)
                    if training:
                        killed.update(pid=pid, training=[p.pid for p in training], epochs=len(pd.read_csv(history)))
                        os.kill(pid, signal.SIGKILL)  # the worker process alone: its nanny starts a new one
                        return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_worker_after_two_epochs)
    killer.start()
    run = layout.RunFolder(Path(pipeline.full_pipeline(cluster_run)))
    killer.join()
    assert killed and killed["epochs"] < epochs, ("the training finished before its worker could be killed", killed)
    assert not any(psutil.pid_exists(pid) for pid in killed["training"])  # the training died with its worker
    train = json.loads(run.record.read_text())["steps"]["train-dense-seed0"]
    assert train["resumed"] is True and train["worker"]["pid"] != killed["pid"]
    history = pd.read_csv(run.training("dense", 0).history)
    assert list(history["epoch"]) == list(range(epochs))  # every finished epoch kept, none trained twice

    # That the resumed result is the uninterrupted one is test_cli's resumed-fit test (the same `fit --ckpt_path`).


def test_a_gpu_run_asks_dask_for_each_training_s_gpus_and_a_cpu_run_for_its_threads(tiny_data: Path) -> None:
    import dask
    import torch

    from fmnist_pl.pipeline.cluster import StepRunner

    class RecordingRunner:  # what DaskTaskRunner.submit would hand Dask: the annotations around the call
        def submit(self, task, parameters):
            return dask.get_annotations()

    gpu_run = tiny_settings(tiny_data, tiny_data, accelerator="gpu", devices="2", dask_address="tcp://gpu-box:8786")
    gpu_run.check_hardware()  # the workers' GPU resources decide, not this machine's GPUs
    if torch.cuda.device_count() < 2:  # the same settings without a cluster: this machine's GPUs decide
        with pytest.raises(ConfigError, match="no usable CUDA GPU|this machine has [01] GPU"):
            gpu_run.model_copy(update={"dask_address": None}).check_hardware()
    steps = StepRunner(RecordingRunner())
    assert gpu_run.gpus_per_training() == 2 and tiny_settings(tiny_data, tiny_data).gpus_per_training() == 0
    assert steps.submit(None, {}, gpus=2, priority=3) == {"resources": {"GPU": 2}, "priority": 3}
    assert steps.submit(None, {}, threads=4, priority=1) == {"resources": {"threads": 4}, "priority": 1}


def test_two_runs_into_one_shared_folder_on_the_cluster_train_a_step_once(
    prefect_api: str, loopback_cluster: tuple[str, list[int]], tiny_data: Path, tmp_path: Path
) -> None:
    """Both runs complete, and the training ran once, the other run reusing it: the step lock, which the local runner
    takes in the same task code (this is its one test)."""
    address, _ = loopback_cluster
    args = [sys.executable, str(FLOW_FILE), "--data-dir", str(tiny_data), "--no-require-official", "--val-size=100"]
    args += ["--epochs=3", "--accelerator=cpu", "--models", "dense", "--no-export", "--output-dir", str(tmp_path)]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    runs = [
        subprocess.Popen([*args, "--dask-address", address], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert not any("Traceback" in text for text in outputs), outputs
    (step,) = (tmp_path / "steps").glob("train-dense-seed0-*")
    assert sum(line.startswith("$ ") for line in (step / "train.log").read_text().splitlines()) == 1
    assert list(pd.read_csv(step / "history.csv")["epoch"]) == [0, 1, 2]
    records = [json.loads(p.read_text()) for p in tmp_path.glob("2*/run.json")]  # run folders, not `latest`
    assert sorted(r["status"] for r in records) == ["completed", "completed"]
    assert sorted(r["steps"]["train-dense-seed0"]["cached"] for r in records) == [False, True]  # one trained


def run_ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def hosts_of_their_own(names: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """A bridge on this machine and a network namespace per name, joined to it by a veth pair: hosts of their own on
    the network (their own addresses and loopback), sharing this machine's files, as an NFS-backed cluster would.
    Yields the bridge's address and, per name, its namespace and address; removes them all afterwards."""
    tag = os.getpid() % 250
    bridge, subnet = f"fmbr{tag}", f"10.213.{tag}"
    namespaces = {name: f"fmnist-{tag}-{name}" for name in names}
    try:
        run_ip("link", "add", bridge, "type", "bridge")
        run_ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        run_ip("link", "set", bridge, "up")
        addresses = {}
        for k, (name, namespace) in enumerate(namespaces.items()):
            addresses[name] = f"{subnet}.{10 + k}"
            run_ip("netns", "add", namespace)
            run_ip("link", "add", f"fmv{tag}{name}", "type", "veth", "peer", "name", "eth0", "netns", namespace)
            run_ip("link", "set", f"fmv{tag}{name}", "master", bridge, "up")
            run_ip("-n", namespace, "addr", "add", f"{addresses[name]}/24", "dev", "eth0")
            run_ip("-n", namespace, "link", "set", "eth0", "up")
            run_ip("-n", namespace, "link", "set", "lo", "up")
        yield f"{subnet}.1", {name: (namespaces[name], addresses[name]) for name in names}
    finally:
        for namespace in namespaces.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # takes its veth end along
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@pytest.fixture(scope="module")
def separate_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, list[int]]]:
    """A scheduler and a Prefect server on this machine's bridge address, and two `dask worker` processes each in a
    network namespace of its own (another host as far as the network goes). Yields the scheduler's address, the
    Prefect API's URL and the workers' PIDs. Root only (namespaces); skipped elsewhere."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    root = tmp_path_factory.mktemp("hosts")
    with contextlib.ExitStack() as stack:
        try:
            host, hosts = stack.enter_context(hosts_of_their_own(["a", "b"]))
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot make network namespaces here: {e.stderr.strip()}")
        log = stack.enter_context(open(root / "cluster.log", "w"))
        scheduler_port, api_port = free_port(), free_port()
        address, api_url = f"tcp://{host}:{scheduler_port}", f"http://{host}:{api_port}/api"
        server_env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        server_env.pop("PREFECT_API_URL", None)
        commands = [
            (
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--no-ui",
                    "--host",
                    host,
                    "--port",
                    str(api_port),
                ],
                server_env,
                root,
            ),
            (dask_command("scheduler", "--host", host, "--port", str(scheduler_port), "--no-dashboard"), None, root),
        ]
        for name in ("a", "b"):
            (root / name).mkdir()
            namespace, worker_host = hosts[name]
            worker = ["worker", address, "--host", worker_host, "--nthreads", "1"]
            worker += ["--resources", "threads=1", "--no-dashboard", "--name", name]
            worker += ["--local-directory", str(root / name)]
            commands.append((["ip", "netns", "exec", namespace, *dask_command(*worker)], None, root / name))
        processes = [
            subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            for command, env, cwd in commands
        ]

        stack.callback(stop_processes, processes)

        worker_pids = wait_for_workers(address, 2)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{api_url}/health", timeout=2).status == 200:
                    break
            assert time.monotonic() < deadline, (root / "cluster.log").read_text()[-2000:]
            time.sleep(0.5)
        yield address, api_url, worker_pids


def test_workers_on_hosts_of_their_own_run_the_steps_report_them_to_prefect_and_match_the_local_runner(
    tiny_run: Path, separate_hosts: tuple[str, str, list[int]], tmp_path: Path
) -> None:
    address, api_url, worker_pids = separate_hosts
    settings = tiny_run_settings(tiny_run)
    networks = one_thread_networks(settings)[:1]  # one training: the loopback test covers two at once
    seeds = TINY_RUN_SEEDS[:1]
    if not networks:
        pytest.skip("this machine's local plan trains no network on one thread")
    args = [sys.executable, str(FLOW_FILE), "--data-dir", settings.data_dir, "--no-require-official"]
    args += [f"--val-size={settings.val_size}", f"--epochs={settings.epochs}", "--accelerator=cpu"]
    args += ["--models", *networks, "--seeds", *map(str, seeds), "--output-dir", str(tmp_path)]
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    # The flow's Prefect API on loopback: workers on other hosts could never report to it; refused before any work.
    refused = subprocess.run([*args, "--dask-address", address], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "cannot reach PREFECT_API_URL" in refused.stderr, refused.stderr
    assert not (tmp_path / "steps").exists()

    result = subprocess.run(
        [*args, "--dask-address", address],
        env={**env, "PREFECT_API_URL": api_url},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = layout.RunFolder((tmp_path / layout.LATEST).resolve())
    record = json.loads(run.record.read_text())
    for network in networks:
        for seed in seeds:
            for step in ("train", "evaluate", "export"):  # the first seed's export: the one seed here
                assert record["steps"][layout.step_name(step, network, seed)]["worker"]["pid"] in worker_pids
            on_cluster = json.loads(run.evaluation(network, seed).test_metrics.read_text())
            local = json.loads(layout.RunFolder(tiny_run).evaluation(network, seed).test_metrics.read_text())
            assert on_cluster["accuracy"] == local["accuracy"], (network, seed)
            assert on_cluster["loss"] == pytest.approx(local["loss"], rel=1e-6), (network, seed)
    # Every step a worker ran is a completed task run of the flow run in Prefect, with the worker in its log.
    import httpx

    flow_runs = httpx.post(f"{api_url}/flow_runs/filter", json={}).json()
    (flow_run,) = [r for r in flow_runs if r["flow_id"]]
    task_runs = httpx.post(f"{api_url}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}}).json()
    states = {r["name"]: r["state"]["type"] for r in task_runs}
    for network in networks:
        for seed in seeds:
            for step in ("train", "evaluate"):
                assert states.get(layout.step_name(step, network, seed)) == "COMPLETED", states
    logs = httpx.post(
        f"{api_url}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}, "limit": 200}
    ).json()
    assert any(f"(process {pid})" in entry["message"] for entry in logs for pid in worker_pids), logs[-5:]
