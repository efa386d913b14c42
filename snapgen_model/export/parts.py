"""The exported parts: UNet, tiny decoder, on-device text encoder, each behind a positional-tensor
signature (what ONNX and Core ML graphs take), with seeded example inputs.

| part          | inputs                                        | outputs                             |
|---------------|-----------------------------------------------|-------------------------------------|
| unet (text)   | x (B,16,h,w), t (B,), context (B,L,C), pooled | v (B,16,h,w)                        |
| unet (class)  | x, t, labels (B,) int64                       | v                                   |
| decoder       | latent (B,16,h,w)                             | image (B,3,H,W) in [-1, 1]          |
| text_encoder  | input_ids (B,L) int64                         | text_embeds (B,P), last_hidden_state |
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
from torch import nn

from snapgen_model.configs import SnapGenConfig
from snapgen_model.export.swaps import export_friendly_copy
from snapgen_model.inspect import count_macs, count_params


class UNetGraph(nn.Module):
    """A text-conditioned SnapGenUNet with positional inputs (x, t, context, pooled)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context=context, pooled=pooled)  # (B, C, h, w)


class ClassUNetGraph(nn.Module):
    """A class-conditional SnapGenUNet with positional inputs (x, t, labels)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, labels=labels)  # (B, C, h, w)


class TextEncoderGraph(nn.Module):
    """A transformers CLIPTextModelWithProjection as input_ids -> (text_embeds, last_hidden_state)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids=input_ids, return_dict=True)
        return out.text_embeds, out.last_hidden_state  # (B, P), (B, L, H)


InputFn = Callable[[int, int], tuple[torch.Tensor, ...]]


@dataclasses.dataclass
class ExportPart:
    """One part to export: the reference module (eval, original numerics) and its signature."""

    name: str  # "unet", "decoder" or "text_encoder"
    module: nn.Module  # positional-tensor wrapper around the trained module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    make_inputs: InputFn  # (batch, seed) -> seeded example inputs
    resolution: str  # what the static shapes mean, e.g. "latent 8x8x16 -> 32px"
    attention_swappable: bool = True  # SnapGen modules take the attention swaps; transformers models do not

    def inputs(self, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        return self.make_inputs(batch, seed)

    def graph_module(self, attention: str) -> nn.Module:
        """The module that gets traced: an export-friendly copy (module swaps) of `module`."""
        if not self.attention_swappable:
            return export_friendly_copy(self.module, "original")
        return export_friendly_copy(self.module, attention)

    @torch.no_grad()
    def reference(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """PyTorch eager outputs of the original module (the parity reference)."""
        out = self.module(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def params(self) -> int:
        return count_params(self.module)

    @torch.no_grad()
    def macs(self, batch: int = 1) -> int:
        """MACs of one forward at the export resolution, counted on the meta device when the module
        allows it (nothing computed, so the full model at 1024^2 costs nothing), else on the CPU."""
        try:
            meta = copy.deepcopy(self.module).to("meta")
            return count_macs(meta, *(x.to("meta") for x in self.inputs(batch, 0)))
        except Exception:  # noqa: BLE001 - some third-party modules do not run on meta tensors
            return count_macs(self.module, *self.inputs(batch, 0))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def unet_part(unet: nn.Module, cfg: SnapGenConfig, text_tokens: int) -> ExportPart:
    """The UNet at the preset's latent resolution (static h = w = cfg.latent_size)."""
    u, side = unet.config, cfg.latent_size
    text = u.conditioning == "text"
    graph = (UNetGraph(unet) if text else ClassUNetGraph(unet)).eval()

    def make(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = _gen(seed)
        x = torch.randn(batch, u.in_channels, side, side, generator=g)
        t = torch.rand(batch, generator=g)
        if text:
            return (x, t, torch.randn(batch, text_tokens, u.context_dim, generator=g),
                    torch.randn(batch, u.pooled_dim, generator=g))
        return x, t, torch.randint(0, u.num_classes + 1, (batch,), generator=g)

    names = ("x", "t", "context", "pooled") if text else ("x", "t", "labels")
    return ExportPart("unet", graph, names, ("v",), make,
                      f"latent {side}x{side}x{u.in_channels} ({cfg.image_size}px)")


def decoder_part(decoder: nn.Module, cfg: SnapGenConfig) -> ExportPart:
    """The tiny decoder at the preset's latent resolution."""
    side, ch = cfg.latent_size, decoder.config.latent_channels

    def make(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, ch, side, side, generator=_gen(seed)),)

    return ExportPart("decoder", decoder.eval(), ("latent",), ("image",), make,
                      f"latent {side}x{side}x{ch} -> {cfg.image_size}px")


def text_encoder_part(encoder: nn.Module, text_tokens: int) -> ExportPart:
    """A CLIPTextModelWithProjection (any size) with `text_tokens` input ids, padded with EOS as CLIP is."""
    config = encoder.config
    vocab, eos = int(config.vocab_size), int(getattr(config, "eos_token_id", 2) or 2)
    tokens = min(text_tokens, int(config.max_position_embeddings))
    pad = eos if eos < vocab else vocab - 1  # a tiny test vocabulary may not hold CLIP's EOS id
    graph = TextEncoderGraph(encoder.eval()).eval()

    def make(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = _gen(seed)
        ids = torch.randint(0, max(vocab - 2, 1), (batch, tokens), generator=g)
        ids[ids == eos] = 0
        lengths = torch.randint(1, tokens, (batch,), generator=g)
        for row, length in enumerate(lengths.tolist()):
            ids[row, length:] = pad  # EOS then EOS padding (OpenAI CLIP tokenizer layout)
        return (ids,)

    return ExportPart("text_encoder", graph, ("input_ids",), ("text_embeds", "last_hidden_state"), make,
                      f"{tokens} tokens", attention_swappable=False)
