"""Bad input refused at the boundary, in one line that names the real cause, before anything is built or started:
seeds, output folders, data folders, no data and no network, config files, images to predict on; and the places a
run writes (default_root_dir, the cache, the temporary server's log, a one-network report)."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_args, write_fake_run

from fmnist_pl import fashion_mnist
from fmnist_pl.cli import main
from fmnist_pl.pipeline import command


def cli_error(capsys: pytest.CaptureFixture, *args: str) -> list[str]:
    """Run `fmnist-pl ARGS`, expect exit code 2, return its stderr lines."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def pipeline_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the pipeline's option checks on ARGS, expect exit code 2 with the error and the --help hint; the error."""
    with pytest.raises(SystemExit) as exit_:
        command.parse_args(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 2 and "--help" in err[1], err
    return err[0]


# ---- seeds and output folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_out_of_numpys_range_is_refused_by_the_cli_before_anything_is_built(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, seed: str
) -> None:
    err = cli_error(capsys, "fit", *tiny_args(tiny_data, tmp_path / "out", f"--seed_everything={seed}"))
    assert err == [
        f"fmnist-pl: error: --seed_everything: seed {seed} is out of range: a seed is a whole number "
        "from 0 to 4,294,967,295"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["a file", "under a file", "under /proc"])
def test_an_output_folder_that_cannot_be_one_is_refused_by_the_pipeline_and_the_cli(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder\n")
    folder, cause = {
        "a file": (a_file, f"{a_file} is a file, not a folder"),
        "under a file": (a_file / "runs", f"{a_file / 'runs'} lies under {a_file}, which is a file"),
        "under /proc": (Path("/proc/fmnist-runs"), "/proc/fmnist-runs lies on the kernel's proc file system"),
    }[case]
    error = pipeline_error(capsys, "--data-dir", str(tiny_data), "--no-require-official", "--output-dir", str(folder))
    assert f"--output-dir {cause}" in error
    err = cli_error(
        capsys,
        "fit",
        *tiny_args(tiny_data, tmp_path / "unused"),
        f"--trainer.default_root_dir={folder}",
        "--trainer.logger.init_args.save_dir=outputs",
    )
    assert len(err) == 1 and f"output folder {cause}" in err[0]


# ---- the data: every place looked in, the real cause, the same words from the CLI and the pipeline ----------


def test_no_data_and_no_network_is_one_line_naming_every_place_and_the_pipelines_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, isolated_cache: Path
) -> None:
    nowhere = tmp_path / "no-debian-copy"
    monkeypatch.setattr(fashion_mnist, "KNOWN_LOCAL_COPIES", (nowhere,))
    lookups = []

    def no_dns(host: str, *args: object, **kwargs: object) -> list:
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    started = time.perf_counter()
    error = pipeline_error(capsys, "--output-dir", str(tmp_path / "out"))
    assert time.perf_counter() - started < 10, "the README promises this refusal within seconds"
    download = isolated_cache / "fmnist_pl" / "download" / "FashionMNIST" / "raw"
    assert error == (
        f"full_pipeline.py: error: Fashion-MNIST not found (looked in --data-dir and $FMNIST_DATA_DIR (not set), "
        f"{nowhere}, {download}) and no network to download it (cannot resolve {lookups[0]}: Name or service not "
        "known); pass --data-dir DIR, a folder with the four IDX files, or install Debian's dataset-fashion-mnist "
        "package"
    )
    # The CLI says the same in its own option's words, and the download itself is never attempted.
    err = cli_error(capsys, "fit", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path / 'cli'}")
    assert "Fashion-MNIST not found" in err[-1] and "pass --data.data_dir DIR" in err[-1]
    assert not download.exists()


def test_a_name_resolution_failure_in_the_download_step_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    from fmnist_pl.errors import DataError, DownloadError
    from fmnist_pl.pipeline.tasks import retry_unless_bad_input

    class Failed:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def result(self) -> None:
            raise self.error

    assert retry_unless_bad_input(None, None, Failed(DataError("no network"))) is False
    assert retry_unless_bad_input(None, None, Failed(DownloadError("a mirror is down"))) is True


