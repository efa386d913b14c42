"""SnapGenUNet: shapes, parameter bands, ablation switches, gradients, determinism, zero-init.

A fresh UNet predicts exactly 0 (zero-initialised residual branches and output conv), so the tests
that compare outputs randomise those layers first (`randomize_zero_init`)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from snapgen_model.configs import UNetConfig
from snapgen_model.inspect import count_macs, count_params, example_inputs, inspect_config
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.presets import get_preset, preset_names
from tests.fixtures.checkpoints import randomize_zero_init


@pytest.mark.parametrize("name", preset_names())
def test_output_shape_every_preset(name):
    cfg = get_preset(name)
    device = "cpu" if name.startswith("toy") else "meta"
    with torch.device(device):
        model = SnapGenUNet(cfg.unet)
        x, t, cond = example_inputs(cfg, batch=2, device=device)
        v, feats = model(x, t, **cond, return_features=True)
    assert v.shape == x.shape
    side = cfg.latent_size
    for i, c in enumerate(cfg.unet.channels):
        assert feats[f"up{i}"].shape == (2, c, side >> i, side >> i)
    assert model.feature_channels()["mid"] == cfg.unet.channels[-1]


@pytest.mark.parametrize("name, paper", [("snapgen-1024", 379e6), ("snapgen-in1k-256", 372e6)])
def test_parameter_count_within_3_percent_of_paper(name, paper):
    with torch.device("meta"):
        n = count_params(SnapGenUNet(get_preset(name).unet))
    assert abs(n / paper - 1) < 0.03, f"{name}: {n / 1e6:.1f}M vs paper {paper / 1e6:.0f}M"


def test_class_model_is_smaller_than_text_model():
    with torch.device("meta"):
        t2i = count_params(SnapGenUNet(get_preset("snapgen-1024").unet))
        c2i = count_params(SnapGenUNet(get_preset("snapgen-in1k-256").unet))
    assert c2i < t2i


def test_inspect_rows_sum_to_totals():
    report = inspect_config(get_preset("snapgen-1024"))
    unet_rows = [r for r in report.rows if r.stage != "decoder"]
    assert sum(r.params for r in unet_rows) == report.unet_params
    assert sum(r.macs for r in unet_rows) == report.unet_macs
    # the paper-scale forward is ~1.4 TFLOP (0.7 TMAC) at 1024^2
    assert 0.5e12 < report.unet_macs < 0.9e12
    assert all(r.macs > 0 for r in unet_rows)


# ablation switches (SNAPGEN_SPEC section 1) on a reduced full-architecture UNet at 256^2 latent 32^2
BASE = UNetConfig(channels=(128, 256, 448), head_dim=64, context_dim=256, pooled_dim=256, time_embed_dim=512)


def _measure(cfg: UNetConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = SnapGenUNet(cfg)
        x = torch.randn(1, 16, 32, 32)
        cond = dict(context=torch.randn(1, 77, cfg.context_dim), pooled=torch.randn(1, cfg.pooled_dim))
        return count_params(model), count_macs(model, x, torch.rand(1), **cond)


@pytest.mark.parametrize("change, what", [
    (dict(kv_heads=0), "MHA instead of MQA"),
    (dict(ffn_ratio=4), "FFN ratio 4 instead of 3"),
    (dict(separable_conv=False), "full convs instead of separable"),
    (dict(transformer_depth=(1, 2, 10)), "SDXL depth at stage 3"),
])
def test_ablation_switch_paper_direction_params_and_macs(change, what):
    p0, m0 = _measure(BASE)
    p1, m1 = _measure(dataclasses.replace(BASE, **change))
    assert p1 > p0 and m1 > m0, f"{what}: params {p0}->{p1}, MACs {m0}->{m1}"


def test_high_res_self_attention_costs_macs():
    _, m0 = _measure(BASE)
    _, m1 = _measure(dataclasses.replace(BASE, self_attention=(True, True, True)))
    assert m1 > 1.1 * m0


def test_stage1_cross_attention_injection_adds_params():
    p0, _ = _measure(dataclasses.replace(BASE, transformer_depth=(0, 2, 4)))
    p1, _ = _measure(BASE)
    assert p1 > p0


def test_qk_norm_and_rope_switches_change_outputs():
    cfg = get_preset("toy-smoke")
    x, t, cond = example_inputs(cfg, batch=1, device="cpu")
    outs = []
    for change in (dict(), dict(rope=False), dict(qk_norm=False)):
        torch.manual_seed(0)
        model = randomize_zero_init(SnapGenUNet(dataclasses.replace(cfg.unet, **change)))
        outs.append(model(x, t, **cond))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_gradients_reach_every_parameter():
    cfg = get_preset("toy-smoke")
    torch.manual_seed(0)
    model = randomize_zero_init(SnapGenUNet(cfg.unet))
    x, t, cond = example_inputs(cfg, batch=2, device="cpu")
    model(x, t, **cond).pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing[:5]}"
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


def test_determinism_with_seed():
    cfg = get_preset("toy-smoke")
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = randomize_zero_init(SnapGenUNet(cfg.unet), seed=123)
        x, t, cond = example_inputs(cfg, batch=2, device="cpu")
        outs.append(model(x, t, **cond))
    assert torch.equal(outs[0], outs[1])


def test_activation_checkpointing_matches_plain_forward():
    cfg = get_preset("toy-smoke")
    torch.manual_seed(0)
    plain = randomize_zero_init(SnapGenUNet(cfg.unet))
    ckpt = SnapGenUNet(dataclasses.replace(cfg.unet, checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, cond = example_inputs(cfg, batch=2, device="cpu")
    a, b = plain(x, t, **cond), ckpt(x, t, **cond)
    assert torch.allclose(a, b, atol=1e-6)
    b.sum().backward()
    assert all(p.grad is not None for p in ckpt.parameters())


def test_class_conditioning_uses_labels():
    cfg = get_preset("toy-smoke", ["task=class-conditional", "unet.conditioning=class", "unet.num_classes=10"])
    torch.manual_seed(0)
    model = randomize_zero_init(SnapGenUNet(cfg.unet))
    x, t = torch.randn(2, 16, 8, 8), torch.rand(2)
    a = model(x, t, labels=torch.tensor([0, 1]))
    b = model(x, t, labels=torch.tensor([3, 1]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="needs `labels`"):
        model(x, t)


def _residual_branches(model: SnapGenUNet, x, t, cond) -> dict[str, torch.Tensor]:
    """Output of every residual branch (block output minus its skip path), captured by hooks."""
    from snapgen_model.nn.attention import Attention, FeedForward, SpatialTransformer
    from snapgen_model.nn.blocks import ResBlock

    out, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, ResBlock):
            hooks.append(m.register_forward_hook(
                lambda mod, args, y, name=name: out.__setitem__(name, y - mod.skip(args[0]))))
        elif isinstance(m, SpatialTransformer):
            hooks.append(m.register_forward_hook(lambda mod, args, y, name=name: out.__setitem__(name, y - args[0])))
        elif isinstance(m, (Attention, FeedForward)):  # the branch added onto the token stream
            hooks.append(m.register_forward_hook(lambda mod, args, y, name=name: out.__setitem__(name, y)))
    try:
        model(x, t, **cond)
    finally:
        for h in hooks:
            h.remove()
    return out


@pytest.mark.parametrize("name, change", [("toy-smoke", {}), ("toy-smoke", {"separable_conv": False}),
                                          ("toy", {})])
def test_fresh_unet_outputs_zero_and_residual_branches_start_as_identity(name, change):
    cfg = get_preset(name)
    torch.manual_seed(0)
    model = SnapGenUNet(dataclasses.replace(cfg.unet, **change))
    x, t, cond = example_inputs(cfg, batch=2, device="cpu")
    assert torch.count_nonzero(model(x, t, **cond)) == 0  # v = 0 exactly
    branches = _residual_branches(model, x, t, cond)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n in branches}
    assert {"ResBlock", "SpatialTransformer", "Attention", "FeedForward"} <= kinds
    assert all(torch.count_nonzero(y) == 0 for y in branches.values()), \
        [n for n, y in branches.items() if torch.count_nonzero(y)][:5]
    # only the zero-init layers are zero: the rest of the network keeps its random init
    assert model.conv_in.weight.abs().sum() > 0 and model.down[0].res[0].norm1.weight.abs().sum() > 0
    assert all(p.abs().sum() > 0 for p in model.down[0].res[0].conv1.parameters())


def test_zero_init_unet_still_trains():
    """One optimiser step makes the output non-zero; a few more and gradients reach every layer."""
    cfg = get_preset("toy-smoke")
    torch.manual_seed(0)
    model = SnapGenUNet(cfg.unet)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t, cond = example_inputs(cfg, batch=2, device="cpu")
    target = torch.randn_like(x)
    for step in range(5):  # the zeros unlock layer by layer: conv_out, then branch outputs, then their insides
        opt.zero_grad()
        (model(x, t, **cond) - target).pow(2).mean().backward()
        if step == 0:
            assert model.conv_out.weight.grad.abs().sum() > 0
        else:
            silent = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
            assert step < 4 or not silent, f"no gradient after {step} steps: {silent[:5]}"
        opt.step()
        if step == 0:
            assert torch.count_nonzero(model(x, t, **cond)) > 0
