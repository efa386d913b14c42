"""Config validation and overrides: errors name the field and the allowed values."""
from __future__ import annotations

import pytest

from snapgen_model.config_base import ConfigError
from snapgen_model.configs import SamplerConfig, SnapGenConfig, UNetConfig
from snapgen_model.presets import get_preset, preset_names


def test_every_preset_builds_and_round_trips_through_dict():
    for name in preset_names():
        cfg = get_preset(name)
        assert cfg.name == name
        assert SnapGenConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.content_hash() == SnapGenConfig.from_dict(cfg.to_dict()).content_hash()


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match=r"preset: unknown preset 'nope'.*toy-smoke"):
        get_preset("nope")


def test_override_applies_and_changes_hash():
    base = get_preset("toy")
    cfg = get_preset("toy", ["unet.ffn_ratio=4", "sampler.steps=8", "unet.channels=[32,64,128]"])
    assert cfg.unet.ffn_ratio == 4 and cfg.sampler.steps == 8 and cfg.unet.channels == (32, 64, 128)
    assert cfg.content_hash() != base.content_hash()


@pytest.mark.parametrize("override, pattern", [
    ("unet.ffn_ratio=x", r"unet\.ffn_ratio: expected int, got str"),
    ("unet.ffn_ratio=0", r"unet\.ffn_ratio: must be >= 1"),
    ("unet.nonsense=1", r"unet\.nonsense: unknown key.*allowed keys.*ffn_ratio"),
    ("sampler.kind=ddim", r"sampler\.kind: 'ddim' is not allowed; choose one of \['euler', 'few_step'\]"),
    ("unet.qk_norm=1", r"unet\.qk_norm: expected bool"),
    ("unet.channels=[32,64]", r"unet\.transformer_depth: needs one entry per stage \(2\)"),
    ("image_size=62", r"image_size: 62 is not divisible by latent.downsample 4"),
    ("image_size=60", r"image_size: latent size 15 must be divisible by 4"),
    ("unet.conditioning=class", r"unet\.conditioning: task 'text-to-image' needs 'text'"),
    ("no_equals_sign", r"expected the form key=value"),
])
def test_bad_overrides_name_the_field(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        get_preset("toy", [override])


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match=r"sampler\.steps: must be in \[1, 1000\]"):
        SamplerConfig(steps=0)
    with pytest.raises(ConfigError, match=r"unet\.channels: 100 is not a multiple of head_dim 64"):
        UNetConfig(channels=(64, 100, 128))


def test_from_dict_rejects_unknown_nested_key():
    data = get_preset("toy").to_dict()
    data["decoder"]["colour"] = "red"
    with pytest.raises(ConfigError, match=r"decoder\.colour: unknown key for TinyDecoderConfig"):
        SnapGenConfig.from_dict(data)


def test_fixed_length_tuple_fields_round_trip():
    import dataclasses

    from snapgen_model.config_base import ConfigBase, ConfigError

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Pair(ConfigBase):
        size: tuple[int, int] = (14, 22)

    assert Pair.from_dict({"size": [8, 11]}).size == (8, 11)
    assert Pair().with_overrides(["size=[3,4]"]).size == (3, 4)
    with pytest.raises(ConfigError, match=r"size\[1\]: expected int"):
        Pair.from_dict({"size": [1, "x"]})
