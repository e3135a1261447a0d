"""The Prefect server of a pipeline run: the temporary one it starts when no PREFECT_API_URL is set, owned by the
run, and a watch that ends the run at once when its server (either kind) stops answering.

Prefect starts one by itself too, but as a plain child in the flow's process group: a terminal's Ctrl-C then kills
the server under the flow, which waits on it, and a flow killed with `kill -9` leaves it running for good. This one
runs `prefect server start` (public CLI) in a session of its own, and the kernel sends it SIGTERM when the flow's
process dies, whatever the cause.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import httpx
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from fmnist_pl.pipeline.processes import die_with_parent, stop_children
from fmnist_pl.pipeline.run_record import record_lost


def _die_with_parent(parent: int) -> None:
    """In the server's process, before it runs: ask for SIGTERM when the flow dies."""
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the flow died before the request took effect
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def temporary_server(log_file: Path, timeout: float = 120) -> Iterator[str]:
    """Start a local Prefect server (no UI) and yield its API URL once it answers. It stops when this process
    exits, from an `atexit` hook: Prefect drains its logs and events to the server in hooks that run before those,
    so stopping it at the end of the block would leave them retrying against a stopped server. A process killed
    outright takes it along through the kernel's parent-death signal."""
    port = _free_port()
    parent = os.getpid()
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ}  # analytics race a fresh database
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--no-ui",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "ERROR",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
        )
    url = f"http://127.0.0.1:{port}/api"

    def stop() -> None:
        # logging's own exit hook runs after this one (registered first) and would ship the last run logs to a
        # stopped server: flush them while it still answers.
        logging.shutdown()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    atexit.register(stop)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        if server.poll() is not None or time.monotonic() > deadline:
            stop()
            tail = "".join(log_file.read_text().splitlines(keepends=True)[-3:]).strip()
            raise RuntimeError(f"the temporary Prefect server did not start ({tail}); see {log_file}")
        time.sleep(0.2)
    yield url


@contextlib.contextmanager
def watch_server(api_url: str, on_lost: Callable[[str], None], every: float = 2.0) -> Iterator[None]:
    """While the block runs, check every `every` seconds that the Prefect server at `api_url` accepts connections;
    after two refusals in a row call `on_lost(message)`, which must end the process. Prefect's client would
    otherwise retry each call against the dead server, and the tasks after it too, for minutes."""
    done = threading.Event()

    def watch() -> None:
        refused = 0
        while not done.wait(every):
            try:
                httpx.get(f"{api_url}/health", timeout=10)
                refused = 0
            except httpx.ConnectError as e:
                refused += 1
                if refused == 2 and not done.is_set():
                    on_lost(
                        f"lost the Prefect server at {api_url} ({e}); start it again and rerun the same command: "
                        "finished steps are reused"
                    )
            except httpx.HTTPError:  # slow or busy, not gone
                refused = 0

    thread = threading.Thread(target=watch, name="prefect-server-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def prefect_defaults() -> dict:
    """Settings for Prefect's local server, where the user has not set them."""
    defaults = {
        # Analytics race the temporary server's fresh database and print a `database is locked` traceback.
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        # The default 20 s start-up limit is too short for a busy 2-core laptop.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120,
    }
    return {setting: value for setting, value in defaults.items() if setting.name not in os.environ}


def server_log_file(output_dir: Path) -> Path:
    """The log of this run's temporary server, a file of its own: `<output dir>/.prefect-server/<time>-<PID>.log`
    (two runs started in the same second into one folder never write into one log)."""
    return output_dir / ".prefect-server" / f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"


@contextlib.contextmanager
def prefect_api(output_dir: str, command: str = "pipeline") -> Iterator[None]:
    """The user's Prefect server where PREFECT_API_URL names one, else a temporary one that this run owns; either
    is watched, and a run whose server stops answering ends in one line (`end_on_lost_server`). `command` names
    the run in those lines: `fmnist-pl pipeline: ...`, `fmnist-pl sweep: ...`."""
    lost = functools.partial(end_on_lost_server, command=command)
    with temporary_settings(updates=prefect_defaults()):
        if url := PREFECT_API_URL.value():
            with watch_server(url, lost):
                yield
            return
        log_file = server_log_file(Path(output_dir))
        with (
            temporary_server(log_file) as url,
            temporary_settings(updates={PREFECT_API_URL: url}),
            watch_server(url, lost),
        ):
            print(f"fmnist-pl {command}: temporary Prefect server on {url} (no PREFECT_API_URL set; log: {log_file})")
            yield


def end_on_lost_server(message: str, command: str = "pipeline") -> None:
    """The run's Prefect server is gone: stop the trainings, record the failure, say so in one line and exit now.
    A normal exit would run Prefect's exit handlers, which retry their calls to the dead server for minutes."""
    stop_children()
    record_lost(message)
    print(f"fmnist-pl {command} failed: {message}", file=sys.stderr, flush=True)
    os._exit(1)
