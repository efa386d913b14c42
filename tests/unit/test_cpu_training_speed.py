"""CPU training speed levers that must not change results (issue 14 teacher speed, issue 15 student
speed): the explicit attention form, its SD3 joint-attention processor, bf16 autocast of the teacher
on CPU, and the allocator setting."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from snapgen_model.nn.attention import ExplicitJointAttnProcessor, attention, explicit_attention, use_fast_attention
from snapgen_model.training import bootstrap as bs


def _qkv(dtype=torch.float32, n=20, m=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, length, 16, generator=g).to(dtype).requires_grad_()
            for length in (n, m, m)]


def test_explicit_attention_is_sdpa_in_value_and_gradient():
    q, k, v = _qkv()
    ours = explicit_attention(q, k, v)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2, v2)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q2, k2, v2))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_takes_the_explicit_form_only_for_half_precision_on_cpu():
    q, k, v = _qkv(torch.bfloat16)
    out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, explicit_attention(q, k, v))  # the explicit kernel, bit for bit
    ref = F.scaled_dot_product_attention(*(x.float() for x in (q, k, v)))
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)  # bf16 rounding only
    q, k, v = _qkv(torch.float32)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))  # fp32: the fused kernel


def _sd3_output(model: torch.nn.Module, cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.ae_latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    ctx, pooled = torch.randn(2, 5, cfg.joint_dim, generator=g), torch.randn(2, cfg.pooled_dim, generator=g)
    return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                 timestep=torch.tensor([300.0, 800.0]), return_dict=False)[0]


@pytest.mark.parametrize("qk_norm", ["none", "rms_norm"])
def test_explicit_joint_processor_reproduces_diffusers_sd3(qk_norm):
    cfg = bs.get_bootstrap_config("toy-smoke", ["teacher_zero_init=false", f"qk_norm={qk_norm}", "teacher_layers=3"])
    model = bs.build_teacher(cfg).eval()
    with torch.no_grad():
        ref = _sd3_output(model, cfg)
        use_fast_attention(model)
        assert all(isinstance(p, ExplicitJointAttnProcessor) for p in model.attn_processors.values())
        ours = _sd3_output(model, cfg)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # a wrong processor (captions dropped from the joint sequence) would not pass: the output depends on them
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, cfg.ae_latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
        ctx, pooled = torch.randn(2, 5, cfg.joint_dim, generator=g), torch.randn(2, cfg.pooled_dim, generator=g)
        other = model(hidden_states=x, encoder_hidden_states=ctx * 2, pooled_projections=pooled,
                      timestep=torch.tensor([300.0, 800.0]), return_dict=False)[0]
    assert not torch.allclose(other, ours, atol=1e-4)


def test_bf16_teacher_training_on_cpu_autocasts_and_learns():
    cfg = bs.get_bootstrap_config("toy-smoke", ["mixed_precision=bf16", "teacher_steps=30"])
    vae, _ = bs.train_autoencoder(cfg)
    seen = []
    original = ExplicitJointAttnProcessor.__call__

    def spy(self, attn, hidden_states, *args, **kwargs):
        seen.append(attn.to_q(hidden_states).dtype)
        return original(self, attn, hidden_states, *args, **kwargs)

    ExplicitJointAttnProcessor.__call__ = spy
    try:
        models, result = bs.train_teacher(cfg, None, vae)
    finally:
        ExplicitJointAttnProcessor.__call__ = original
    assert seen and seen[0] == torch.bfloat16  # the transformer ran under CPU autocast, through the explicit form
    losses = [p["loss"] for p in result.curve]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert next(models.transformer.parameters()).dtype == torch.float32  # fp32 master weights, saved as such


def test_allocator_setting_keeps_freed_memory_for_the_next_step():
    """A training step allocates and frees the same large activations every step. Default glibc hands
    freed 8 MiB blocks back to the kernel (mmap/trim), so the next step faults them in again; tuned,
    the process keeps them (resident memory stays after the free) for reuse."""
    script = textwrap.dedent("""
        import sys, torch
        from snapgen_model.training.cpu import tune_allocator
        if sys.argv[1] == "tuned":
            assert tune_allocator() and tune_allocator()  # applied, and idempotent
        torch.set_num_threads(1)
        def rss_mib():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20
        base = rss_mib()
        blocks = [torch.ones(2 << 20) for _ in range(20)]  # one step's activations: 20 x 8 MiB, touched
        peak = rss_mib()
        del blocks
        print(peak - base, rss_mib() - base)
    """)
    kept = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        grown, after = map(float, out.stdout.strip().splitlines()[-1].split())
        assert grown > 150, (mode, grown)  # the blocks were resident
        kept[mode] = after
    assert kept["default"] < 20 and kept["tuned"] > 150, kept  # measured: 1 MiB against 161 MiB


def _student_fit(tmp_path, **kw):
    from tests.unit.test_pretrain import CACHE, PRESET, _flow_matching_loss, cfg, synthetic_data

    from snapgen_model.training.pretrain import fit

    data = synthetic_data(n=4)
    result = fit(PRESET, cfg(steps=40, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=0,
                             encoder_dropout=0.0, **kw), data, CACHE, tmp_path)
    return result, _flow_matching_loss(result["module"], data)


def test_student_bf16_on_cpu_autocasts_through_the_explicit_attention_and_learns(tmp_path, monkeypatch):
    """pretrain.precision=bf16-mixed on CPU: Lightning's CPU autocast reaches the student's attention
    (bf16 q/k/v through `explicit_attention`), weights stay fp32, and the student learns."""
    import snapgen_model.nn.attention as attn

    seen = []
    original = attn.explicit_attention

    def spy(q, k, v, dropout_p=0.0):
        seen.append(q.dtype)
        return original(q, k, v, dropout_p)

    monkeypatch.setattr(attn, "explicit_attention", spy)
    result, (trained, untrained) = _student_fit(tmp_path, precision="bf16-mixed")
    assert seen and set(seen) == {torch.bfloat16}
    assert next(result["module"].student.parameters()).dtype == torch.float32
    assert trained < 0.92 * untrained, (trained, untrained)


def test_student_channels_last_computes_the_same_learns_and_saves_standard_weights(tmp_path):
    """pretrain.channels_last: the same function as the default layout (one forward and backward on the
    same weights agree to float rounding), training learns, and the student comes back in the standard
    layout, so it saves as safetensors."""
    import copy

    from tests.unit.test_pretrain import PRESET

    from snapgen_model.nn.unet import SnapGenUNet
    from snapgen_model.training.pretrain import save_student

    torch.manual_seed(0)
    plain = SnapGenUNet(PRESET.unet)
    for p in plain.parameters():  # zero-initialised outputs would make the comparison trivial
        p.data.add_(0.02 * torch.randn_like(p))
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x, t = torch.randn(3, 16, 8, 8), torch.rand(3)
    ctx, pooled = torch.randn(3, 6, PRESET.unet.context_dim), torch.randn(3, PRESET.unet.pooled_dim)
    outs = []
    for model in (plain, cl):
        out = model(x, t, ctx, pooled)
        out.pow(2).mean().backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    assert all(torch.allclose(outs[0][1][n], outs[1][1][n], rtol=1e-3, atol=1e-6) for n in outs[0][1])
    result, (trained, untrained) = _student_fit(tmp_path / "cl", channels_last=True)
    assert trained < 0.92 * untrained
    assert all(p.is_contiguous() for p in result["module"].student.parameters())
    paths = save_student(result["module"], tmp_path / "saved")
    assert all(Path(p).stat().st_size > 0 for p in paths.values())


def test_student_fused_adamw_learns_like_the_default(tmp_path):
    """pretrain.fused_optimizer: AdamW's fused kernel; the same update up to rounding, so the same learning."""
    fused, (trained, untrained) = _student_fit(tmp_path / "fused", fused_optimizer=True)
    plain, _ = _student_fit(tmp_path / "plain")
    assert fused["module"].trainer.optimizers[0].defaults["fused"] is True
    assert trained < 0.92 * untrained
    a, b = fused["module"].student.state_dict(), plain["module"].student.state_dict()
    worst = max(float((a[k] - b[k]).abs().max()) / (float(b[k].abs().max()) + 1e-8) for k in a)
    assert worst < 0.05, worst  # 40 steps at lr 1e-2: rounding differences grow, they do not diverge


def test_fused_optimizer_with_mixed_precision_and_clipping_is_a_config_error():
    from snapgen_model.config_base import ConfigError
    from snapgen_model.training.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match="pretrain.fused_optimizer"):
        PretrainConfig.from_dict({"fused_optimizer": True, "precision": "bf16-mixed"})
    PretrainConfig.from_dict({"fused_optimizer": True, "precision": "bf16-mixed", "grad_clip": 0})
    PretrainConfig.from_dict({"fused_optimizer": True})
