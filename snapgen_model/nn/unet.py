"""SnapGenUNet: the efficient SDXL-style UNet of SnapGen (SNAPGEN_SPEC.md section 1).

Three stages with channels [256, 512, 896]; transformer depth [1, 2, 4] (SDXL's [0, 2, 10] cut to
[0, 2, 4], then a cross-attention + FFN block injected at stage 1); self-attention only at the
lowest resolution and in the mid-block; expanded separable residual convs; FFN ratio 3; multi-query
attention; QK RMSNorm and 2-D RoPE. Each choice is a `UNetConfig` switch so the paper's ablation
chain can be rebuilt. Parameter counts for every preset are printed by `snapgen inspect`; the
`snapgen-1024` / `snapgen-in1k-256` figures against the paper's 379M / 372M are explained in
docs/architecture.md.

Initialisation (edm2 / DiT style): the output conv and the last layer of every residual branch (the
second conv of each residual block, the out-projections of attention and FFN, and each spatial
transformer's output projection) start at zero, so every residual branch starts as the identity and
the fresh UNet predicts v = 0; the first optimiser step makes them non-zero and gradients reach
every layer from then on.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snapgen_model.configs import UNetConfig
from snapgen_model.nn.attention import SpatialTransformer, timestep_embedding
from snapgen_model.nn.blocks import Downsample, ResBlock, Upsample, group_norm


class NoTransformer(nn.Module):
    """The place of a spatial transformer in a stage without one: features pass, the context is unused."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return x


class UNetStage(nn.Module):
    """One resolution stage: `n` (residual block [+ spatial transformer]) pairs. A down stage pushes each
    pair's output onto the skip stack; an up stage (`up=True`) concatenates a popped skip onto each
    pair's input."""

    def __init__(self, c_ins: list[int], c_out: int, cfg: UNetConfig, depth: int, self_attn: bool, *,
                 up: bool = False) -> None:
        super().__init__()
        res: dict[str, Any] = dict(time_dim=cfg.time_embed_dim, separable=cfg.separable_conv,
                                   expansion=cfg.conv_expansion, norm_groups=cfg.norm_groups,
                                   scale_shift=cfg.time_scale_shift, dropout=cfg.dropout)
        self.up = up
        self.res = nn.ModuleList(ResBlock(c, c_out, **res) for c in c_ins)
        self.attn = nn.ModuleList(
            make_transformer(c_out, depth, self_attn, cfg) if depth > 0 else NoTransformer() for _ in c_ins
        )

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None,
                skips: list[torch.Tensor]) -> torch.Tensor:
        """h (B, C, H, W) -> (B, c_out, H, W); `skips` is pushed (down) or popped (up) in place."""
        for res, attn in zip(self.res, self.attn):
            h = res(torch.cat([h, skips.pop()], dim=1) if self.up else h, temb)
            h = attn(h, context)
            if not self.up:
                skips.append(h)
        return h


def make_transformer(dim: int, depth: int, self_attn: bool, cfg: UNetConfig) -> SpatialTransformer:
    return SpatialTransformer(
        dim, depth, norm_groups=cfg.norm_groups, rope=cfg.rope, checkpointing=cfg.checkpointing,
        context_dim=cfg.context_dim, self_attention=self_attn, head_dim=cfg.head_dim,
        kv_heads=cfg.kv_heads, qk_norm=cfg.qk_norm, ffn_ratio=cfg.ffn_ratio,
        ffn_gated=cfg.ffn_gated, dropout=cfg.dropout,
    )


def zero_init_modules(model: nn.Module) -> list[nn.Module]:
    """The layers `SnapGenUNet` zero-initialises: each residual branch's last layer, and `conv_out`."""
    from snapgen_model.nn.attention import Attention, FeedForward
    from snapgen_model.nn.blocks import ResBlock

    out: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, ResBlock):
            out.append(m.conv2[-1] if isinstance(m.conv2, nn.Sequential) else m.conv2)  # separable: the pointwise conv
        elif isinstance(m, Attention):
            out.append(m.to_out)
        elif isinstance(m, FeedForward):
            out.append(m.proj_out)
        elif isinstance(m, SpatialTransformer):
            out.append(m.proj_out)
    conv_out = getattr(model, "conv_out", None)
    return out + ([conv_out] if conv_out is not None else [])


