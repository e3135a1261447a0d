"""Images to classify with `predict`: an IDX images file, one 28×28 PNG/JPEG or a folder of them, each checked
(readable, 28×28 from its header, decodable) before anything is built."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from fmnist_pl.errors import DataError
from fmnist_pl.fashion_mnist import IMAGE_SIZE, read_idx

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def load_predict_images(path: str | Path) -> tuple[torch.Tensor, list[str] | None]:
    """Images to classify: an IDX images file (.gz or not), one 28×28 grayscale PNG/JPEG file or a folder of them;
    with the image files' names (None for an IDX file, whose images are known by their index)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
        return torch.from_numpy(read_idx(path, "images").copy()), None
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no .png or .jpg images to predict on")
    else:
        raise DataError(f"{path}: no such file or folder to predict on")
    return torch.from_numpy(np.stack([read_image(file) for file in files])), [file.name for file in files]


def read_image(file: Path | BinaryIO, name: str | None = None) -> np.ndarray:
    """One 28×28 image (a file, or its bytes as a binary stream called `name` in errors) as grayscale uint8; its
    size is checked from the header, before any pixel is decoded, so a huge image (a decompression bomb) costs
    nothing and warns nothing."""
    from PIL import Image

    name = name or str(file)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        raise DataError(f"{name}: image has {size}, far too many; the networks take 28×28") from e
    except Image.UnidentifiedImageError as e:  # its message names a Python object, not the problem
        raise DataError(f"{name}: not a readable image (neither PNG nor JPEG)") from e
    except OSError as e:
        raise DataError(f"{name}: not a readable image ({e})") from e
    with image:
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{name}: image is {image.size[0]}×{image.size[1]}, the networks take 28×28")
        try:
            return np.asarray(image.convert("L"), dtype=np.uint8)
        except OSError as e:  # a header that promises more pixels than the file holds
            raise DataError(f"{name}: not a readable image ({e})") from e
