"""ONNX export (DESIGN.md 6): parity against PyTorch in ONNX Runtime for the toy and a reduced
full-architecture UNet, the tiny decoder and a CLIP text encoder; dynamic batch; FP16 and external
data; a few-step generation through ORT; idempotent skip; a perturbed export is blocked."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import onnx
import pytest
import torch

from snapgen_model.config_base import ConfigError
from snapgen_model.export import ExportConfig, ParityError, export_key, export_model, load_inputs
from snapgen_model.export import onnx_export, parity, runtime
from snapgen_model.export.parts import decoder_part, text_encoder_part, unet_part
from snapgen_model.export.pipeline import MANIFEST, load_text_encoder
from snapgen_model.inspect import count_params
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.presets import get_preset
from snapgen_model.storage.checkpoint import save_model
from tests.fixtures.checkpoints import randomize_zero_init

TOKENS = 8
FAST = dict(text_length=TOKENS, latency_warmup=1, latency_runs=3, threads=1)


def tiny_clip(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, projection_dim=24,
                            bos_token_id=998, eos_token_id=999, pad_token_id=1)
    return CLIPTextModelWithProjection(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, 2 OpenMP threads stall each other's small ops."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A toy-smoke UNet checkpoint (preset stored with it) exported once: UNet + decoder, ONNX."""
    root = tmp_path_factory.mktemp("export-smoke")
    cfg = get_preset("toy-smoke")
    torch.manual_seed(0)
    ckpt = save_model(randomize_zero_init(SnapGenUNet(cfg.unet)), root / "unet.safetensors", preset=cfg)
    inputs = load_inputs(ckpt)
    config = ExportConfig(**FAST)
    report = export_model(inputs, root / "export", config, formats=("onnx",), parts=("unet", "decoder"))
    return {"root": root, "ckpt": ckpt, "inputs": inputs, "config": config, "report": report, "out": root / "export"}


def test_toy_unet_and_decoder_match_pytorch_in_onnx_runtime(smoke):
    report, out = smoke["report"], smoke["out"]
    assert report["passed"] and not report["skipped"]
    for name, side in (("unet", 8), ("decoder", 8)):
        static = report["parts"][name]["onnx"]["static"]
        assert static["opset"] >= 18
        assert static["inputs"][0]["shape"] == [1, 16, side, side]
        assert static["parity"]["passed"] and static["parity"]["max_abs"] < 1e-4 and static["parity"]["psnr"] > 100
        onnx.checker.check_model(str(out / static["path"]), full_check=True)
        dynamic = report["parts"][name]["onnx"]["dynamic_batch"]
        assert dynamic["inputs"][0]["shape"][0] == "batch"
        assert dynamic["parity"]["batch"] == 3 and dynamic["parity"]["max_abs"] < 1e-4
    # independent re-check of the written UNet file on new seeded inputs
    part = unet_part(smoke["inputs"].unet, smoke["inputs"].preset, TOKENS)
    sess = runtime.session(out / "unet.onnx")
    x = part.inputs(1, 123)
    got = runtime.run(sess, x)[0]
    want = part.reference(x)[0].numpy()
    assert np.abs(got - want).max() < 1e-4
    assert report["parts"]["unet"]["params"] == count_params(smoke["inputs"].unet)


def test_dynamic_batch_graph_runs_any_batch_and_static_graph_does_not(smoke):
    part = unet_part(smoke["inputs"].unet, smoke["inputs"].preset, TOKENS)
    dynamic = runtime.session(smoke["out"] / "unet.dynamic.onnx")
    for batch in (1, 2, 5):
        x = part.inputs(batch, batch)
        got = runtime.run(dynamic, x)[0]
        assert got.shape[0] == batch
        assert parity.compare(got, part.reference(x)[0]).max_abs < 1e-4
    with pytest.raises(Exception, match="(?i)dimension|shape|got invalid"):
        runtime.run(runtime.session(smoke["out"] / "unet.onnx"), part.inputs(2, 0))


