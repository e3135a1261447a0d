"""Run folders and their records: `outputs/<run id>/` with its `run.json` (settings, each step's result, status
and, on failure, which step and why), `outputs/latest`, and earlier runs whose process died."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from datetime import datetime
from pathlib import Path

import psutil

from fmnist_pl import layout
from fmnist_pl.io import write_record_on_failure, write_text_atomic
from fmnist_pl.pipeline.processes import current_run


@dataclasses.dataclass(frozen=True)
class DataRecord:
    """The download step's result: the verified data's folder, and its files' and decoded tensors' checksums (a
    step's cache key names the data it was trained on by them)."""

    source_dir: str
    sha256: dict[str, str]
    wall_seconds: float


@dataclasses.dataclass(frozen=True)
class StepResult:
    """A finished training, evaluation or export step: what its task returns, its done.json and its entry in
    run.json. `dir` is where the step folder is now; an evaluation or export names its training by folder name."""

    network: str
    seed: int
    dir: str
    wall_seconds: float
    worker: dict | None = None  # the host and PID of the process that ran it (none in records before 0.6)
    resumed: bool = False
    train_dir: str | None = None
    cached: bool = False

    @classmethod
    def from_record(cls, record: dict, **fields: object) -> StepResult:
        """A done.json's result, with `fields` (where the folder is now, whether reused) set."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in record.items() if k in known}, **fields})


class RunRecord:
    """A run's `run.json`, kept in memory and rewritten whole on every change; the only writer of that file."""

    def __init__(self, run: layout.RunFolder, **fields: object) -> None:
        self.file = run.record
        self.fields = {
            "run_dir": str(run.path),
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            **fields,
            "steps": {},
            "started": datetime.now().isoformat(),
        }
        self._write()

    @property
    def running(self) -> bool:
        return self.fields["status"] == "running"

    def step_done(self, step: str, result: StepResult | DataRecord | dict) -> None:
        """A step finished with `result`."""
        self.fields["steps"][step] = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
        self._write()

    def end(self, status: str, error: BaseException | str | None = None, step: str | None = None) -> None:
        """The run ended: completed, or failed / stopped (with the error, and the step it came from)."""
        self.fields["status"] = status
        if step is not None:
            self.fields["failed_step"] = step
        if error is not None:
            self.fields["error"] = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if status == "completed":
            self.fields["finished"] = datetime.now().isoformat()
        self._write()

    def _write(self) -> None:
        write_record(self.file, self.fields)


def write_record(file: Path, fields: dict) -> None:
    """Write a run.json: atomically, and a failed or stopped run's even on a full disk."""
    text = json.dumps(fields, indent=2) + "\n"
    if fields.get("status") in ("running", "completed"):
        write_text_atomic(file, text)
    else:
        write_record_on_failure(file, text)


def record_lost(message: str) -> None:
    """Mark the running flow's record failed with `message`, from outside the flow (its server is gone)."""
    record = current_run().record
    if record is not None and record.running:
        record.end("failed", message)


def new_run_dir(output_dir: Path) -> Path:
    """A fresh outputs/<run id>/, never an earlier run's."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        run_dir = output_dir / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder in {output_dir}")


def point_latest_at(run_dir: Path) -> None:
    """`outputs/latest` -> this run: called once the run has completed, so `latest` is always a whole run."""
    latest = run_dir.parent / f".latest.{os.getpid()}"
    latest.unlink(missing_ok=True)
    latest.symlink_to(run_dir.name)
    os.replace(latest, run_dir.parent / layout.LATEST)  # atomic: never a moment without a `latest`


def mark_dead_runs(output_dir: Path, by: Path) -> list[Path]:
    """Earlier runs on this machine whose record still says running but whose process is gone (killed, or the
    machine went down) are marked "killed", so that run.json tells the truth. Returns them."""
    dead = []
    for record_file in output_dir.glob(f"*/{layout.RunFolder(Path()).record.name}"):
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        if (
            record.get("status") == "running"
            and record.get("host") == socket.gethostname()
            and isinstance(record.get("pid"), int)
            and not psutil.pid_exists(record["pid"])
        ):
            record.update(status="killed", ended=f"found without its process (PID {record['pid']}) by {by.name}")
            write_record(record_file, record)
            dead.append(record_file.parent)
    return dead


def link(link_path: Path, target: Path) -> None:
    """A relative symbolic link, so that outputs/ can be moved or archived whole and its links still resolve."""
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(os.path.relpath(target, link_path.parent))
