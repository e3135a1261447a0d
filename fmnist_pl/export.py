"""`fmnist-pl export`: a trained checkpoint as an ONNX model that takes raw images, accepted only when ONNX Runtime
agrees with PyTorch on every test image, with model.json and a model card written from the numbers of that check.

    fmnist-pl export --ckpt_path outputs/runs/version_0/checkpoints/best.ckpt    # -> .../version_0/export/
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fmnist_pl import __version__, layout
from fmnist_pl.errors import FmnistError
from fmnist_pl.fashion_mnist import CLASS_NAMES, IMAGE_SIZE, load_dataset
from fmnist_pl.io import check_output_place, file_sha256, write_text_atomic
from fmnist_pl.module import FashionMNISTClassifier
from fmnist_pl.networks import count_trainable_parameters, read_checkpoint
from fmnist_pl.report.statistics import accuracy_interval, most_confused

FORMATS = ("onnx",)
INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
TOLERANCE = 1e-4  # largest difference in any class probability that ONNX Runtime and PyTorch may have (fp32)
OPSET = 18  # torch's dynamo exporter's default, named so that a torch upgrade cannot change the file silently
FASHION_MNIST_LICENSE = "MIT (Zalando Research, https://github.com/zalandoresearch/fashion-mnist)"


class ExportError(FmnistError):
    """The exported model does not compute what the checkpoint computes, or cannot be written."""


class RawImageClassifier(nn.Module):
    """What the exported graph computes: raw pixels (N×28×28, values 0-255) to class probabilities, scaled as in
    training and, with `test_time_flip`, averaged with the mirror image's, as `fmnist-pl test` does."""

    def __init__(self, network: nn.Module, test_time_flip: bool) -> None:
        super().__init__()
        self.network, self.test_time_flip = network, test_time_flip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.float().div(255).unsqueeze(1)  # the data module's scaling: uint8 / 255, one channel
        probabilities = self.network(images).float().softmax(dim=1)
        if self.test_time_flip:
            probabilities = (probabilities + self.network(images.flip(-1)).float().softmax(dim=1)) / 2
        return probabilities


def load_classifier(ckpt_path: Path, test_time_flip: bool | None) -> tuple[RawImageClassifier, dict]:
    """The checkpoint's network (the weights `test` uses: EMA-averaged where the recipe has it, as saved) wrapped
    for raw pixels, in eval mode, and the checkpoint itself."""
    checkpoint = read_checkpoint(ckpt_path)  # checked: one line if damaged or not ours
    module = FashionMNISTClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    flip = checkpoint["hyper_parameters"].get("test_time_flip", False) if test_time_flip is None else test_time_flip
    return RawImageClassifier(module.network, flip).eval(), checkpoint


def write_onnx(model: RawImageClassifier, path: Path) -> None:
    """Export through torch's dynamo exporter (onnxscript), chosen explicitly: torch's default has changed before."""
    example = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE)
    model.eval()  # BatchNorm's running statistics, as `test` uses them
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress; the command says the result
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
            external_data=False,
        )