def test_few_step_generation_through_onnx_runtime_matches_pytorch(smoke):
    gen = smoke["report"]["generation"]
    assert gen["passed"] and gen["steps"] == 4 and gen["sampler"] == "few_step"
    assert gen["image_psnr"] >= smoke["config"].generation_min_psnr
    assert gen["latent"]["max_abs"] < 1e-4
    assert gen["image_max_abs_uint8"] <= 1


def test_report_files_sizes_latency_and_paper_budget(smoke):
    out, report = smoke["out"], smoke["report"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["export_key"] == report["export_key"]
    static = report["parts"]["unet"]["onnx"]["static"]
    assert static["bytes"] == os.path.getsize(out / "unet.onnx")
    assert static["latency"]["ort_ms"] > 0 and static["latency"]["torch_ms"] > 0
    assert report["parts"]["unet"]["macs"] > 0 and report["parts"]["decoder"]["macs"] > 0
    budget = report["paper_budget"]
    assert budget["paper"]["unet_ms_per_step"] == 274.0 and budget["paper"]["decoder_ms"] == 120.0
    assert budget["paper"]["end_to_end_s"] == 1.4
    assert budget["ours"]["unet"]["params"] == report["parts"]["unet"]["params"]
    markdown = (out / "report.md").read_text()
    assert "274 ms/step" in markdown and "unet.dynamic.onnx" in markdown and "PSNR" in markdown
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["sizes"]["unet.onnx"] == static["bytes"]
    assert report["skipped_parts"] == {}


def test_export_is_skipped_for_an_unchanged_checkpoint_and_redone_for_a_changed_one(smoke):
    out = smoke["out"]
    stamp = (out / MANIFEST).stat().st_mtime_ns
    again = export_model(load_inputs(smoke["ckpt"]), out, smoke["config"], formats=("onnx",), parts=("unet", "decoder"))
    assert again["skipped"] and again["export_key"] == smoke["report"]["export_key"]
    assert (out / MANIFEST).stat().st_mtime_ns == stamp
    # a changed weight, a changed export config or another format changes the key
    unet = SnapGenUNet(smoke["inputs"].unet.config)
    unet.load_state_dict(smoke["inputs"].unet.state_dict())
    with torch.no_grad():
        unet.conv_out.bias.add_(1e-3)
    changed = save_model(unet, smoke["root"] / "changed.safetensors", preset=smoke["inputs"].preset)
    key = smoke["report"]["export_key"]
    parts = ("unet", "decoder")
    assert export_key(load_inputs(changed), smoke["config"], ("onnx",), parts) != key
    assert export_key(smoke["inputs"], ExportConfig(**FAST, min_psnr=50.0), ("onnx",), parts) != key
    assert export_key(smoke["inputs"], smoke["config"], ("onnx", "coreml"), parts) != key
    assert export_key(load_inputs(smoke["ckpt"]), smoke["config"], ("onnx",), parts) == key


def _perturbing_save(original):
    def save(model, path, external):
        if path.name.startswith("decoder"):
            init = next(t for t in model.graph.initializer if len(t.dims) == 4)  # a conv weight
            array = onnx.numpy_helper.to_array(init) * 1.5
            init.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), init.name))
        return original(model, path, external)
    return save