def break_data_folder(folder: Path, case: str) -> tuple[Path, str]:
    """Damage the tiny data folder as `case` says; return the --data-dir to pass and the cause the error must name."""
    images = folder / "train-images-idx3-ubyte.gz"
    if case == "not a folder":
        return images, f"{images} is a file, not a folder"
    if case == "a folder named like a data file":
        images.unlink()
        images.mkdir()
        return folder, f"{images} is a folder, not a data file"
    if case == "a missing file":
        images.unlink()
        return folder, f"{folder} lacks train-images-idx3-ubyte"
    if case == "a damaged file":
        images.write_bytes(b"not gzip at all")
        return folder, f"{images}: cannot be read (Not a gzipped file"
    if case == "an unreadable file":
        images.chmod(0)
        return folder, f"{images}: cannot be read, permission denied"
    assert case == "an unreadable folder"
    folder.chmod(0)
    return folder, f"{folder}: cannot be read, permission denied"


@pytest.mark.parametrize(
    "case", ["not a folder", "a folder named like a data file", "a missing file", "a damaged file"]
)
def test_each_data_folder_problem_names_its_real_cause_in_the_cli_and_the_pipeline(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    data_dir, cause = break_data_folder(tiny_data, case)
    assert cause in pipeline_error(
        capsys, "--data-dir", str(data_dir), "--no-require-official", "--output-dir", str(tmp_path / "out")
    )
    err = cli_error(capsys, "fit", *tiny_args(data_dir, tmp_path / "cli"))
    assert cause in err[-1] and not any("Traceback" in line for line in err)


UNPRIVILEGED_CHECK = """
import sys
from pathlib import Path
from fmnist_pl import fashion_mnist
from fmnist_pl.cli import main
from fmnist_pl.pipeline import command
data, out = sys.argv[1:]


def as_the_local_copy():  # the folder in the Debian package's place, no --data-dir
    fashion_mnist.KNOWN_LOCAL_COPIES = (Path(data),)
    command.parse_args(["--no-require-official", "--output-dir", out])


for check in (lambda: command.parse_args(["--data-dir", data, "--no-require-official", "--output-dir", out]),
              lambda: main(["validate", f"--data.data_dir={data}", "--data.require_official=false",
                            f"--trainer.default_root_dir={out}", "--trainer.accelerator=cpu"]),
              as_the_local_copy):
    try:
        check()
    except SystemExit as e:
        print("exit", e.code, file=sys.stderr)
"""


@pytest.mark.integration  # a subprocess without the power to read what it may not
@pytest.mark.parametrize("case", ["an unreadable file", "an unreadable folder"])
def test_data_that_cannot_be_read_is_called_permission_denied_by_the_cli_and_the_pipeline(
    tiny_data: Path, tmp_path: Path, case: str
) -> None:
    data_dir, cause = break_data_folder(tiny_data, case)
    command_line = [sys.executable, "-c", UNPRIVILEGED_CHECK, str(data_dir), str(tmp_path / "out")]
    if os.geteuid() == 0:  # root reads everything: drop that power, as an ordinary user has none of it
        if not shutil.which("capsh"):
            pytest.skip("running as root without capsh to drop the power to read any file")
        command_line = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(command_line)]
    try:
        result = subprocess.run(command_line, capture_output=True, text=True, timeout=120)
    finally:
        tiny_data.chmod(0o755)
        (tiny_data / "train-images-idx3-ubyte.gz").chmod(0o644)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.stderr.count("exit 2") == 3 and len(errors) == 3, result.stderr
    assert all(cause in line for line in errors) and "Traceback" not in result.stderr, result.stderr