def onnx_probabilities(path: Path, pixels: np.ndarray, batch_size: int = 1_000) -> np.ndarray:
    """Class probabilities from ONNX Runtime on the CPU, `batch_size` images at a time."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [session.run(None, {INPUT_NAME: pixels[i : i + batch_size]})[0] for i in range(0, len(pixels), batch_size)]
    return np.concatenate(parts)


def torch_probabilities(model: RawImageClassifier, pixels: np.ndarray, batch_size: int = 1_000) -> np.ndarray:
    """Class probabilities from PyTorch eager, fp32, `batch_size` images at a time."""
    with torch.inference_mode():
        parts = [model(torch.from_numpy(pixels[i : i + batch_size])).numpy() for i in range(0, len(pixels), batch_size)]
    return np.concatenate(parts)


def check_parity(expected: np.ndarray, exported: np.ndarray, tolerance: float = TOLERANCE) -> float:
    """The largest probability difference; ExportError unless every image gets the same class and every
    probability is within `tolerance`."""
    largest = float(np.abs(expected - exported).max())
    other_class = int((expected.argmax(axis=1) != exported.argmax(axis=1)).sum())
    if other_class or largest > tolerance:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch: {other_class} of {len(expected):,} test images get another class, "
            f"largest probability difference {largest:.2e} (allowed {tolerance:g}); the export was not written"
        )
    return largest


def export_checkpoint(
    ckpt_path: Path,
    output_dir: Path,
    data_dir: str | None = None,
    require_official: bool = True,
    test_time_flip: bool | None = None,
) -> dict:
    """Write model.onnx, model.json and the model card (README.md) into `output_dir`; returns model.json's fields."""
    check_output_place(output_dir, "--output_dir")
    model, checkpoint = load_classifier(ckpt_path, test_time_flip)
    hyper_parameters = checkpoint["hyper_parameters"]
    tensors = load_dataset(data_dir, require_official=require_official, option="--data.data_dir")
    pixels, labels = tensors.test_images.float().numpy(), tensors.test_labels.numpy()
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as scratch:
        candidate = Path(scratch) / layout.ONNX_MODEL
        try:
            write_onnx(model, candidate)
        except Exception as e:  # the exporter raises many kinds of error for an operation it cannot translate
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise ExportError(
                f"torch could not export the {hyper_parameters['network']!r} network to ONNX "
                f"({type(e).__name__}: {reason}); nothing was written"
            ) from e
        exported = onnx_probabilities(candidate, pixels)
        largest = check_parity(torch_probabilities(model, pixels), exported)
        os.replace(candidate, output_dir / layout.ONNX_MODEL)  # only an export that passed is ever there
    predicted = exported.argmax(axis=1)
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    correct = int(matrix.trace())
    low, high = accuracy_interval(correct, len(labels))
    description = {
        "format": "onnx",
        "opset": OPSET,
        "network": hyper_parameters["network"],
        "network_options": hyper_parameters.get("network_options") or {},
        "trainable_parameters": count_trainable_parameters(model.network),
        "class_names": list(CLASS_NAMES),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", IMAGE_SIZE, IMAGE_SIZE],
            "dtype": "float32",
            "values": "raw pixels 0-255, light garment on a dark background, as Fashion-MNIST's files",
            "normalization": "divided by 255 inside the graph (the network's own centring follows)",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", 10], "meaning": "class probabilities, in class_names order"},
        "test_time_flip": model.test_time_flip,
        "test_accuracy": correct / len(labels),
        "test_accuracy_95": [low, high],
        "test_images": len(labels),
        "parity": {"largest_probability_difference": largest, "tolerance": TOLERANCE, "same_class": len(labels)},
        "checkpoint": {"file": Path(ckpt_path).name, "sha256": file_sha256(Path(ckpt_path))},
        "data_sha256": tensors.sha256,
        "exported_by": f"fmnist-pl {__version__}, torch {torch.__version__}",
    }
    write_text_atomic(output_dir / layout.MODEL_DESCRIPTION, json.dumps(description, indent=2) + "\n")
    training = {
        "hparams": hyper_parameters,
        "epochs": checkpoint.get("epoch", 0) + 1,
        "train_images": len(tensors.train_labels),
        "val_images": (checkpoint.get("datamodule_hyper_parameters") or {}).get("val_size"),
    }
    write_text_atomic(output_dir / layout.MODEL_CARD, model_card(description, matrix, training))
    return description


def model_card(description: dict, matrix: np.ndarray, training: dict) -> str:
    """The model card (README.md beside model.onnx), from the export's own test-set numbers."""
    import jinja2

    from fmnist_pl.report.render import TEMPLATES

    per_class = [
        {"name": name, "accuracy": matrix[i, i] / max(matrix[i].sum(), 1), "images": int(matrix[i].sum())}
        for i, name in enumerate(CLASS_NAMES)
    ]
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True)
    return environment.get_template("model_card.md.j2").render(
        model=description,
        training=training,
        per_class=per_class,
        weakest=min(per_class, key=lambda c: c["accuracy"]),
        confused=most_confused(matrix, top=5).to_dict("records"),
        license=FASHION_MNIST_LICENSE,
    )


def export_main(argv: list[str]) -> None:
    """`fmnist-pl export`: a checkpoint as model.onnx, model.json and a model card, checked against PyTorch."""
    parser = argparse.ArgumentParser(prog="fmnist-pl export", description=export_main.__doc__)
    parser.add_argument("--ckpt_path", type=Path, required=True, help="a checkpoint written by `fmnist-pl fit`")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="the exported format (default onnx)")
    parser.add_argument("--output_dir", type=Path, help="where to write (default: export/ beside checkpoints/)")
    parser.add_argument("--data.data_dir", dest="data_dir", help="Fashion-MNIST for the parity check (as `fit`)")
    parser.add_argument(
        "--data.require_official",
        dest="require_official",
        type=parse_bool,
        default=True,
        help="check the files against the official release (false: your own or test data)",
    )
    parser.add_argument(
        "--model.test_time_flip",
        dest="test_time_flip",
        type=parse_bool,
        default=None,
        help="build flip test-time augmentation into the graph (default: as the checkpoint)",
    )
    args = parser.parse_args(argv)
    output_dir = args.output_dir or args.ckpt_path.resolve().parent.parent / layout.EXPORT_DIR
    if not args.ckpt_path.is_file():
        raise ExportError(f"checkpoint {args.ckpt_path} does not exist; pass a .ckpt file written by `fmnist-pl fit`")
    model = export_checkpoint(args.ckpt_path, output_dir, args.data_dir, args.require_official, args.test_time_flip)
    print(
        f"exported {model['network']} to {output_dir / layout.ONNX_MODEL}: test accuracy {model['test_accuracy']:.2%}, "
        f"ONNX Runtime within {model['parity']['largest_probability_difference']:.1e} of PyTorch on "
        f"{model['test_images']:,} test images; card: {output_dir / layout.MODEL_CARD}"
    )


def parse_bool(text: str) -> bool:
    """true/false, as the Lightning CLI spells booleans."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"
