"""Reusing finished steps: a record names no absolute path, so a moved or copied output folder uses its own files;
a finished step whose files are gone or changed runs again, never reused on trust."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_of_tiny_run, tiny_run_settings

from fmnist_pl.pipeline import step_cache
from fmnist_pl.pipeline.run_record import StepResult


def finished_step(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A step folder with a checkpoint and a history, recorded as finished."""
    work = tmp_path / "steps" / "train-cnn-seed0-key"
    (work / "checkpoints").mkdir(parents=True)
    checkpoint, history = work / "checkpoints" / "best.ckpt", work / "history.csv"
    import torch

    torch.save({"weights": torch.zeros(3)}, checkpoint)  # a zip archive, as Lightning's checkpoints are
    history.write_text("epoch\n0\n")
    step_cache.mark_finished(work, StepResult("cnn", 0, str(work), 1.0), [checkpoint, history])
    return work, [checkpoint, history]


def test_a_step_record_names_no_absolute_path_and_is_found_where_the_folder_is_now(tmp_path: Path) -> None:
    work, outputs = finished_step(tmp_path)
    record = (work / "done.json").read_text()
    assert str(tmp_path) not in record
    moved = tmp_path / "moved" / work.name
    shutil.move(work.parent, moved.parent)
    reused = step_cache.reuse_finished(moved, "cnn training", [moved / p.relative_to(work) for p in outputs])
    assert reused.dir == str(moved) and reused.cached is True


@pytest.mark.parametrize("damage", ["deleted", "cut short", "replaced", "damaged record"])
def test_a_finished_step_whose_files_are_gone_or_changed_is_not_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    work, (checkpoint, history) = finished_step(tmp_path)
    last = work / "checkpoints" / "last.ckpt"
    last.write_bytes(checkpoint.read_bytes())
    why = {
        "deleted": "checkpoints/best.ckpt is missing",
        "cut short": "checkpoints/best.ckpt is not a whole checkpoint",
        "replaced": "history.csv is 12 bytes, the record says 8",
        "damaged record": "its done.json is damaged",
    }[damage]
    if damage == "deleted":
        checkpoint.unlink()
    elif damage == "cut short":  # the same size, the archive's end record gone
        checkpoint.write_bytes(checkpoint.read_bytes()[:-30] + bytes(30))
    elif damage == "replaced":
        history.write_text("epoch\n0\n1\n2\n")
    else:
        (work / "done.json").write_text('{"network": "cnn", "wall_sec')
    with caplog.at_level("WARNING", logger="fmnist_pl.pipeline"):
        assert step_cache.reuse_finished(work, "cnn seed 0 training", [checkpoint, history]) is None
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"not reusing finished cnn seed 0 training in {work}: {why}; it runs again" in warning
    assert not (work / "done.json").exists() and len(list(work.glob("done.json.stale-*"))) == 1
    assert not list(work.rglob("*.ckpt"))  # a fresh start: a finished last.ckpt would resume into nothing


def test_a_record_of_the_previous_version_is_reused_while_its_files_are_there(tmp_path: Path) -> None:
    """0.4.0 kept absolute paths and no sizes: its finished trainings are still reused, from where they are now."""
    work, outputs = finished_step(tmp_path)
    record = json.loads((work / "done.json").read_text())
    del record["outputs"]
    (work / "done.json").write_text(json.dumps({**record, "dir": "/where/it/was/before"}))
    assert step_cache.reuse_finished(work, "cnn training", outputs).dir == str(work)
    outputs[0].write_bytes(b"PK\x03\x04 cut short")
    assert step_cache.reuse_finished(work, "cnn training", outputs) is None


def evaluation_command(step: Path) -> str:
    (line,) = [line for line in (step / "evaluate.log").read_text().splitlines() if line.startswith("$ ")]
    return line


@pytest.mark.integration
def test_a_moved_or_copied_output_folder_uses_its_own_files(pipeline, tiny_run: Path, tmp_path: Path) -> None:
    original = copy_of_tiny_run(tiny_run, tmp_path / "outputs")  # a real run's outputs, at a path of this test's
    shutil.copytree(original, tmp_path / "copy", symlinks=True)  # cp -a
    shutil.move(original, tmp_path / "moved")  # and the original's path is gone: nothing may read it
    for folder in (tmp_path / "copy", tmp_path / "moved"):
        (evaluation,) = folder.glob("steps/evaluate-cnn-seed0-*")
        shutil.rmtree(evaluation)
        run = Path(pipeline.full_pipeline(tiny_run_settings(tiny_run, folder, models=["cnn"], seeds=[0])))
        record = json.loads((run / "run.json").read_text())
        assert record["status"] == "completed" and record["steps"]["train-cnn-seed0"]["cached"] is True
        assert record["steps"]["evaluate-cnn-seed0"]["cached"] is False
        (evaluation,) = folder.glob("steps/evaluate-cnn-seed0-*")
        assert f"--ckpt_path={folder}/steps/train-cnn-seed0-" in evaluation_command(evaluation)
        metrics = json.loads((evaluation / "test_metrics.json").read_text())
        assert metrics["checkpoint"].startswith(f"{folder}/steps/")
        for done in folder.glob("steps/*/done.json"):
            assert str(original) not in done.read_text()


@pytest.mark.integration
def test_a_finished_training_whose_checkpoint_is_gone_trains_again(pipeline, tiny_run: Path, tmp_path: Path) -> None:
    out = copy_of_tiny_run(tiny_run, tmp_path / "outputs")
    settings = tiny_run_settings(tiny_run, out, models=["cnn"], seeds=[0], export=False)
    training = (out / tiny_run.name / "cnn" / "seed-0" / "train").resolve()
    (training / "checkpoints" / "best.ckpt").unlink()
    again = Path(pipeline.full_pipeline(settings))
    record = json.loads((again / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"]["train-cnn-seed0"]["cached"] is False
    assert (training / "checkpoints" / "best.ckpt").is_file() and len(list(training.glob("done.json.stale-*"))) == 1
    commands = [line for line in (training / "train.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--ckpt_path" not in commands[1]  # afresh, not a resume of the finished fit
