"""Per-stage architecture report of a preset: parameters, MACs at the preset's resolution, attention.

Counted on the meta device (no memory, no weights), so the full 1024^2 model is inspected on a
laptop. MACs are torch's FlopCounterMode FLOPs / 2 (matmuls, convolutions incl. depthwise, SDPA).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from snapgen_model.configs import SnapGenConfig, UNetConfig
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.nn.unet import SnapGenUNet

# the paper's figures, printed beside ours (SNAPGEN_SPEC.md sections 1, 2)
PAPER_PARAMS = {"snapgen-1024": 379e6, "snapgen-in1k-256": 372e6}
PAPER_DECODER_PARAMS = 1.38e6


@dataclasses.dataclass
class StageRow:
    stage: str  # embed, down0.., mid, up.., out, decoder
    resolution: str  # latent grid side at this stage, e.g. "128x128"
    channels: int
    params: int
    macs: int
    attention: str  # e.g. "self+cross+FFN x4 (x2 modules)"


@dataclasses.dataclass
class InspectReport:
    preset: str
    image_size: int
    latent: str
    rows: list[StageRow]
    unet_params: int
    unet_macs: int
    decoder_params: int
    decoder_macs: int
    paper_params: float | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def example_inputs(cfg: SnapGenConfig, batch: int = 1, text_tokens: int = 77,
                   device: str | torch.device = "meta") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x, t, cond) of the right shapes for the preset's UNet."""
    u, n = cfg.unet, cfg.latent_size
    x = torch.randn(batch, u.in_channels, n, n, device=device)
    t = torch.rand(batch, device=device)
    if u.conditioning == "text":
        cond = dict(context=torch.randn(batch, text_tokens, u.context_dim, device=device),
                    pooled=torch.randn(batch, u.pooled_dim, device=device))
    else:
        cond = dict(labels=torch.zeros(batch, dtype=torch.long, device=device))
    return x, t, cond


def _stage_of(name: str, n_stages: int) -> str:
    """Map a top-level module path of SnapGenUNet to its report stage."""
    parts = name.split(".")
    head = parts[0]
    if head in ("down", "downsample"):
        return f"down{parts[1]}"
    if head == "up":
        return f"up{n_stages - 1 - int(parts[1])}"
    if head == "upsample":
        return f"up{n_stages - 1 - int(parts[1])}"
    if head.startswith("mid"):
        return "mid"
    if head in ("norm_out", "conv_out"):
        return "out"
    return "embed"


def _attention_label(u: UNetConfig, depth: int, self_attn: bool, modules: int) -> str:
    if depth == 0:
        return "none"
    kind = "self+cross+FFN" if self_attn else "cross+FFN"
    attn = "MQA" if u.kv_heads == 1 else ("MHA" if u.kv_heads == 0 else f"GQA{u.kv_heads}")
    return f"{kind} x{depth}, {attn}, {modules} mods"


def _macs_by_stage(model: nn.Module, args: tuple, kwargs: dict, n_stages: int) -> dict[str, int]:
    """MACs per report stage: a forward hook pair on each disjoint stage item reads the counter's delta."""
    totals: dict[str, int] = {}
    handles = []
    with FlopCounterMode(display=False) as counter:
        for name, module in model.named_modules():
            depth = {"down": 4, "up": 4, "downsample": 2, "upsample": 2}.get(name.split(".")[0], 1)
            if not name or name.count(".") + 1 != depth:
                continue
            stage = _stage_of(name, n_stages)
            start: list[int] = []
            handles.append(module.register_forward_pre_hook(
                lambda m, a, start=start: start.append(counter.get_total_flops())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, stage=stage, start=start: totals.__setitem__(
                    stage, totals.get(stage, 0) + (counter.get_total_flops() - start.pop()) // 2)))
        try:
            model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
    return totals


def inspect_config(cfg: SnapGenConfig) -> InspectReport:
    """Build the per-stage table for a preset (meta device: nothing is allocated)."""
    u, n_st = cfg.unet, len(cfg.unet.channels)
    with torch.device("meta"):
        unet, decoder = SnapGenUNet(u), TinyDecoder(cfg.decoder)
        x, t, cond = example_inputs(cfg)
        macs = _macs_by_stage(unet, (x, t), cond, n_st)
        with FlopCounterMode(display=False) as dc:
            decoder(torch.randn(1, cfg.latent.channels, cfg.latent_size, cfg.latent_size))
    params: dict[str, int] = {}
    for name, p in unet.named_parameters():
        stage = _stage_of(name, n_st)
        params[stage] = params.get(stage, 0) + p.numel()
    rows = _rows(cfg, params, macs)
    dec_params = sum(p.numel() for p in decoder.parameters())
    rows.append(StageRow("decoder", f"{cfg.latent_size}->{cfg.image_size}", cfg.decoder.channels[0],
                         dec_params, dc.get_total_flops() // 2, "none"))
    return InspectReport(
        preset=cfg.name, image_size=cfg.image_size,
        latent=f"{cfg.latent_size}x{cfg.latent_size}x{cfg.latent.channels} (f={cfg.latent.downsample})",
        rows=rows, unet_params=sum(params.values()), unet_macs=sum(macs.values()),
        decoder_params=dec_params, decoder_macs=dc.get_total_flops() // 2,
        paper_params=PAPER_PARAMS.get(cfg.name),
    )


def _rows(cfg: SnapGenConfig, params: dict[str, int], macs: dict[str, int]) -> list[StageRow]:
    u, side = cfg.unet, cfg.latent_size
    res = lambda i: f"{side >> i}x{side >> i}"  # noqa: E731
    rows = [StageRow("embed", res(0), u.channels[0], params.get("embed", 0), macs.get("embed", 0), "none")]
    for i, c in enumerate(u.channels):
        label = _attention_label(u, u.transformer_depth[i], u.self_attention[i], u.down_blocks)
        rows.append(StageRow(f"down{i}", res(i), c, params[f"down{i}"], macs.get(f"down{i}", 0), label))
    last = len(u.channels) - 1
    rows.append(StageRow("mid", res(last), u.channels[-1], params["mid"], macs.get("mid", 0),
                         _attention_label(u, u.mid_transformer_depth, True, 1)))
    for i in reversed(range(len(u.channels))):
        label = _attention_label(u, u.transformer_depth[i], u.self_attention[i], u.up_blocks)
        rows.append(StageRow(f"up{i}", res(i), u.channels[i], params[f"up{i}"], macs.get(f"up{i}", 0), label))
    rows.append(StageRow("out", res(0), u.channels[0], params.get("out", 0), macs.get("out", 0), "none"))
    return rows


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, *args, **kwargs) -> int:
    """MACs of one forward call (FlopCounterMode FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops() // 2
