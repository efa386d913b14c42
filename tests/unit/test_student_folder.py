"""The student folder has one owner (snapgen_model/artifacts/student.py): names, card, save and load."""
from __future__ import annotations

import json

import pytest
import torch

from snapgen_model.artifacts import student as sf
from snapgen_model.distill.text import Encoded, TextConditioner, TextConditionerConfig
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.presets import get_preset
from snapgen_model.storage.checkpoint import load_model, read_metadata


def _parts(seed: int = 0):
    cfg = get_preset("toy-smoke")
    torch.manual_seed(seed)
    cond = TextConditioner(TextConditionerConfig(width=cfg.unet.context_dim, pooled_dim=cfg.unet.pooled_dim,
                                                 null="learned"), {"clip": (24, 24), "t5": (40, 0)})
    for p in cond.parameters():
        torch.nn.init.normal_(p)
    return cfg, SnapGenUNet(cfg.unet), cond


def test_a_student_folder_round_trips_through_the_checkpoint_registry(tmp_path):
    cfg, unet, cond = _parts()
    _, raw_unet, raw_cond = _parts(1)
    paths = sf.save_student(tmp_path, cfg, unet, cond, raw_unet=raw_unet, raw_conditioner=raw_cond)
    assert {k: p.rsplit("/", 1)[-1] for k, p in paths.items()} == {
        "unet": sf.UNET, "unet_raw": sf.UNET_RAW, "conditioner": sf.CONDITIONER, "conditioner_raw": sf.CONDITIONER_RAW}
    assert not sf.is_student_folder(tmp_path)  # weights without the card: not complete yet
    sf.write_card(tmp_path, sf.make_card("pretrain", "k1", "run", {"bundle_uri": "file:///b", "encoders": [{}],
                                                                   "bundle_id": "b", "key": "c"}))
    assert sf.is_student_folder(tmp_path) and sf.read_card(tmp_path)["kind"] == sf.CARD_KIND
    preset, unet2, cond2 = sf.load_student(tmp_path)
    assert preset == cfg and cond2.names == ["clip", "t5"] and cond2.cfg == cond.cfg
    assert all(torch.equal(a, b) for a, b in zip(cond.state_dict().values(), cond2.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), unet2.state_dict().values()))
    raw = load_model(tmp_path / sf.CONDITIONER_RAW, expected_kind="TextConditioner")  # the registry rebuilds it
    encoded = {"clip": Encoded(torch.randn(2, 5, 24), torch.randn(2, 24), torch.ones(2, 5)),
               "t5": Encoded(torch.randn(2, 7, 40), None, torch.ones(2, 7))}
    assert torch.equal(raw(encoded)["context"], raw_cond(encoded)["context"])


def test_a_conditioner_saved_before_the_registry_still_loads(tmp_path):
    """Files written by the earlier save_conditioner (own metadata, no format tag) load unchanged."""
    from safetensors.torch import save_file

    _, _, cond = _parts()
    meta = {"snapgen.kind": "TextConditioner", "snapgen.encoders": json.dumps({"clip": [24, 24], "t5": [40, 0]}),
            "snapgen.config": cond.cfg.to_json()}
    save_file({k: v.contiguous() for k, v in cond.state_dict().items()}, str(tmp_path / "c.safetensors"), metadata=meta)
    loaded = sf.load_conditioner(tmp_path / "c.safetensors")
    assert loaded.encoder_dims() == {"clip": (24, 24), "t5": (40, 0)}
    assert "snapgen.format" in read_metadata(sf.save_conditioner(loaded, tmp_path / "d.safetensors"))


def test_a_card_without_what_evaluation_needs_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a student folder"):
        sf.read_card(tmp_path)
    sf.write_card(tmp_path, sf.make_card("pretrain", "k", "r", {"bundle_uri": "file:///b"}))
    with pytest.raises(ValueError, match="field 'encoders' is missing"):
        sf.read_card(tmp_path)
