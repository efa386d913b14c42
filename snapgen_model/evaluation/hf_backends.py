"""Production scorer backends loaded from local transformers folders (never downloaded at run time).

* `Mask2FormerDetector`: COCO instance segmentation (GenEval's detector), boxes from the masks;
* `ClipColourClassifier`: CLIP zero-shot colour over GenEval's ten colour names with GenEval's
  three prompt templates, on the object's crop pasted on a grey (#999) canvas through its mask;
* `ClipEmbedder`: normalised CLIP image and text embeddings (the CLIP score);
* `TransformersVQA`: a yes/no VQA model (e.g. BLIP VQA) for DPG-Bench.

Every loader checks the folder first and names what is missing, so a wrong path fails with a
message rather than an attempt to reach the Hub.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from snapgen_model.evaluation.dpg import DPGQuestion
from snapgen_model.evaluation.geneval import COLORS, Detection, Detections

COLOUR_TEMPLATES: tuple[str, ...] = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}",
                                     "a photo of a {c} object")
CROP_BACKGROUND = "#999"  # GenEval's canvas for masked crops
# COCO label names that GenEval's object_names.txt spells differently
COCO_TO_GENEVAL: dict[str, str] = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


class BackendUnavailable(FileNotFoundError):
    """A scorer model is not available at the given path."""


def check_model_dir(path: str | os.PathLike | None, what: str, model_types: Sequence[str]) -> Path:
    """The folder of a `save_pretrained` model, after checking it exists and holds the right type."""
    if not path:
        raise BackendUnavailable(f"{what}: no model path given (pass a local folder saved with save_pretrained; "
                                 "snapgen never downloads models at run time)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise BackendUnavailable(f"{what}: model folder {str(folder)!r} does not exist")
    config = folder / "config.json"
    if not config.is_file():
        raise BackendUnavailable(f"{what}: {str(folder)!r} has no config.json (not a save_pretrained folder)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in model_types:
        raise ValueError(f"{what}: {str(folder)!r} holds a {model_type!r} model; expected one of {list(model_types)}")
    return folder


def _pooled(output: Any) -> torch.Tensor:
    """Projected embeddings from get_*_features (a tensor, or an output whose pooler_output holds them)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ----------------------------------------------------------------------------- CLIP

class ClipEmbedder:
    """Normalised CLIP embeddings from a local CLIP folder."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoProcessor, CLIPModel

        folder = check_model_dir(path, "CLIP", ("clip",))
        self.model = CLIPModel.from_pretrained(str(folder)).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(str(folder))
        self.device, self.batch_size, self.path = device, batch_size, str(folder)

    @torch.inference_mode()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm image embeddings."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[i:i + self.batch_size]), return_tensors="pt")["pixel_values"]
            out.append(_pooled(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)

    @torch.inference_mode()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings (texts truncated to the model's context)."""
        out = []
        limit = self.model.config.text_config.max_position_embeddings
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor(text=list(texts[i:i + self.batch_size]), return_tensors="pt", padding=True,
                                 truncation=True, max_length=limit)
            feats = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                 attention_mask=tok["attention_mask"].to(self.device))
            out.append(_pooled(feats))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)


def masked_crop(image: Image.Image, det: Detection) -> Image.Image:
    """The detection's box crop; pixels outside its mask (if any) replaced by GenEval's grey."""
    if det.mask is not None:
        canvas = Image.new("RGB", image.size, CROP_BACKGROUND)
        image = Image.composite(image, canvas, Image.fromarray(np.asarray(det.mask, dtype=np.uint8) * 255))
    x0, y0, x1, y1 = (int(round(v)) for v in det.box)
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


class ClipColourClassifier:
    """GenEval's colour step: CLIP zero-shot over COLORS with three templates per colour."""

    name = "clip-colour"

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        self.clip = ClipEmbedder(path, device)

    @functools.lru_cache(maxsize=256)
    def _weights(self, classname: str) -> torch.Tensor:
        """(D, 10) classifier: per colour, the normalised mean of its normalised template embeddings."""
        columns = []
        for colour in COLORS:
            emb = self.clip.texts([t.format(c=colour, obj=classname) for t in COLOUR_TEMPLATES]).mean(0)
            columns.append(emb / emb.norm())
        return torch.stack(columns, dim=1)

    def classify(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]:
        if not detections:
            return []
        feats = self.clip.images([masked_crop(image, d) for d in detections])  # (N, D)
        return [COLORS[int(i)] for i in (feats @ self._weights(classname)).argmax(1)]


# ----------------------------------------------------------------------------- Mask2Former

class Mask2FormerDetector:
    """COCO instance segmentation with a transformers Mask2Former; box = tight box of the mask.
    Label names are mapped to GenEval's class names (COCO_TO_GENEVAL, then `label_map`)."""

    name = "mask2former"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", min_score: float = 0.05,
                 label_map: dict[str, str] | None = None) -> None:
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        folder = check_model_dir(path, "Mask2Former detector", ("mask2former",))
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(str(folder)).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(str(folder))
        self.device, self.min_score = device, min_score
        names = COCO_TO_GENEVAL | (label_map or {})
        self.labels = {int(k): names.get(v, v) for k, v in self.model.config.id2label.items()}

    @torch.inference_mode()
    def detect(self, image: Image.Image) -> Detections:
        inputs = self.processor(images=[image], return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.min_score, target_sizes=[image.size[::-1]], return_binary_maps=True)[0]
        found: Detections = {}
        masks = result["segmentation"]
        for info in result["segments_info"]:
            mask = masks[info["id"]].cpu().numpy().astype(bool)
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            name = self.labels[int(info["label_id"])]
            found.setdefault(name, []).append(Detection(box, float(info["score"]), mask))
        return found


# ----------------------------------------------------------------------------- VQA

class TransformersVQA:
    """Yes/no answers from a local transformers VQA model (BLIP VQA); answers are lower-cased."""

    name = "transformers-vqa"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", max_new_tokens: int = 5) -> None:
        from transformers import AutoProcessor, BlipForQuestionAnswering

        folder = check_model_dir(path, "DPG-Bench VQA model", ("blip",))
        self.model = BlipForQuestionAnswering.from_pretrained(str(folder)).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(str(folder))
        self.device, self.max_new_tokens = device, max_new_tokens

    @torch.inference_mode()
    def answer(self, image: Image.Image, question: DPGQuestion) -> str:
        inputs = self.processor(images=image, text=question.question, return_tensors="pt").to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return self.processor.decode(ids[0], skip_special_tokens=True).strip().lower()
