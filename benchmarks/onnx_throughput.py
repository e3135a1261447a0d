"""Inference throughput of an exported model: ONNX Runtime against PyTorch eager, same weights, same threads.

    python benchmarks/onnx_throughput.py --ckpt_path outputs/latest/bn_cnn/seed-0/train/checkpoints/best.ckpt

Exports the checkpoint as `fmnist-pl export` does (its graph: raw pixels in, probabilities out, flip TTA as the
checkpoint's recipe), then times both on the real test images, in alternating rounds so that machine drift hits
both alike: batch 1 (one request at a time, `--single` images) and batch 1024 (the whole test set). Prints images
per second, the best of `--rounds`, and ONNX Runtime / PyTorch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from fmnist_pl.export import INPUT_NAME, load_classifier, write_onnx
from fmnist_pl.fashion_mnist import load_dataset


def images_per_second(run_batch: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, batch_size: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        run_batch(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--single", type=int, default=2_000, help="images timed one at a time")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, checkpoint = load_classifier(args.ckpt_path, test_time_flip=None)
    pixels = load_dataset().test_images.float().numpy()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    with tempfile.TemporaryDirectory() as scratch:
        write_onnx(model, Path(scratch) / "model.onnx")
        session = onnxruntime.InferenceSession(str(Path(scratch) / "model.onnx"), options, ["CPUExecutionProvider"])

    def onnx_batch(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: batch})[0]

    def torch_batch(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    network = checkpoint["hyper_parameters"]["network"]
    print(
        f"{network}, flip TTA {model.test_time_flip}, {args.threads} threads, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}"
    )
    print("| batch | images | PyTorch eager img/s | ONNX Runtime img/s | ONNX Runtime / PyTorch |")
    print("|---:|---:|---:|---:|---:|")
    for batch_size, images in ((1, pixels[: args.single]), (1024, pixels)):
        onnx_batch(images[:batch_size]), torch_batch(images[:batch_size])  # warm-up
        best = {"torch": 0.0, "onnx": 0.0}
        for _ in range(args.rounds):
            best["torch"] = max(best["torch"], images_per_second(torch_batch, images, batch_size))
            best["onnx"] = max(best["onnx"], images_per_second(onnx_batch, images, batch_size))
        print(
            f"| {batch_size} | {len(images):,} | {best['torch']:,.0f} | {best['onnx']:,.0f} | "
            f"{best['onnx'] / best['torch']:.2f} |"
        )


if __name__ == "__main__":
    main()
