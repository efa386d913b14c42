"""Teacher, VAE and text-encoder adapters: tiny random models saved with save_pretrained and loaded
back through the production `from_pretrained` path (no downloads)."""
from __future__ import annotations

import pytest
import torch

from snapgen_model.distill.teacher import LoadError, SD3Teacher, TeacherConfig
from snapgen_model.distill.text import (
    Encoded,
    TextConditioner,
    TextConditionerConfig,
    TextEncoderAdapter,
    TextEncoderSpec,
    sd3_teacher_condition,
)
from snapgen_model.distill.toy_text import build_tiny_clip, build_tokenizer, save_text_encoder
from snapgen_model.distill.vae import VAEAdapter, VAEConfig

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle left of a star"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A pipeline-style folder: transformer/, vae/, text_encoder/ (tiny CLIP), gemma/ (tiny Gemma-2)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                          pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16
                          ).save_pretrained(root / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), latent_channels=16,
                  norm_num_groups=8, scaling_factor=1.5, shift_factor=0.1).save_pretrained(root / "vae")
    tok = build_tokenizer(sorted({w for p in PROMPTS for w in p.split()}))
    save_text_encoder(build_tiny_clip(tok, hidden=32, layers=1, heads=2, projection=32), tok, root / "text_encoder")
    gcfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id)
    Gemma2Model(gcfg).save_pretrained(root / "gemma")
    tok.save_pretrained(root / "gemma")
    return root


def test_teacher_velocity_and_features(bundle):
    teacher = SD3Teacher.from_pretrained(TeacherConfig(path=str(bundle), feature_layers=(0, -1)))
    x, t = torch.randn(2, 16, 8, 8), torch.rand(2)
    ctx, pooled = torch.randn(2, 5, 32), torch.randn(2, 32)
    out = teacher(x, t, ctx, pooled)
    assert out.velocity.shape == x.shape
    assert set(out.features) == {"block0", "block1"}
    assert out.features["block1"].shape == (2, 16, teacher.feature_dim)  # (8/2)^2 tokens of width 2*16
    direct = teacher.transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                                 timestep=t * 1000, return_dict=False)[0]
    assert torch.allclose(out.velocity, direct)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.transformer.training


def test_teacher_features_carry_no_gradient_to_teacher(bundle):
    teacher = SD3Teacher.from_pretrained(TeacherConfig(path=str(bundle)))
    x = torch.randn(1, 16, 8, 8, requires_grad=True)
    out = teacher(x, torch.rand(1), torch.randn(1, 5, 32), torch.randn(1, 32))
    out.features["block1"].sum().backward()
    assert x.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_missing_and_mismatched_weights_name_path_and_class(bundle, tmp_path):
    with pytest.raises(LoadError, match=r"SD3Transformer2DModel: no model folder at .*nowhere/transformer"):
        SD3Teacher.from_pretrained(TeacherConfig(path=str(tmp_path / "nowhere")))
    with pytest.raises(LoadError, match=r"vae holds a AutoencoderKL, expected a SD3Transformer2DModel"):
        SD3Teacher.from_pretrained(TeacherConfig(path=str(bundle), subfolder="vae"))
    with pytest.raises(LoadError, match=r"CLIPTextModelWithProjection"):
        TextEncoderAdapter.from_pretrained(TextEncoderSpec(name="x", kind="clip", path=str(bundle), subfolder="vae"))
    with pytest.raises(LoadError, match=r"does not hold the weights of a CLIPTextModelWithProjection"):
        TextEncoderAdapter.from_pretrained(TextEncoderSpec(name="x", kind="clip", path=str(bundle), subfolder="gemma"))


def test_vae_scaling_and_shift_in_one_place(bundle):
    vae = VAEAdapter.from_pretrained(VAEConfig(path=str(bundle)))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode(images)
    assert z.shape == (2, 16, 8, 8) and vae.downsample == 4
    raw = vae.vae.encode(images).latent_dist.mean
    assert torch.allclose(z, (raw - 0.1) * 1.5, atol=1e-6)
    assert torch.allclose(vae.decode(z), vae.vae.decode(raw).sample, atol=1e-5)
    sampler = VAEAdapter.from_pretrained(VAEConfig(path=str(bundle), encode_mode="sample"))
    a = sampler.encode(images, torch.Generator().manual_seed(1))
    b = sampler.encode(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, z)


