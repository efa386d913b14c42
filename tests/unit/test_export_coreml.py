"""Core ML export (DESIGN.md 6): the Neural-Engine attention swap keeps numerics, conversions give
loadable ML Program packages with the expected I/O, FP16 precision and iOS 17 target, palettization
shrinks a package, and prediction parity is reported as "requires macOS" off macOS."""
from __future__ import annotations

import sys

import pytest
import torch

from snapgen_model.export import ExportConfig, export_model, load_inputs
from snapgen_model.export import coreml_export
from snapgen_model.export.coreml_export import REQUIRES_MACOS, SpecCheckError, check_spec, convert
from snapgen_model.export.parity import compare_all
from snapgen_model.export.parts import decoder_part, text_encoder_part, unet_part
from snapgen_model.export.swaps import ExplicitRMSNorm, ExportAttention, count_swaps, export_friendly_copy
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.presets import get_preset
from snapgen_model.storage.checkpoint import save_model
from tests.fixtures.checkpoints import randomize_zero_init

# toy-smoke with one attention stage: every SnapGen attention feature (MQA, QK RMSNorm, RoPE, self +
# cross attention) at a depth Core ML converts in seconds
SMALL_UNET = ["unet.channels=[16,32]", "unet.transformer_depth=[0,1]", "unet.self_attention=[false,true]",
              "unet.down_blocks=1", "unet.up_blocks=2", "unet.mid_transformer_depth=1"]
FAST = dict(text_length=8, threads=1, latency_warmup=1, latency_runs=3)
ON_MAC = sys.platform == "darwin"


def _heads(part) -> int:
    return sum(m.heads for m in export_friendly_copy(part.module).modules() if isinstance(m, ExportAttention))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("overrides", [[], ["unet.kv_heads=0"], ["unet.kv_heads=2", "unet.qk_norm=false"]],
                         ids=["mqa", "mha", "gqa-no-qknorm"])
def test_attention_swaps_keep_the_unets_numerics(overrides):
    cfg = get_preset("toy-smoke", ["unet.head_dim=8", *overrides])
    torch.manual_seed(0)
    part = unet_part(randomize_zero_init(SnapGenUNet(cfg.unet)), cfg, 8)
    x = part.inputs(2, 0)
    ref = part.reference(x)
    for mode in ("original", "matmul", "split_einsum"):
        swapped = export_friendly_copy(part.module, mode)
        counts = count_swaps(swapped)
        assert counts["ExportAttention"] == 22  # 5 down + 1 mid x 2 + 8 up modules: self + cross attention
        assert not any(isinstance(m, torch.nn.RMSNorm) for m in swapped.modules())
        assert {m.mode for m in swapped.modules() if isinstance(m, ExportAttention)} == {mode}
        with torch.no_grad():
            metrics = compare_all([swapped(*x)], ref)
        assert metrics.max_abs < 1e-5 and metrics.psnr > 100, (mode, metrics)
    assert part.module.unet.down[0].attn[0].blocks[0].attn2.__class__.__name__ == "Attention"  # original untouched


def test_explicit_rmsnorm_matches_torch():
    norm = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16) * 4
    assert torch.allclose(ExplicitRMSNorm(norm)(x), norm(x), atol=1e-6)


