"""What the machine can do fast: whether a run lands on the CPU, whether that CPU computes bfloat16 natively, and
how the C library hands out memory."""

from __future__ import annotations

import ctypes
import sys

import torch

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def on_cpu(accelerator: str) -> bool:
    """Whether Lightning's accelerator choice resolves to the CPU on this machine."""
    return accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix work in hardware (AVX-512 BF16 or AMX). Without either, torch emulates
    it: on an AVX2-only AMD EPYC a bf16-mixed training step of bn_cnn took 10 times as long as in fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def keep_freed_memory() -> None:
    """Let this process reuse the memory it frees instead of giving it back to the kernel (glibc on Linux; elsewhere
    nothing changes). glibc maps every block over 32 MB afresh and unmaps it when freed, and a 1,000-image batch of
    bn_cnn's activations is such a block: its evaluation took 3.7 million page faults, 7.1 s of system time and
    15.8 s in all, against 0.22 million, 0.6 s and 11.1 s from the heap (2-core Xeon with AMX; training: the
    same speed, 11 % more peak memory). An entry point calls it: it changes the whole process."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): its own allocator, left as it is
        return
    mallopt(M_MMAP_MAX, 0)  # large blocks from the heap too, where freed memory is reused
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and keep the freed top of the heap for the next batch
