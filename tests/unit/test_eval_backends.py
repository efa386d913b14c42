"""Production scorer adapters through their real loading path, with tiny random transformers models
saved locally (nothing is downloaded): Mask2Former detector, CLIP colours, CLIP score, VQA errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snapgen_model.evaluation import geneval
from snapgen_model.evaluation.clip_score import ClipScoreConfig, clip_score
from snapgen_model.evaluation.geneval import COLORS, Detection, GenEvalBackend
from snapgen_model.evaluation.hf_backends import (
    BackendUnavailable,
    ClipColourClassifier,
    Mask2FormerDetector,
    TransformersVQA,
    check_model_dir,
    masked_crop,
)

LABELS = {0: "circle", 1: "square", 2: "triangle"}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer(vocab=vocab, merges=[]))
    out = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_mask2former(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=64, dim_feedforward=64, decoder_layers=2, encoder_layers=1,
                            num_attention_heads=2, num_queries=6, common_stride=4, id2label=LABELS,
                            label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-m2f")
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(out)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(out)
    return out


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_loading_errors_name_the_problem(tmp_path, tiny_clip) -> None:
    with pytest.raises(BackendUnavailable, match="no model path"):
        check_model_dir(None, "CLIP", ("clip",))
    with pytest.raises(BackendUnavailable, match="does not exist"):
        Mask2FormerDetector(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendUnavailable, match="no config.json"):
        TransformersVQA(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds a 'clip' model"):
        Mask2FormerDetector(tiny_clip)
    with pytest.raises(ValueError, match="expected one of \\['blip'\\]"):
        TransformersVQA(tiny_clip)


def test_mask2former_detector_gives_boxes_from_masks(tiny_mask2former) -> None:
    found = Mask2FormerDetector(tiny_mask2former, min_score=0.0).detect(_image())
    dets = [d for v in found.values() for d in v]
    assert set(found) <= set(LABELS.values()) and dets
    for d in dets:
        ys, xs = np.nonzero(d.mask)
        assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) and 0 <= d.score <= 1


def test_clip_colour_classifier_and_masked_crop(tiny_clip) -> None:
    clf = ClipColourClassifier(tiny_clip)
    dets = [Detection((4, 4, 20, 20), 0.9), Detection((30, 30, 60, 50), 0.8, mask=np.ones((64, 64), bool))]
    colours = clf.classify(_image(), dets, "circle")
    assert len(colours) == 2 and set(colours) <= set(COLORS)
    mask = np.zeros((64, 64), bool)
    mask[10:12, 10:12] = True
    crop = np.asarray(masked_crop(_image(), Detection((8, 8, 14, 14), 1.0, mask=mask)))
    assert crop.shape == (6, 6, 3) and (crop[0, 0] == 0x99).all() and not (crop[2, 2] == 0x99).all()


def test_production_backend_runs_the_same_rules(tiny_mask2former, tiny_clip) -> None:
    backend = GenEvalBackend(Mask2FormerDetector(tiny_mask2former, min_score=0.0), ClipColourClassifier(tiny_clip))
    meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"}
    row = geneval.score_pil(_image(1), meta, backend)
    assert set(row) == set(geneval.RESULT_FIELDS) and isinstance(row["correct"], bool)
    assert all(len(box) == 5 for boxes in json.loads(row["details"]).values() for box in boxes)
    assert backend.name == "mask2former+clip-colour"


def test_clip_score_not_available_without_a_model_and_real_with_one(tiny_clip) -> None:
    images = [np.asarray(_image(i)) for i in range(3)]
    prompts = ["a red circle", "two squares", "a blue triangle"]
    missing = clip_score(images, prompts, ClipScoreConfig())
    assert not missing.available and missing.value is None and "no model path" in missing.reason
    assert missing.to_dict()["value"] is None
    result = clip_score(images, prompts, ClipScoreConfig(model_path=str(tiny_clip)))
    assert result.available and result.images == 3 and 0.0 <= result.value <= 100.0
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip_score(images, prompts[:2], ClipScoreConfig(model_path=str(tiny_clip)))
