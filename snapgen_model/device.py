"""Which accelerator this machine offers (for warnings before a run, not for placing tensors)."""
from __future__ import annotations


def has_gpu() -> bool:
    """True when torch sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())