def test_a_perturbed_export_is_blocked_and_the_previous_export_kept(tmp_path, monkeypatch):
    cfg = get_preset("toy-smoke")
    torch.manual_seed(1)
    ckpt = save_model(randomize_zero_init(SnapGenUNet(cfg.unet)), tmp_path / "unet.safetensors", preset=cfg)
    inputs = load_inputs(ckpt)
    config = ExportConfig(**FAST, dynamic_batch=False)
    out = tmp_path / "export"
    good = export_model(inputs, out, config, parts=("decoder",))
    assert good["passed"] and (out / "decoder.onnx").is_file()
    before = (out / MANIFEST).read_text()
    monkeypatch.setattr(onnx_export, "save_model", _perturbing_save(onnx_export.save_model))
    with pytest.raises(ParityError) as info:
        export_model(inputs, out, config, parts=("decoder",), force=True)
    message = str(info.value)
    assert "decoder (onnx static)" in message and "psnr" in message and "threshold 60" in message
    assert "max_abs" in message and "export blocked" in message
    failure = info.value.failures[0]
    assert failure.part == "decoder" and failure.value > failure.threshold
    assert info.value.report["passed"] is False
    assert (out / MANIFEST).read_text() == before  # the previous good export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "unet.safetensors"]  # no temp folders left
    with pytest.raises(ParityError):  # a fresh destination gets nothing at all
        export_model(inputs, tmp_path / "fresh", config, parts=("decoder",))
    assert not (tmp_path / "fresh").exists()


def test_reduced_full_architecture_unet_exports_with_dynamic_batch(tmp_path):
    """snapgen-1024's architecture (3 stages, depth [1,2,4], mid 4, MQA, QK RMSNorm, RoPE, separable
    convs, f=8 latent) with narrow channels at 64 px."""
    cfg = get_preset("snapgen-1024", ["image_size=64", "unet.channels=[64,64,128]", "unet.time_embed_dim=128",
                                      "unet.context_dim=64", "unet.pooled_dim=64"])
    torch.manual_seed(0)
    unet = randomize_zero_init(SnapGenUNet(cfg.unet)).eval()
    assert unet.config.transformer_depth == (1, 2, 4) and unet.config.kv_heads == 1
    part = unet_part(unet, cfg, TOKENS)
    artifact = onnx_export.export_onnx(part, tmp_path, ExportConfig(**FAST), dynamic=True)
    sess = runtime.session(artifact.path)
    for batch in (1, 2):
        x = part.inputs(batch, 7)
        metrics = parity.compare_all(runtime.run(sess, x), part.reference(x))
        assert metrics.max_abs < 1e-4 and metrics.psnr > 100, metrics


def test_class_conditional_unet_takes_int64_labels(tmp_path):
    cfg = get_preset("toy-smoke", ["task=class-conditional", "unet.conditioning=class", "unet.num_classes=10",
                                   "unet.transformer_depth=[0,0,1]", "unet.mid_transformer_depth=1"])
    torch.manual_seed(0)
    part = unet_part(randomize_zero_init(SnapGenUNet(cfg.unet)), cfg, TOKENS)
    assert part.input_names == ("x", "t", "labels")
    artifact = onnx_export.export_onnx(part, tmp_path, ExportConfig(**FAST), dynamic=False)
    assert artifact.inputs[2] == {"name": "labels", "shape": [1], "dtype": "int64"}
    sess = runtime.session(artifact.path)
    for seed in (0, 1):
        x = part.inputs(1, seed)
        assert parity.compare_all(runtime.run(sess, x), part.reference(x)).max_abs < 1e-4


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_numerics(tmp_path):
    """torch 2.13's default exporter (torch.export + onnxscript): slower to export, smaller graph."""
    cfg = get_preset("toy-smoke")
    torch.manual_seed(0)
    parts = [unet_part(randomize_zero_init(SnapGenUNet(cfg.unet)), cfg, TOKENS), decoder_part(TinyDecoder(cfg.decoder), cfg)]
    dynamo, script = ExportConfig(**FAST, onnx_exporter="dynamo"), ExportConfig(**FAST)
    for part in parts:
        artifact = onnx_export.export_onnx(part, tmp_path, dynamo, dynamic=True)
        assert artifact.exporter == "dynamo" and artifact.inputs[0]["shape"][0] == "batch"
        sess = runtime.session(artifact.path)
        for batch in (1, 3):
            x = part.inputs(batch, 11)
            assert parity.compare_all(runtime.run(sess, x), part.reference(x)).max_abs < 1e-4
        if part.name == "unet":
            baseline = onnx_export.export_onnx(part, tmp_path / "ts", script, dynamic=True)
            assert artifact.nodes < baseline.nodes


