"""Component configs of the SnapGen model family (architecture lives here, STYLE.md 1).

Section references are to SNAPGEN_SPEC.md (arXiv 2412.09619, "SnapGen"). Tags: [P] stated by the
paper, [I] inferred default, [U] free hyper-parameter exposed here and documented.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from snapgen_model.config_base import ConfigBase, check, check_choice


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentSpaceConfig(ConfigBase):
    """The autoencoder latent space the student lives in (SPEC 2: SD3 VAE, 16 ch, f=8)."""

    channels: int = 16  # latent channels (SD3 VAE: 16) [I]
    downsample: int = 8  # spatial down-sampling factor of the VAE (SD3: 8; toy: 4) [I]
    scaling_factor: float = 1.5305  # SD3 VAE scaling factor, applied as (z - shift) * scale
    shift_factor: float = 0.0609  # SD3 VAE shift factor

    def __post_init__(self) -> None:
        check(self.channels >= 1, "latent.channels", f"must be >= 1, got {self.channels}")
        check_choice(self.downsample, "latent.downsample", (1, 2, 4, 8, 16))
        check(self.scaling_factor > 0, "latent.scaling_factor", "must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig(ConfigBase):
    """SnapGen UNet (SPEC 1). Every step of the paper's ablation chain is a switch here."""

    in_channels: int = 16  # latent channels in
    out_channels: int = 16  # velocity channels out
    channels: tuple[int, ...] = (256, 512, 896)  # width per resolution stage [P]
    # transformer blocks per attention module, per stage; SnapGen [0,2,4] + stage-1 cross-attn
    # injection gives [1,2,4] [P] (SDXL: [0,2,10]); 0 disables the stage's attention modules
    transformer_depth: tuple[int, ...] = (1, 2, 4)
    self_attention: tuple[bool, ...] = (False, False, True)  # self-attn only at lowest res [P]
    mid_transformer_depth: int = 4  # blocks in the mid-block transformer (self-attn on) [I]
    down_blocks: int = 2  # residual blocks per down stage [I, SDXL-style]
    up_blocks: int = 3  # residual blocks per up stage [I, SDXL-style]
    separable_conv: bool = True  # depthwise+pointwise residual convs (False: full 3x3) [P]
    conv_expansion: int = 2  # expanded separable conv: intermediate width = ratio * C [P]
    ffn_ratio: int = 3  # FFN hidden = ratio * C (SDXL: 4) [P]
    ffn_gated: bool = True  # GEGLU gating in the FFN [U]
    head_dim: int = 64  # attention head width [U]
    kv_heads: int = 1  # 1 = multi-query attention (shared K/V head) [P]; 0 = as many as Q heads
    qk_norm: bool = True  # RMSNorm on queries and keys [U]
    rope: bool = True  # 2-D rotary position embedding in self-attention [U]
    norm_groups: int = 32  # GroupNorm groups in residual blocks
    time_embed_dim: int = 1024  # timestep embedding width (4 x channels[0]) [I]
    time_scale_shift: bool = False  # False: additive time embedding (SDXL); True: scale+shift [U]
    # conditioning: "text" (token states + pooled vector) or "class" (ImageNet labels)
    conditioning: Literal["text", "class"] = "text"
    context_dim: int = 1024  # common width text encoders are projected to, token-wise concatenated [U]
    pooled_dim: int = 2048  # pooled text vector (CLIP-L 768 + bigG 1280) added to the time embedding [U]
    num_classes: int = 1000  # class-conditional mode: number of labels (+1 null label for CFG)
    dropout: float = 0.0  # dropout in attention/FFN
    checkpointing: bool = False  # activation checkpointing of transformer modules

    def __post_init__(self) -> None:
        n = len(self.channels)
        check(n >= 1, "unet.channels", "needs at least one stage")
        check(all(c > 0 for c in self.channels), "unet.channels", f"all must be > 0, got {self.channels}")
        check(len(self.transformer_depth) == n, "unet.transformer_depth",
              f"needs one entry per stage ({n}), got {len(self.transformer_depth)}")
        check(len(self.self_attention) == n, "unet.self_attention",
              f"needs one entry per stage ({n}), got {len(self.self_attention)}")
        check(all(d >= 0 for d in self.transformer_depth), "unet.transformer_depth", "must be >= 0")
        check(self.mid_transformer_depth >= 0, "unet.mid_transformer_depth", "must be >= 0")
        check(self.down_blocks >= 1, "unet.down_blocks", f"must be >= 1, got {self.down_blocks}")
        check(self.up_blocks >= 1, "unet.up_blocks", f"must be >= 1, got {self.up_blocks}")
        check(self.conv_expansion >= 1, "unet.conv_expansion", "must be >= 1")
        check(self.ffn_ratio >= 1, "unet.ffn_ratio", f"must be >= 1, got {self.ffn_ratio}")
        check(self.head_dim >= 8 and self.head_dim % 2 == 0, "unet.head_dim", "must be even and >= 8")
        for c in self.channels:
            check(c % self.head_dim == 0, "unet.channels", f"{c} is not a multiple of head_dim {self.head_dim}")
            check(c % self.norm_groups == 0, "unet.norm_groups", f"{self.norm_groups} does not divide {c}")
        check(self.kv_heads >= 0, "unet.kv_heads", "must be >= 0 (0 = one K/V head per query head)")
        check(not self.rope or self.head_dim % 4 == 0, "unet.rope", "2-D RoPE needs head_dim % 4 == 0")
        check_choice(self.conditioning, "unet.conditioning", ("text", "class"))
        check(self.time_embed_dim > 0, "unet.time_embed_dim", "must be > 0")
        check(0.0 <= self.dropout < 1.0, "unet.dropout", "must be in [0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyDecoderConfig(ConfigBase):
    """SnapGen tiny decoder (SPEC 2): ~1.38M params, no attention, separable convs."""

    latent_channels: int = 16  # input latent channels
    out_channels: int = 3  # RGB
    channels: tuple[int, ...] = (256, 192, 128, 64)  # width at latent res, then after each 2x up-sample
    blocks: tuple[int, ...] = (3, 2, 1, 1)  # residual blocks per level (1.34M params at f=8)
    upsample: int = 8  # total up-sampling factor (must equal the latent space's down-sampling)
    expansion: int = 2  # expanded separable conv ratio, as in the UNet

    def __post_init__(self) -> None:
        levels = len(self.channels)
        check(len(self.blocks) == levels, "decoder.blocks", f"needs {levels} entries (one per level)")
        check_choice(self.upsample, "decoder.upsample", (1, 2, 4, 8, 16))
        needed = self.upsample.bit_length() - 1
        check(levels == needed + 1, "decoder.channels",
              f"upsample {self.upsample} needs {needed + 1} levels, got {levels}")
        check(all(c > 0 for c in self.channels), "decoder.channels", "must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlowMatchingConfig(ConfigBase):
    """Rectified-flow objective (SPEC 4): x_t = (1-t) x0 + t eps, v = eps - x0."""

    logit_mean: float = 0.0  # logit-normal timestep distribution mean [P]
    logit_std: float = 1.0  # logit-normal timestep distribution std [P]
    shift: float = 1.0  # resolution-dependent timestep shift (1 = none) [U]

    def __post_init__(self) -> None:
        check(self.logit_std > 0, "flow.logit_std", "must be > 0")
        check(self.shift > 0, "flow.shift", "must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig(ConfigBase):
    """How a model is sampled; travels with a checkpoint's config (SPEC 4, 6)."""

    kind: Literal["euler", "few_step"] = "euler"  # Euler ODE, or x0-predict-and-renoise for distilled students
    steps: int = 28  # number of model evaluations [P: 28 for the base model]
    guidance: float = 4.5  # classifier-free guidance scale (1 = off) [U]
    shift: float = 1.0  # timestep shift of the sampling schedule [U]

    def __post_init__(self) -> None:
        check_choice(self.kind, "sampler.kind", ("euler", "few_step"))
        check(1 <= self.steps <= 1000, "sampler.steps", f"must be in [1, 1000], got {self.steps}")
        check(self.guidance >= 1.0, "sampler.guidance", "must be >= 1 (1 disables guidance)")
        check(self.shift > 0, "sampler.shift", "must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapGenConfig(ConfigBase):
    """A whole preset: resolution, latent space and every component's config."""

    name: str  # preset name (kebab-case)
    task: Literal["text-to-image", "class-conditional"] = "text-to-image"
    image_size: int = 1024  # training/generation resolution in pixels (square base bucket)
    latent: LatentSpaceConfig = dataclasses.field(default_factory=LatentSpaceConfig)
    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    decoder: TinyDecoderConfig = dataclasses.field(default_factory=TinyDecoderConfig)
    flow: FlowMatchingConfig = dataclasses.field(default_factory=FlowMatchingConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    seed: int = 0  # global seed

    def __post_init__(self) -> None:
        check(self.image_size % self.latent.downsample == 0, "image_size",
              f"{self.image_size} is not divisible by latent.downsample {self.latent.downsample}")
        stages = len(self.unet.channels)
        check(self.latent_size % (2 ** (stages - 1)) == 0, "image_size",
              f"latent size {self.latent_size} must be divisible by {2 ** (stages - 1)} for {stages} stages")
        check(self.unet.in_channels == self.latent.channels, "unet.in_channels",
              f"must equal latent.channels ({self.latent.channels})")
        check(self.decoder.latent_channels == self.latent.channels, "decoder.latent_channels",
              f"must equal latent.channels ({self.latent.channels})")
        check(self.decoder.upsample == self.latent.downsample, "decoder.upsample",
              f"must equal latent.downsample ({self.latent.downsample})")
        want = "class" if self.task == "class-conditional" else "text"
        check(self.unet.conditioning == want, "unet.conditioning", f"task {self.task!r} needs {want!r}")

    @property
    def latent_size(self) -> int:
        """Side of the square latent grid."""
        return self.image_size // self.latent.downsample
