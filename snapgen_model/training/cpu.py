"""CPU training set-up that changes speed, never results.

`tune_allocator()` keeps glibc malloc from returning memory to the kernel between training steps.
By default glibc serves large blocks with fresh `mmap` pages and trims the heap top after frees, so
the next step's activations must be zeroed and faulted in by the kernel again. Kept, the toy
teacher's step at batch 256 went from 1.906 s to 1.318 s (bench/RESULTS.md "Teacher step on CPU").
The settings are the ones PyTorch's CPU performance guide reaches with
jemalloc/tcmalloc, applied to the allocator already loaded:

* M_MMAP_THRESHOLD = 32 MiB (the glibc maximum on 64-bit): tensors below it come from the heap;
* M_TRIM_THRESHOLD = "never": freed heap memory stays with the process for the next step;
* M_TOP_PAD = 64 MiB: the heap grows in large steps.

The process keeps its peak heap (at toy scale, a few hundred MiB). On a C library without `mallopt`
(musl, macOS) nothing changes and the function says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD_BYTES = 32 << 20
TOP_PAD_BYTES = 64 << 20

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Apply the settings once per process; True when glibc accepted all three (idempotent)."""
    global _tuned
    if _tuned is not None:
        return _tuned
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: keep the platform's allocator as it is
        _tuned = False
        return _tuned
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, TOP_PAD_BYTES)))
    return _tuned


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles); elsewhere PyTorch emulates it,
    slower than fp32."""
    import torch

    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(probe()) for probe in probes if probe is not None)
