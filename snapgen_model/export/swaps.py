"""Export-friendly module swaps, applied to a deep copy so the trained model is never touched.

Wrapping models from outside (STYLE.md 8): `snapgen_model.nn` stays written for training, and the
exporters get equivalent modules that trace to plain ops:

- `nn.RMSNorm` (QK-norm) becomes `x * rsqrt(mean(x^2) + eps) * w`: the TorchScript ONNX exporter
  has no `aten::rms_norm` symbolic at opset 18.
- `Attention` (MQA, SnapGen section 1) becomes `ExportAttention` in one of three modes:
  * "original": the model's own forward (SDPA, K/V repeated with `repeat_interleave`);
  * "matmul": softmax(q k^T / sqrt(d)) v with the shared K/V head *broadcast* over the query heads
    (no repeat, no Tile nodes);
  * "split_einsum": the Neural-Engine-friendly layout of apple/ml-stable-diffusion (SPLIT_EINSUM):
    tokens as (B, C, 1, S), one einsum pair per head, softmax over the key axis (dim 1).
  All three compute the same function; `tests/unit/test_export_coreml.py` checks it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from snapgen_model.nn.attention import Attention, apply_rope


class ExplicitRMSNorm(nn.Module):
    """RMSNorm over the last dim, written with elementary ops (same weight, same eps)."""

    def __init__(self, norm: nn.RMSNorm) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        out = x * scale
        return out * self.weight if self.weight is not None else out


class ExportAttention(nn.Module):
    """`Attention` with the same weights and an export-friendly attention kernel (see module doc)."""

    def __init__(self, attn: Attention, mode: str) -> None:
        super().__init__()
        if mode not in ("original", "matmul", "split_einsum"):
            raise ValueError(f"attention mode {mode!r}: choose original, matmul or split_einsum")
        self.mode = mode
        self.inner = attn
        self.heads, self.kv_heads, self.head_dim = attn.heads, attn.kv_heads, attn.head_dim
        self.scale = attn.head_dim ** -0.5

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.mode == "original":
            return self.inner(x, context, rope)
        a = self.inner
        b, n, c = x.shape
        context = x if context is None else context
        m = context.shape[1]
        q = a.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        kv = a.to_kv(context).view(b, m, 2, self.kv_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, KV, M, D) each
        q, k = a.norm_q(q), a.norm_k(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.mode == "matmul":
            out = self._matmul(q, k, v)
        else:
            out = self._split_einsum(q, k, v)
        return a.to_out(out)  # (B, N, C)

    def _matmul(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Grouped heads: query head h uses K/V head h // (H / KV), as `repeat_interleave` does."""
        b, h, n, d = q.shape
        g = h // self.kv_heads
        q = q.reshape(b, self.kv_heads, g, n, d)  # (B, KV, G, N, D)
        k, v = k.unsqueeze(2), v.unsqueeze(2)  # (B, KV, 1, M, D): broadcast over G
        weights = torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)  # (B, KV, G, N, M)
        out = (weights @ v).reshape(b, h, n, d)  # (B, H, N, D)
        return out.transpose(1, 2).reshape(b, n, h * d)  # (B, N, C)

    def _split_einsum(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """apple/ml-stable-diffusion SPLIT_EINSUM: per head, (B, D, 1, N) queries against (B, M, 1, D) keys."""
        b, h, n, d = q.shape
        g = h // self.kv_heads
        q = q.permute(0, 1, 3, 2).unsqueeze(3)  # (B, H, D, 1, N)
        k = k.unsqueeze(3)  # (B, KV, M, 1, D)
        v = v.permute(0, 1, 3, 2).unsqueeze(3)  # (B, KV, D, 1, M)
        heads = []
        for i in range(h):
            qi, ki, vi = q[:, i], k[:, i // g], v[:, i // g]  # (B, D, 1, N), (B, M, 1, D), (B, D, 1, M)
            w = torch.einsum("bchq,bkhc->bkhq", qi, ki) * self.scale  # (B, M, 1, N)
            w = torch.softmax(w, dim=1)
            heads.append(torch.einsum("bkhq,bchk->bchq", w, vi))  # (B, D, 1, N)
        out = torch.cat(heads, dim=1)  # (B, C, 1, N)
        return out.squeeze(2).transpose(1, 2)  # (B, N, C)


def _swap_children(module: nn.Module, attention: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.RMSNorm):
            setattr(module, name, ExplicitRMSNorm(child))
        elif isinstance(child, Attention):
            _swap_children(child, attention)
            setattr(module, name, ExportAttention(child, attention))
        else:
            _swap_children(child, attention)


def export_friendly_copy(model: nn.Module, attention: str = "matmul") -> nn.Module:
    """A deep copy of `model` in eval mode with RMSNorm and attention swapped (see module doc)."""
    clone = copy.deepcopy(model).eval()
    _swap_children(clone, attention)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def count_swaps(model: nn.Module) -> dict[str, int]:
    """How many modules of each export kind a swapped model holds (for the report)."""
    counts = {"ExportAttention": 0, "ExplicitRMSNorm": 0}
    for module in model.modules():
        name = type(module).__name__
        if name in counts:
            counts[name] += 1
    return counts