class SnapGenUNet(nn.Module):
    """Velocity-predicting UNet v(x_t, t, condition) for flow matching."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        ch = cfg.channels
        self.time_mlp = nn.Sequential(
            nn.Linear(ch[0], cfg.time_embed_dim), nn.SiLU(), nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)
        )
        if cfg.conditioning == "text":
            self.pooled_mlp = nn.Sequential(
                nn.Linear(cfg.pooled_dim, cfg.time_embed_dim), nn.SiLU(),
                nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim))
        else:  # class-conditional: label -> one context token and a time-embedding offset
            self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.context_dim)  # last = null label
            self.class_mlp = nn.Linear(cfg.context_dim, cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down, self.downsample, skip_ch = self._build_down(cfg)
        self.mid_res1 = ResBlock(ch[-1], ch[-1], **self._res_kwargs())
        self.mid_attn = (make_transformer(ch[-1], cfg.mid_transformer_depth, True, cfg)
                         if cfg.mid_transformer_depth > 0 else NoTransformer())
        self.mid_res2 = ResBlock(ch[-1], ch[-1], **self._res_kwargs())
        self.up, self.upsample = self._build_up(cfg, skip_ch)
        self.norm_out = group_norm(ch[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The UNet's whole initialisation, in one place (DiT's `initialize_weights`): every convolution and
        linear layer keeps PyTorch's default (Kaiming-uniform weights, uniform biases in +-1/sqrt(fan_in)),
        norms start at the identity (weight 1, bias 0), then the output conv and every residual branch's last
        layer (`zero_init_modules`) are zeroed, the UNet's counterpart of DiT's adaLN-Zero (module docstring)."""
        for m in zero_init_modules(self):
            for p in m.parameters(recurse=False):
                p.zero_()

    def _res_kwargs(self) -> dict:
        c = self.config
        return dict(time_dim=c.time_embed_dim, separable=c.separable_conv, expansion=c.conv_expansion,
                    norm_groups=c.norm_groups, scale_shift=c.time_scale_shift, dropout=c.dropout)

    def _build_down(self, cfg: UNetConfig) -> tuple[nn.ModuleList, nn.ModuleList, list[int]]:
        ch, skips = cfg.channels, [cfg.channels[0]]
        stages, downs, c_prev = nn.ModuleList(), nn.ModuleList(), ch[0]
        for i, c in enumerate(ch):
            c_ins = [c_prev] + [c] * (cfg.down_blocks - 1)
            stages.append(UNetStage(c_ins, c, cfg, cfg.transformer_depth[i], cfg.self_attention[i]))
            skips += [c] * cfg.down_blocks
            c_prev = c
            if i < len(ch) - 1:
                downs.append(Downsample(c, c))
                skips.append(c)
        return stages, downs, skips

    def _build_up(self, cfg: UNetConfig, skips: list[int]) -> tuple[nn.ModuleList, nn.ModuleList]:
        ch, skips = cfg.channels, list(skips)
        stages, ups, c_prev = nn.ModuleList(), nn.ModuleList(), ch[-1]
        for i in reversed(range(len(ch))):
            c_ins = []
            for _ in range(cfg.up_blocks):
                c_ins.append(c_prev + skips.pop())
                c_prev = ch[i]
            stages.append(UNetStage(c_ins, ch[i], cfg, cfg.transformer_depth[i], cfg.self_attention[i], up=True))
            if i > 0:
                ups.append(Upsample(ch[i], ch[i]))
        if skips:
            raise ValueError(f"unet.up_blocks: must be down_blocks + 1 to consume every skip ({len(skips)} left)")
        return stages, ups

    def condition(self, t: torch.Tensor, context: torch.Tensor | None, pooled: torch.Tensor | None,
                  labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Time embedding (B, T) with the pooled/class vector added, and the context tokens (B, L, Cc)."""
        temb = self.time_mlp(timestep_embedding(t, self.config.channels[0]))
        if self.config.conditioning == "text":
            if context is None or pooled is None:
                raise ValueError("text-conditioned UNet needs `context` (B, L, context_dim) and `pooled` (B, pooled_dim)")
            return temb + self.pooled_mlp(pooled), context
        if labels is None:
            raise ValueError("class-conditioned UNet needs `labels` (B,) with num_classes as the null label")
        emb = self.class_embed(labels)  # (B, Cc)
        return temb + self.class_mlp(emb), emb[:, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_features: bool = False):
        """x (B, C, H, W) noisy latent, t (B,) in [0, 1]; returns v (B, C, H, W) [and named features]."""
        temb, ctx = self.condition(t, context, pooled, labels)
        h = self.conv_in(x)  # (B, C0, H, W)
        skips, feats = [h], {}
        for i, stage in enumerate(self.down):
            h = feats[f"down{i}"] = stage(h, temb, ctx, skips)
            if i < len(self.downsample):
                h = self.downsample[i](h)  # (B, Ci, H/2, W/2)
                skips.append(h)
        h = self.mid_attn(self.mid_res1(h, temb), ctx)
        h = feats["mid"] = self.mid_res2(h, temb)
        for j, stage in enumerate(self.up):
            h = stage(h, temb, ctx, skips)
            feats[f"up{len(self.up) - 1 - j}"] = h  # named by stage index (0 = highest resolution)
            if j < len(self.upsample):
                h = self.upsample[j](h)  # (B, C, 2H, 2W)
        v = self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)
        return (v, feats) if return_features else v

    def feature_channels(self) -> dict[str, int]:
        """Channels of each named feature returned with `return_features=True`."""
        ch = self.config.channels
        names = {f"down{i}": c for i, c in enumerate(ch)} | {f"up{i}": c for i, c in enumerate(ch)}
        return names | {"mid": ch[-1]}
