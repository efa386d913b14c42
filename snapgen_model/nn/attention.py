"""Attention and transformer blocks of the SnapGen UNet (SNAPGEN_SPEC.md section 1).

- Multi-query attention: one shared K/V head for all query heads ("MQA", params -16%, latency -9%).
- Optional QK RMSNorm and 2-D RoPE (switches, default on; [U] in the spec).
- A transformer block is self-attention (optional per stage) + cross-attention + FFN (ratio 3,
  GEGLU); stages without self-attention keep cross-attention + FFN only (SnapGen, section 1).
- `attention(q, k, v)` is softmax(q k^T / sqrt(d)) v through the fastest kernel for the tensors at
  hand. On CPU under bf16/fp16 autocast, PyTorch's fused kernels are slow for short sequences
  (backward of a 4-head, 80-token flash attention at batch 256: 113 ms in bf16 against 17 ms for
  the explicit form, bench/RESULTS.md "Teacher step on CPU"), so there the product of the score
  matrix is written out, with the softmax in float32. Same maths, another kernel.
  `ExplicitJointAttnProcessor` routes the joint attention of a diffusers `SD3Transformer2DModel`
  through it (`use_fast_attention`).
"""
from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def rope_2d(height: int, width: int, head_dim: int, device: torch.device | None = None,
            theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (N, head_dim/2) for a row-major H x W grid: half the pairs rotate with y, half with x."""
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
    xs = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
    angles = torch.cat([ys[:, None] * freqs, xs[:, None] * freqs], dim=-1)  # (N, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, H, N, D) by the angles in cos/sin (N, D/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, N, D/2)
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, N, D/2, 2)
    return rotated.flatten(-2)  # (B, H, N, D)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v written out, with the softmax in float32; q (B, H, N, D), k/v (B, H, M, D)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, H, N, M)
    weights = scores.float().softmax(dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v)  # (B, H, N, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v: the explicit form for half-precision tensors on CPU (PyTorch's fused
    CPU kernels are several times slower there), `F.scaled_dot_product_attention` everywhere else."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return explicit_attention(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


class ExplicitJointAttnProcessor:
    """SD3's joint attention (image tokens and caption tokens attend together; diffusers'
    `JointAttnProcessor2_0` semantics) computed through `attention`, so half-precision CPU training
    avoids the slow fused kernels. Install with `use_fast_attention(transformer)`."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> Any:
        if attention_mask is not None:
            raise ValueError("ExplicitJointAttnProcessor: SD3's joint attention takes no attention mask")
        b, n = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, H*D) -> (B, H, L, D)
            return x.view(b, x.shape[1], attn.heads, -1).transpose(1, 2)

        def normed(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
            return x if norm is None else norm(x)

        q = normed(attn.norm_q, heads(attn.to_q(hidden_states)))
        k = normed(attn.norm_k, heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:  # caption tokens join the sequence after the image tokens
            q = torch.cat([q, normed(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states)))], dim=2)
            k = torch.cat([k, normed(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states)))], dim=2)
            v = torch.cat([v, heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        q, k = q.to(v.dtype), k.to(v.dtype)  # a QK norm with fp32 weights returns fp32 under autocast
        out = attention(q, k, v).transpose(1, 2).flatten(2)  # (B, N + M, H*D)
        image, caption = out[:, :n], out[:, n:]
        image = attn.to_out[1](attn.to_out[0](image))  # projection, dropout
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            caption = attn.to_add_out(caption)
        return image, caption


def use_fast_attention(transformer: nn.Module) -> nn.Module:
    """Route every attention of a diffusers SD3Transformer2DModel through `ExplicitJointAttnProcessor`
    (identical outputs up to float rounding; faster for half precision on CPU). Returns the model."""
    transformer.set_attn_processor(ExplicitJointAttnProcessor())
    return transformer


class Attention(nn.Module):
    """Self- or cross-attention with `kv_heads` shared K/V heads (1 = MQA, 0 = one per query head)."""

    def __init__(self, dim: int, *, context_dim: int | None = None, head_dim: int = 64,
                 kv_heads: int = 1, qk_norm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = dim // head_dim
        self.kv_heads = self.heads if kv_heads == 0 else kv_heads
        if self.heads % self.kv_heads:
            raise ValueError(f"unet.kv_heads: {self.kv_heads} does not divide {self.heads} query heads")
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * self.kv_heads * head_dim, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.to_out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        context = x if context is None else context
        m = context.shape[1]
        q = self.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        kv = self.to_kv(context).view(b, m, 2, self.kv_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, KV, M, D) each
        if not isinstance(self.norm_q, nn.Identity):  # QK norm in fp32 (a no-op cast unless autocast made q/k bf16)
            q, k = self.norm_q(q.float()).to(q.dtype), self.norm_k(k.float()).to(k.dtype)
        if rope is not None:  # fp32 tables; under autocast q/k stay in their half precision
            q, k = apply_rope(q, *rope).to(q.dtype), apply_rope(k, *rope).to(k.dtype)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)  # (B, H, M, D)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        p = self.dropout if self.training else 0.0
        out = attention(q, k, v, dropout_p=p)  # (B, H, N, D)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class FeedForward(nn.Module):
    """FFN with expansion `ratio` (SnapGen: 3 instead of 4, section 1), GEGLU-gated by default."""

    def __init__(self, dim: int, ratio: int = 3, gated: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = dim * ratio
        self.gated = gated
        self.proj_in = nn.Linear(dim, hidden * (2 if gated else 1))
        self.proj_out = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)  # (B, N, hidden or 2*hidden)
        if self.gated:
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.proj_out(self.drop(h))


class TransformerBlock(nn.Module):
    """[self-attention] -> cross-attention -> FFN, each pre-norm with a residual."""

    def __init__(self, dim: int, *, context_dim: int, self_attention: bool, head_dim: int,
                 kv_heads: int, qk_norm: bool, ffn_ratio: int, ffn_gated: bool, dropout: float) -> None:
        super().__init__()
        attn: dict[str, Any] = dict(head_dim=head_dim, kv_heads=kv_heads, qk_norm=qk_norm, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim) if self_attention else None
        self.attn1 = Attention(dim, **attn) if self_attention else None
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim=context_dim, **attn)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ffn_ratio, ffn_gated, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if self.attn1 is not None:
            x = x + self.attn1(cast(nn.Module, self.norm1)(x), rope=rope)  # (B, N, C); norm1 is set with attn1
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> linear in -> `depth` transformer blocks over H*W tokens -> linear out, residual."""

    def __init__(self, dim: int, depth: int, *, norm_groups: int, rope: bool, checkpointing: bool,
                 **block_kwargs) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, **block_kwargs) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)
        self.use_rope = rope and block_kwargs["self_attention"]
        self.head_dim = block_kwargs["head_dim"]
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        rope = rope_2d(h, w, self.head_dim, x.device) if self.use_rope else None
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, H*W, C)
        for block in self.blocks:
            if self.checkpointing and self.training:
                tokens = checkpoint(block, tokens, context, rope, use_reentrant=False)
            else:
                tokens = block(tokens, context, rope)
        out = self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + out


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of t in [0, 1], scaled by 1000 as in diffusion UNets."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))