# ---- config files and images to predict on ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model:\n  network: [cnn\n",
            "is not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'",
        ),
        ("trainer:\n\tmax_epochs: 2\n", "is not valid YAML at line 2, column 1: found character '\\t' that cannot"),
        ("", "is empty; write options into it"),
        ("# only a comment\n", "is empty; write options into it"),
        ("- a\n- list\n", "holds a list, not options"),
    ],
)
def test_a_config_file_that_is_not_options_is_refused_naming_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str, message: str
) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(text)
    err = cli_error(capsys, "fit", f"--config={config}")
    assert len(err) == 1 and err[0].startswith(f"fmnist-pl: error: config {config} {message}"), err
    err = cli_error(capsys, "fit", "--config", "fast_cnn", "--config", str(config))  # after a good one, too
    assert len(err) == 1 and err[0].startswith(f"fmnist-pl: error: config {config} {message}")


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_predict_refuses_a_bad_image_before_building_anything_and_leaves_no_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).save(images / "good.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(images / "bad.png")
    bad = images / "bad.png"
    bad.write_bytes(bad.read_bytes()[:60] if damage == "truncated" else b"")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"never read: the images are checked first")
    err = cli_error(capsys, "predict", f"--ckpt_path={ckpt}", f"--data.predict_path={images}")
    assert len(err) == 1 and err[0].startswith(f"fmnist-pl: error: {bad}: not a readable image")
    assert capsys.readouterr().out == "" and not (tmp_path / "outputs").exists()


# ---- where a run writes ---------------------------------------------------------------------------------------


@pytest.mark.integration  # a real fit and predict
def test_default_root_dir_decides_where_fit_and_predict_write(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    common = [
        f"--data.data_dir={tiny_data}",
        "--data.require_official=false",
        "--data.val_size=100",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]
    main(["fit", "--model.network=cnn", "--trainer.max_epochs=1", *common])
    best = root / "runs" / "version_0" / "checkpoints" / "best.ckpt"
    assert best.is_file()
    main(["predict", f"--ckpt_path={best}", *common])
    assert (root / "runs" / "version_1" / "predictions.csv").is_file()
    assert not (tmp_path / "outputs").exists()


def test_an_unwritable_or_full_cache_folder_warns_once_per_process_and_says_why(
    tiny_data: Path, mount, caplog: pytest.LogCaptureFixture
) -> None:
    full = mount("full-cache", "size=64k")  # room for nothing the size of the decoded data
    read_only = mount("read-only-cache", "ro,size=64k")
    with caplog.at_level("WARNING", logger="fmnist_pl.fashion_mnist"):
        for _ in range(2):  # as prepare_data and setup do, or the pipeline's download and report steps
            fashion_mnist.load_dataset(tiny_data, cache_dir=full, require_official=False)
            fashion_mnist.load_dataset(tiny_data, cache_dir=read_only, require_official=False)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"{full}: cannot write the decoded-data cache there (no space left on the device)")
    assert warnings[1].startswith(f"{read_only}: cannot write the decoded-data cache there (the file system is read")


def test_each_temporary_server_logs_into_a_file_of_its_own_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fmnist_pl.pipeline.prefect_server import server_log_file

    first = server_log_file(tmp_path)
    monkeypatch.setattr(os, "getpid", lambda: 4_194_305)  # another run's process (beyond Linux's PID range)
    second = server_log_file(tmp_path)  # in the same second, into the same output folder
    assert first != second and first.parent == second.parent == tmp_path / ".prefect-server"


def test_a_one_network_report_has_no_empty_comparison_table(tmp_path: Path) -> None:
    from fmnist_pl.report import build_report

    run = write_fake_run(tmp_path, {"cnn": 0.85})
    build_report(run)
    markdown = (run / "report.md").read_text()
    stray = [line for line in markdown.splitlines() if line.strip() in ("|", "|  |", "||")]
    assert not stray and "pair by pair" not in markdown and "McNemar" not in markdown  # with two: test_report.py
    html = (run / "report.html").read_text()
    assert "<thead><tr></tr></thead>" not in html.replace(" ", "").replace("\n", "") and "<th></th>" not in html