def test_text_encoder_exports_from_a_pretrained_folder(tmp_path):
    tiny_clip().save_pretrained(tmp_path / "clip")
    encoder = load_text_encoder(tmp_path / "clip")
    part = text_encoder_part(encoder, 77)
    assert part.inputs(1, 0)[0].shape == (1, 16)  # capped at max_position_embeddings
    config = ExportConfig(**FAST)
    for dynamic in (False, True):
        artifact = onnx_export.export_onnx(part, tmp_path, config, dynamic=dynamic)
        assert [o["name"] for o in artifact.outputs] == ["text_embeds", "last_hidden_state"]
        sess = runtime.session(artifact.path)
        x = part.inputs(3 if dynamic else 1, 5)
        metrics = parity.compare_all(runtime.run(sess, x), part.reference(x))
        assert metrics.max_abs < 1e-4, metrics


def test_fp16_variant_and_external_data(tmp_path):
    cfg = get_preset("toy-smoke")
    torch.manual_seed(0)
    part = decoder_part(TinyDecoder(cfg.decoder), cfg)
    config = ExportConfig(**FAST, external_data_bytes=1000, onnx_fp16=True)
    static = onnx_export.export_onnx(part, tmp_path, config, dynamic=False)
    assert static.external_data and static.files == ["decoder.onnx", "decoder.onnx.data"]
    assert os.path.getsize(tmp_path / "decoder.onnx.data") > 20_000  # the conv weights live outside the proto
    graph = onnx.load(str(static.path), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    half = onnx_export.convert_fp16(static.path, tmp_path, "decoder", config)
    model = onnx.load(str(half.path))
    assert {t.data_type for t in model.graph.initializer if len(t.dims) == 4} == {onnx.TensorProto.FLOAT16}
    assert [i["dtype"] for i in half.inputs] == ["float"]  # fp32 I/O kept
    x = part.inputs(1, 3)
    ref = part.reference(x)
    fp32 = parity.compare_all(runtime.run(runtime.session(static.path), x), ref)
    fp16 = parity.compare_all(runtime.run(runtime.session(half.path), x), ref)
    assert fp32.max_abs < 1e-4
    assert 1e-5 < fp16.max_abs < config.fp16_max_abs and fp16.psnr > config.fp16_min_psnr


def test_parity_metrics_and_gate_messages():
    ref = np.array([1.0, -2.0, 0.5, 0.0])
    m = parity.compare(ref + np.array([0.0, 0.1, 0.0, 0.0]), ref)
    assert m.max_abs == pytest.approx(0.1)
    assert m.rel == pytest.approx(0.1 / np.linalg.norm(ref))
    assert m.psnr == pytest.approx(10 * np.log10(2.0 ** 2 / 0.05 ** 2))  # peak max |ref| = 2, mse = 0.1^2 / 4
    assert parity.compare(np.array([np.nan, 0, 0, 0]), ref).psnr == float("-inf")
    limits = parity.thresholds(ExportConfig(), "fp32")
    failures = parity.gate("unet", "onnx static", m, limits)
    assert {f.metric for f in failures} == {"max_abs", "rel", "psnr"}
    error = ParityError(failures, {"passed": False})
    assert "unet (onnx static): psnr 32.04 dB < threshold 60 dB" in str(error)
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error) and clone.failures == failures and clone.report == {"passed": False}
    assert parity.gate("unet", "x", parity.compare(ref, ref), limits) == []


def test_export_config_is_validated():
    with pytest.raises(ConfigError, match="opset"):
        ExportConfig(opset=17)
    with pytest.raises(ConfigError, match="palettize_bits"):
        ExportConfig().with_overrides(["palettize_bits=5"])
    with pytest.raises(ConfigError, match="onnx_exporter"):
        ExportConfig().with_overrides(["onnx_exporter=tf"])
    with pytest.raises(ConfigError, match="formats"):
        export_model(None, "unused", formats=("tflite",))
