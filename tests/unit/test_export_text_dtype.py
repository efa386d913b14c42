"""A shipped release stores its text encoder in fp16; the exporter must load it in float32 (ONNX's
LayerNormalization refused the fp16 scale beside float32 activations: the demo's export failed)."""
from __future__ import annotations

import torch

from snapgen_model.distill.toy_text import build_tiny_clip, build_tokenizer, save_text_encoder
from snapgen_model.export.pipeline import load_text_encoder


def test_an_fp16_text_encoder_folder_is_loaded_in_float32(tmp_path):
    tokenizer = build_tokenizer(["a", "red", "circle"], max_length=8)
    model = build_tiny_clip(tokenizer, hidden=16, layers=1, heads=2, projection=16, max_length=8, seed=0)
    save_text_encoder(model.to(torch.float16), tokenizer, tmp_path / "text_encoder")
    loaded = load_text_encoder(tmp_path / "text_encoder")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    ids = torch.tensor([[0, 1, 2, 3]])
    assert loaded(input_ids=ids).text_embeds.dtype == torch.float32
