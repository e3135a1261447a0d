"""A bounded load test of `fmnist-pl serve` on loopback: N requests, C at a time, each a real test image as PNG.

    python benchmarks/serve_load.py --model outputs/latest/export/bn_cnn/model.onnx [--requests 1000] [--concurrency 8]

Starts the service on a free loopback port, waits for /health, sends the requests from C threads (one keep-alive
connection each), and checks that every request got an answer and that it is its own image's class (ONNX Runtime
run directly on the same pixels). Prints throughput and p50/p99 latency; stops the service. Exits 1 on any wrong
or missing answer. Everything is bounded: 10 s per request, `--deadline` seconds for the whole test.
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from fmnist_pl.export import onnx_probabilities
from fmnist_pl.fashion_mnist import CLASS_NAMES, load_dataset


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_until_healthy(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the service exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    sys.exit(f"the service did not answer /health within {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=300, help="seconds the whole load may take")
    args = parser.parse_args()

    images = load_dataset().test_images[: args.requests].numpy()
    bodies = [png(image) for image in images]
    expected = [CLASS_NAMES[i] for i in onnx_probabilities(args.model, images.astype(np.float32)).argmax(axis=1)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fmnist_pl",
            "serve",
            f"--model={args.model}",
            f"--port={port}",
            f"--max_batch_size={args.max_batch_size}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_healthy(url, server)
        deadline = time.monotonic() + args.deadline
        clients = [httpx.Client(base_url=url, timeout=10) for _ in range(args.concurrency)]

        def send(index: int) -> tuple[int, float, str | None]:
            if time.monotonic() > deadline:
                return index, 0.0, None
            started = time.perf_counter()
            try:
                answer = clients[index % args.concurrency].post("/predict", content=bodies[index])
                got = answer.json()["class"] if answer.status_code == 200 else f"HTTP {answer.status_code}"
            except httpx.HTTPError as e:
                got = f"no answer ({type(e).__name__})"
            return index, time.perf_counter() - started, got

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(send, range(args.requests)))
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    wrong = [(i, got) for i, _, got in results if got != expected[i]]
    latencies = np.array([seconds for i, seconds, got in results if got == expected[i]] or [np.nan]) * 1000
    print(
        f"{args.requests:,} requests, {args.concurrency} at a time, max batch {args.max_batch_size}: "
        f"{len(results) - len(wrong):,} answered with their own image's class, {len(wrong)} wrong or missing"
    )
    print(
        f"throughput {len(results) / wall:,.0f} requests/s over {wall:.1f} s; latency p50 "
        f"{np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms"
    )
    if wrong:
        print(f"first wrong: request {wrong[0][0]} got {wrong[0][1]!r}, expected {expected[wrong[0][0]]!r}")
        sys.exit(1)


if __name__ == "__main__":
    main()