def test_text_encoders_clip_and_gemma(bundle):
    clip = TextEncoderAdapter.from_pretrained(TextEncoderSpec(name="clip", kind="clip", path=str(bundle),
                                                              subfolder="text_encoder", max_length=12))
    gemma = TextEncoderAdapter.from_pretrained(TextEncoderSpec(name="gemma", kind="gemma", path=str(bundle),
                                                               subfolder="gemma", max_length=10))
    ec, eg = clip(PROMPTS), gemma(PROMPTS)
    assert ec.tokens.shape == (3, 12, 32) and ec.pooled.shape == (3, 32)
    assert eg.tokens.shape == (3, 10, 32) and eg.pooled is None
    assert ec.mask[0].sum() == len(PROMPTS[0].split()) + 2  # <bos> words <eos>
    cond = TextConditioner(TextConditionerConfig(width=24, pooled_dim=32), {"clip": (32, 32), "gemma": (32, 0)})
    out = cond({"clip": ec, "gemma": eg})
    assert out["context"].shape == (3, 22, 24) and out["pooled"].shape == (3, 32)


def _encoded(b=4):
    return {"a": Encoded(torch.randn(b, 3, 8), torch.randn(b, 6), torch.ones(b, 3)),
            "b": Encoded(torch.randn(b, 2, 5), None, torch.ones(b, 2))}


def test_independent_dropout_to_zero_null():
    torch.manual_seed(0)
    cond = TextConditioner(TextConditionerConfig(width=4, pooled_dim=6), {"a": (8, 6), "b": (5, 0)})
    enc = _encoded()
    drop = torch.tensor([[False, False], [True, False], [False, True], [True, True]])
    out = cond(enc, drop)
    full = cond(enc)
    bias_a = cond.proj["a"].bias
    assert torch.allclose(out["context"][0], full["context"][0])
    assert torch.allclose(out["context"][1, :3], bias_a.expand(3, 4))  # zero null -> projection bias
    assert torch.allclose(out["context"][1, 3:], full["context"][1, 3:])  # encoder b untouched
    assert torch.allclose(out["pooled"][1], torch.zeros(6)) and torch.allclose(out["pooled"][2], full["pooled"][2])
    assert torch.allclose(cond.null_condition(enc)["context"], out["context"][3].expand(4, 5, 4))
    rates = cond.sample_drop(20000, {"a": 0.1, "b": 0.5}, torch.Generator().manual_seed(0)).float().mean(0)
    assert abs(rates[0] - 0.1) < 0.01 and abs(rates[1] - 0.5) < 0.02


def test_learned_null_is_trainable():
    cond = TextConditioner(TextConditionerConfig(width=4, pooled_dim=6, null="learned"), {"a": (8, 6), "b": (5, 0)})
    out = cond(_encoded(2), torch.ones(2, 2, dtype=torch.bool))
    out["context"].sum().backward()
    assert cond.null_tokens["a"].grad is not None and cond.null_tokens["a"].requires_grad


def test_sd3_condition_layout():
    enc = {"l": Encoded(torch.randn(2, 7, 8), torch.randn(2, 8), torch.ones(2, 7)),
           "g": Encoded(torch.randn(2, 7, 12), torch.randn(2, 12), torch.ones(2, 7)),
           "t5": Encoded(torch.randn(2, 9, 32), None, torch.ones(2, 9))}
    out = sd3_teacher_condition(enc, ["l", "g"], joint_dim=32, t5_name="t5")
    assert out["context"].shape == (2, 16, 32) and out["pooled"].shape == (2, 20)
    assert torch.equal(out["context"][:, :7, 20:], torch.zeros(2, 7, 12))
    with pytest.raises(ValueError, match="joint_attention_dim 16 < CLIP width 20"):
        sd3_teacher_condition(enc, ["l", "g"], joint_dim=16)