def test_decoder_package_spec_and_palettization_shrinks_it(tmp_path):
    cfg = get_preset("toy-smoke")
    torch.manual_seed(0)
    part = decoder_part(TinyDecoder(cfg.decoder), cfg)
    config = ExportConfig(**FAST, palettize_bits=6, palettize_min_elements=256)
    artifact, failures = convert(part, tmp_path, config)
    assert failures == []
    spec = artifact.spec
    assert spec["type"] == "mlProgram" and spec["specification_version"] == 8 and spec["opset"] == "CoreML7"
    assert spec["inputs"] == [{"name": "latent", "shape": [1, 16, 8, 8], "dtype": "float32"}]
    assert spec["outputs"] == [{"name": "image", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert spec["fp16_fraction"] > 0.9
    assert spec["ops"]["conv"] == 2 + 2 * 2 * 3 + 2 * 2  # in/out convs, 3 res blocks x 2 separable, 2 ups
    assert "constexpr_lut_to_dense" not in spec["ops"]
    pal = artifact.palettized
    assert pal["bits"] == 6 and pal["spec"]["ops"]["constexpr_lut_to_dense"] >= 1
    assert pal["bytes"] < pal["bytes_before"] == artifact.bytes
    assert (tmp_path / "decoder.mlpackage" / "Manifest.json").is_file()
    assert (tmp_path / "decoder.pal6.mlpackage").is_dir()
    if not ON_MAC:
        assert artifact.prediction_parity == {"status": REQUIRES_MACOS, "platform": sys.platform}
        assert pal["prediction_parity"]["status"] == REQUIRES_MACOS
    else:
        assert artifact.prediction_parity["passed"], artifact.prediction_parity


def test_unet_package_uses_split_einsum_attention(tmp_path):
    cfg = get_preset("toy-smoke", SMALL_UNET)
    torch.manual_seed(0)
    part = unet_part(randomize_zero_init(SnapGenUNet(cfg.unet)), cfg, 8)
    artifact, failures = convert(part, tmp_path, ExportConfig(**FAST))
    assert failures == [] and artifact.swap_parity["passed"] and artifact.swap_parity["max_abs"] < 1e-5
    spec = artifact.spec
    assert [(f["name"], f["shape"]) for f in spec["inputs"]] == [
        ("x", [1, 16, 8, 8]), ("t", [1]), ("context", [1, 8, 32]), ("pooled", [1, 32])]
    assert [(f["name"], f["shape"]) for f in spec["outputs"]] == [("v", [1, 16, 8, 8])]
    # split-einsum: one softmax per head per attention module (4 modules x self+cross x 2 heads)
    assert spec["ops"]["softmax"] == 4 * 2 * 2 == _heads(part)
    assert spec["fp16_fraction"] > 0.9 and spec["metadata"]["snapgen.attention"] == "split_einsum"


def test_text_encoder_package_takes_int32_token_ids(tmp_path):
    from tests.unit.test_export_onnx import tiny_clip

    part = text_encoder_part(tiny_clip(), 77)
    artifact, failures = convert(part, tmp_path, ExportConfig(**FAST))
    assert failures == []
    assert artifact.spec["inputs"] == [{"name": "input_ids", "shape": [1, 16], "dtype": "int32"}]
    assert [f["name"] for f in artifact.spec["outputs"]] == ["text_embeds", "last_hidden_state"]
    assert artifact.spec["outputs"][1]["shape"] == [1, 16, 32]


def test_spec_check_names_every_mismatch():
    cfg = get_preset("toy-smoke")
    part = decoder_part(TinyDecoder(cfg.decoder), cfg)
    spec = {"type": "neuralNetwork", "specification_version": 7, "fp16_fraction": 0.2, "ops": {},
            "inputs": [{"name": "z", "shape": [1, 16, 8, 8]}], "outputs": [{"name": "image"}]}
    with pytest.raises(SpecCheckError) as info:
        check_spec(spec, part, part.inputs(1, 0), ExportConfig(), palettized=True)
    message = str(info.value)
    for needle in ("'decoder'", "not an ML Program", "specification version 7 < 8", "inputs [('z'",
                   "FP16 compute precision", "constexpr_lut_to_dense"):
        assert needle in message


def test_export_model_with_coreml_writes_packages_and_notes_macos(tmp_path):
    cfg = get_preset("toy-smoke")
    torch.manual_seed(0)
    ckpt = save_model(randomize_zero_init(SnapGenUNet(cfg.unet)), tmp_path / "unet.safetensors", preset=cfg)
    report = export_model(load_inputs(ckpt), tmp_path / "export", ExportConfig(**FAST), formats=("coreml",),
                          parts=("decoder",))
    assert report["passed"] and "onnx" not in report["parts"]["decoder"]
    assert (tmp_path / "export" / "decoder.mlpackage").is_dir()
    assert ("requires macOS" in report["coreml_note"]) != ON_MAC
    assert "requires macOS" in (tmp_path / "export" / "report.md").read_text() or ON_MAC


def test_a_failing_torch_swap_blocks_the_coreml_export(tmp_path, monkeypatch):
    """If the swapped graph drifted from the model, the package must not be written as a success."""
    from snapgen_model.export import ParityError

    original = ExportAttention._split_einsum

    def drifted(self, q, k, v):
        return original(self, q, k, v) * 1.1

    monkeypatch.setattr(ExportAttention, "_split_einsum", drifted)
    monkeypatch.setattr(coreml_export, "_convert", lambda *a, **k: pytest.fail("a failed swap must not be converted"))
    cfg = get_preset("toy-smoke", SMALL_UNET)
    torch.manual_seed(0)
    ckpt = save_model(randomize_zero_init(SnapGenUNet(cfg.unet)), tmp_path / "unet.safetensors", preset=cfg)
    with pytest.raises(ParityError, match=r"unet \(coreml torch-swap \(split_einsum\)\): max_abs"):
        export_model(load_inputs(ckpt), tmp_path / "export", ExportConfig(**FAST), formats=("coreml",),
                     parts=("unet",))
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_toy_unet_package_palettized_to_4_bits(tmp_path):
    cfg = get_preset("toy-smoke")
    torch.manual_seed(0)
    part = unet_part(randomize_zero_init(SnapGenUNet(cfg.unet)), cfg, 8)
    artifact, failures = convert(part, tmp_path, ExportConfig(**FAST, palettize_bits=4, palettize_min_elements=512))
    assert failures == []
    assert artifact.palettized["bytes"] < 0.8 * artifact.bytes
    assert artifact.spec["ops"]["softmax"] == _heads(part)  # split einsum: one softmax per head
