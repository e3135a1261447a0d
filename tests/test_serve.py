"""`fmnist-pl serve`: an exported model behind LitServe, driven through LitServe's test client."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

from fmnist_pl.cli import main
from fmnist_pl.export import RawImageClassifier, onnx_probabilities, write_onnx
from fmnist_pl.fashion_mnist import CLASS_NAMES
from fmnist_pl.networks import NETWORKS
from fmnist_pl.pipeline.processes import descendants

litserve = pytest.importorskip("litserve", reason="the serve extra: pip install -e '.[serve]' (CI installs it)")


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX model as export writes it (an untrained dense net: serving does not care what it learned)."""
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve") / "model.onnx"
    write_onnx(RawImageClassifier(NETWORKS["dense"](), test_time_flip=False), path)
    return path


@pytest.fixture(scope="module")
def client(model: Path):
    """LitServe's test client over `fmnist-pl serve`'s server, its worker ready."""
    from fastapi.testclient import TestClient
    from litserve.utils import wrap_litserve_start

    from fmnist_pl.serve import build_server

    with wrap_litserve_start(build_server(model, max_batch_size=8, batch_timeout=0.05)) as server:
        with TestClient(server.app) as test_client:
            deadline = time.monotonic() + 60
            while test_client.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "the inference worker did not start within 60 s"
                time.sleep(0.2)
            yield test_client


IMAGES = np.random.default_rng(0).integers(0, 256, (24, 28, 28))


def expected_classes(model: Path) -> list[str]:
    return [CLASS_NAMES[i] for i in onnx_probabilities(model, IMAGES.astype(np.float32)).argmax(axis=1)]


@pytest.mark.integration
def test_a_png_in_the_body_or_a_form_gets_its_class_and_every_probability(client, model: Path) -> None:
    assert client.get("/health").text == "ok"
    expected = expected_classes(model)
    answer = client.post("/predict", content=png(IMAGES[0]), headers={"content-type": "image/png"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["class"] == expected[0] and CLASS_NAMES[body["index"]] == body["class"]
    assert list(body["probabilities"]) == list(CLASS_NAMES) and sum(body["probabilities"].values()) == pytest.approx(1)
    assert max(body["probabilities"], key=body["probabilities"].get) == body["class"]
    form = client.post("/predict", files={"image": ("shirt.png", png(IMAGES[1]), "image/png")})
    assert form.status_code == 200 and form.json()["class"] == expected[1]


@pytest.mark.integration
def test_bad_requests_get_a_4xx_with_one_line_and_never_spoil_a_batch(client, model: Path) -> None:
    bad = {
        "not an image": (b"hello", 400, "not a readable image"),
        "wrong size": (png(np.zeros((30, 28))), 400, "image is 28×30, the networks take 28×28"),
        "50 MB": (b"\0" * (50 << 20), 413, "request body is 52,428,800 bytes"),
        "empty": (b"", 400, "the request has no body"),
    }
    for name, (content, status, reason) in bad.items():
        answer = client.post("/predict", content=content)
        assert answer.status_code == status, name
        detail = answer.json()["detail"]
        assert reason in detail and "\n" not in detail, name
    two_files = client.post("/predict", files={"a": ("a.png", png(IMAGES[0])), "b": ("b.png", png(IMAGES[1]))})
    assert two_files.status_code == 400 and "holds 2 files" in two_files.json()["detail"]

    # Good and bad requests at once, 8 at a time: batches form, and each good request gets its own image's answer.
    expected = expected_classes(model)
    requests = [(i, png(IMAGES[i])) for i in range(len(IMAGES))] + [(None, b"not a png")] * 8

    def send(request: tuple[int | None, bytes]) -> tuple[int | None, int, dict]:
        index, content = request
        answer = client.post("/predict", content=content)
        return index, answer.status_code, answer.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, requests))
    for index, status, body in answers:
        if index is None:
            assert status == 400
        else:
            assert (status, body["class"]) == (200, expected[index])


def test_serve_without_the_extra_says_how_to_add_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from fmnist_pl import serve

    monkeypatch.setattr(serve, "ls", None)
    with pytest.raises(SystemExit) as stopped:
        main(["serve", f"--model={tmp_path / 'model.onnx'}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs LitServe, which is not installed" in err[0] and "[serve]" in err[0]


@pytest.mark.parametrize("content", [None, b"not onnx"])
def test_a_missing_or_foreign_model_file_is_one_line(
    content: bytes | None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit):
        main(["serve", f"--model={path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fmnist-pl: error: --model {path}: ")


def alive(pid: int) -> bool:
    """A process that runs (not a zombie waiting for its parent to read its exit code)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl here")
def test_the_command_serves_a_png_to_curl_and_stops_whole_on_kill(model: Path, tmp_path: Path) -> None:
    port = free_port()
    image = tmp_path / "shirt.png"
    image.write_bytes(png(IMAGES[2]))
    server = subprocess.Popen(
        [sys.executable, "-m", "fmnist_pl", "serve", f"--model={model}", f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while subprocess.run(["curl", "-sf", f"{url}/health"], capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "`fmnist-pl serve` did not get ready"
            time.sleep(0.5)
        expected = expected_classes(model)[2]
        for how in (["--data-binary", f"@{image}"], ["-F", f"image=@{image}"]):
            answer = subprocess.run(["curl", "-sf", *how, f"{url}/predict"], capture_output=True, text=True)
            assert answer.returncode == 0 and json.loads(answer.stdout)["class"] == expected
        started = descendants(server.pid)  # LitServe's HTTP and inference processes
        assert started
    finally:
        server.terminate()
        server.wait(timeout=30)
    deadline = time.monotonic() + 15
    while (left := [pid for pid in started if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], "`kill` left LitServe's processes running"


@pytest.mark.integration
def test_the_api_answers_a_batch_and_a_lone_image_alike(model: Path) -> None:
    from fmnist_pl.serve import FashionMNISTAPI

    api = FashionMNISTAPI(str(model))
    api.setup("cpu")
    pixels = IMAGES[:3].astype(np.float32)
    batched = api.unbatch(api.predict(api.batch([api.decode_request({"pixels": p.tolist()}) for p in pixels])))
    alone = [api.predict(api.decode_request({"pixels": p.tolist()})) for p in pixels]  # --max_batch_size 1
    assert [api.encode_response(p)["class"] for p in batched] == [api.encode_response(p)["class"] for p in alone]
    assert np.allclose(np.stack(batched), np.stack(alone), atol=1e-6)
