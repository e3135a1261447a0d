"""The report's statistics: per-class scores, the most confused pairs, spreads over seeds, and the paired tests
that decide whether one network is really more accurate than another."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd

from fmnist_pl.fashion_mnist import CLASS_NAMES


def confusion_from_predictions(predictions: pd.DataFrame) -> np.ndarray:
    """10×10 counts, rows true class, columns predicted."""
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (predictions["label"].to_numpy(), predictions["predicted"].to_numpy()), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> pd.DataFrame:
    """Precision, recall and F1 per class from a confusion matrix."""
    true_positive = np.diag(matrix).astype(float)
    precision = np.divide(true_positive, matrix.sum(axis=0), out=np.zeros(10), where=matrix.sum(axis=0) > 0)
    recall = np.divide(true_positive, matrix.sum(axis=1), out=np.zeros(10), where=matrix.sum(axis=1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(10), where=(precision + recall) > 0)
    return pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "images": matrix.sum(axis=1)},
        index=pd.Index(CLASS_NAMES, name="class"),
    ).round(4)


def most_confused(matrix: np.ndarray, top: int = 5) -> pd.DataFrame:
    """The largest off-diagonal cells: which true class is taken for which."""
    off = [(matrix[i, j], CLASS_NAMES[i], CLASS_NAMES[j]) for i in range(10) for j in range(10) if i != j]
    rows = sorted(off, reverse=True)[:top]
    return pd.DataFrame(
        [
            {
                "true": t,
                "predicted as": p,
                "images": int(n),
                "share of true class": f"{n / matrix[CLASS_NAMES.index(t)].sum():.1%}",
            }
            for n, t, p in rows
        ]
    )


def mcnemar_p_value(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar test: the chance of a split at least this uneven of the images that exactly one of
    two classifiers got right, if both were equally accurate (a fair coin decides each such image)."""
    n, k = only_first + only_second, min(only_first, only_second)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def paired_comparison(
    first: np.ndarray, second: np.ndarray, seeds: list[int], level: float = 0.05, resamples: int = 2000
) -> dict:
    """Compare two networks on the same test images: `first`, `second` are (seeds × images) booleans, True where the
    image was classified correctly. McNemar's exact test per seed, and a bootstrap confidence interval (test images
    resampled, pairs kept) of the accuracy difference averaged over seeds. The difference counts as significant only
    when the interval excludes zero and every seed's McNemar test is significant in the same direction."""
    difference = (first.astype(np.int8) - second.astype(np.int8)).mean(axis=0)  # per image, averaged over seeds
    rng = np.random.default_rng(0)  # the same interval every time the report is rebuilt
    n = difference.size
    means = np.concatenate(
        [difference[rng.integers(0, n, size=(100, n))].mean(axis=1) for _ in range(resamples // 100)]
    )
    low, high = np.quantile(means, [level / 2, 1 - level / 2])
    per_seed = []
    for seed, a, b in zip(seeds, first, second, strict=True):
        only_first, only_second = int((a & ~b).sum()), int((~a & b).sum())
        per_seed.append(
            {
                "seed": seed,
                "only_first_correct": only_first,
                "only_second_correct": only_second,
                "p_value": mcnemar_p_value(only_first, only_second),
            }
        )
    signs = {np.sign(s["only_first_correct"] - s["only_second_correct"]) for s in per_seed}
    significant = bool(
        (low > 0 or high < 0) and all(s["p_value"] < level for s in per_seed) and len(signs) == 1 and 0 not in signs
    )
    return {
        "difference": float(difference.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "confidence": 1 - level,
        "mcnemar": per_seed,
        "significant": significant,
    }


def describe_spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value), min and max."""
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "min": float(min(values)),
        "max": float(max(values)),
    }


def accuracy_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's 95 % score interval for an accuracy of `correct` out of `total` images (z: the normal quantile)."""
    share = correct / total
    centre = (share + z**2 / (2 * total)) / (1 + z**2 / total)
    half = z * math.sqrt(share * (1 - share) / total + z**2 / (4 * total**2)) / (1 + z**2 / total)
    return centre - half, centre + half
