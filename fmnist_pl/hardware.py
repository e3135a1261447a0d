"""What the machine can do fast: whether a run lands on the CPU, and whether that CPU computes bfloat16 natively."""

from __future__ import annotations

import torch


def on_cpu(accelerator: str) -> bool:
    """Whether Lightning's accelerator choice resolves to the CPU on this machine."""
    return accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix work in hardware (AVX-512 BF16 or AMX). Without either, torch emulates
    it: on an AVX2-only AMD EPYC a bf16-mixed training step of bn_cnn took 10 times as long as in fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
