"""CPU training speed levers that must not change results (issue 14 teacher speed, issue 15 student
speed): the explicit attention form, its SD3 joint-attention processor, bf16 autocast of the teacher
on CPU, and the allocator setting."""
from __future__ import annotations

import subprocess
import sys
import textwrap

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


def test_allocator_setting_removes_page_faults_of_repeated_large_tensors():
    script = textwrap.dedent("""
        import resource, sys, torch
        from snapgen_model.training.cpu import tune_allocator
        if sys.argv[1] == "tuned":
            assert tune_allocator() and tune_allocator()
        torch.set_num_threads(1)
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(4 << 20)  # 16 MiB, above glibc's default mmap threshold
        for _ in range(12):  # warm-up: the tuned heap grows to its working size (about 7 faulting steps)
            x = (x * 1.0001).contiguous()
        before = faults()
        for _ in range(30):
            x = (x * 1.0001).contiguous()
        print(faults() - before)
    """)
    counts = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        counts[mode] = int(out.stdout.strip().splitlines()[-1])
    # default glibc, steady state: two steps in three fault in a fresh 16 MiB (4096 pages of 4 KiB), as
    # the heap is trimmed or a new mmap is made; tuned: the heap is kept and reused (measured: 0 faults)
    assert counts["default"] > 40 * 1000
    assert counts["tuned"] < counts["default"] / 10
