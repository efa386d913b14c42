"""Named presets (STYLE.md 2): one registry, the full SnapGen sizes and the toy world's debug sizes.

| preset            | use                                  | image | latent      | UNet                  |
|-------------------|--------------------------------------|-------|-------------|-----------------------|
| snapgen-1024      | the paper's text-to-image model      | 1024  | 128^2 x 16  | [256,512,896], ~384M  |
| snapgen-in1k-256  | ImageNet-1K class-conditional        | 256   | 32^2 x 16   | same body, ~378M      |
| toy-smoke         | tests: seconds                       | 32    | 8^2 x 16    | tiny                  |
| toy               | CPU demo: proves mechanics (minutes) | 64    | 16^2 x 16   | ~1.4M                 |
| toy-gpu           | one GPU, minutes: proves quality     | 64    | 16^2 x 16   | ~20M                  |

The toy presets use the same classes as the full ones; only sizes differ. The toy latent space is
the f=4, 16-channel toy VAE the teacher bootstrap trains (TOY_CALIBRATION.md: f=8 loses objects).
"""
from __future__ import annotations

from typing import Callable, Iterable

from snapgen_model.config_base import ConfigError
from snapgen_model.configs import (
    FlowMatchingConfig,
    LatentSpaceConfig,
    SamplerConfig,
    SnapGenConfig,
    TinyDecoderConfig,
    UNetConfig,
)


def snapgen_1024() -> SnapGenConfig:
    """The paper's model: SD3 latent space, 1024^2, SD3-style timestep shift 3 [U]."""
    return SnapGenConfig(
        name="snapgen-1024", image_size=1024,
        flow=FlowMatchingConfig(shift=3.0), sampler=SamplerConfig(steps=28, guidance=4.5, shift=3.0),
    )


def snapgen_in1k_256() -> SnapGenConfig:
    """ImageNet-1K 256^2 class-conditional model (paper: 372M params, FID 2.06)."""
    return SnapGenConfig(
        name="snapgen-in1k-256", task="class-conditional", image_size=256,
        unet=UNetConfig(conditioning="class", context_dim=256),
        sampler=SamplerConfig(steps=28, guidance=1.5),
    )


TOY_LATENT = LatentSpaceConfig(channels=16, downsample=4, scaling_factor=1.0, shift_factor=0.0)


def toy_smoke() -> SnapGenConfig:
    """Smallest working size, for tests (seconds on a CPU)."""
    return SnapGenConfig(
        name="toy-smoke", image_size=32, latent=TOY_LATENT,
        unet=UNetConfig(channels=(16, 32, 32), transformer_depth=(1, 1, 1), mid_transformer_depth=1,
                        head_dim=16, norm_groups=8, time_embed_dim=64, context_dim=32, pooled_dim=32),
        decoder=TinyDecoderConfig(channels=(32, 16, 8), blocks=(1, 1, 1), upsample=4),
        sampler=SamplerConfig(steps=4, guidance=2.0),
    )


def toy() -> SnapGenConfig:
    """CPU demo size for the 64 px shapes world (TOY_CALIBRATION.md: a ~1M student trains in ~2 min)."""
    return SnapGenConfig(
        name="toy", image_size=64, latent=TOY_LATENT,
        unet=UNetConfig(channels=(32, 64, 64), transformer_depth=(1, 1, 1), mid_transformer_depth=1,
                        head_dim=32, norm_groups=8, time_embed_dim=64, context_dim=64, pooled_dim=64),
        decoder=TinyDecoderConfig(channels=(64, 32, 16), blocks=(2, 1, 1), upsample=4),
        sampler=SamplerConfig(steps=24, guidance=4.0),
    )


def toy_gpu() -> SnapGenConfig:
    """The same world at a size one GPU trains to real quality in minutes."""
    return SnapGenConfig(
        name="toy-gpu", image_size=64, latent=TOY_LATENT,
        unet=UNetConfig(channels=(64, 128, 256), transformer_depth=(1, 2, 2), mid_transformer_depth=2,
                        head_dim=32, norm_groups=16, time_embed_dim=256, context_dim=256, pooled_dim=256),
        decoder=TinyDecoderConfig(channels=(96, 48, 24), blocks=(2, 2, 1), upsample=4),
        sampler=SamplerConfig(steps=24, guidance=4.0),
    )


PRESETS: dict[str, Callable[[], SnapGenConfig]] = {
    "snapgen-1024": snapgen_1024,
    "snapgen-in1k-256": snapgen_in1k_256,
    "toy-smoke": toy_smoke,
    "toy": toy,
    "toy-gpu": toy_gpu,
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, overrides: Iterable[str] = ()) -> SnapGenConfig:
    """The named preset with `key=value` overrides applied and validated."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {preset_names()}")
    cfg = PRESETS[name]()
    overrides = list(overrides)
    return cfg.with_overrides(overrides) if overrides else cfg
