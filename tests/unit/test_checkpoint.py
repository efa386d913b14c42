"""Checkpoints: safetensors + config metadata, exact round trip, refusal of bad files."""
from __future__ import annotations

import pickle

import pytest
import torch

from snapgen_model.inspect import example_inputs
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.presets import get_preset
from snapgen_model.storage.checkpoint import CheckpointError, load_model, read_preset, save_model
from tests.fixtures.checkpoints import randomize_zero_init


@pytest.fixture
def toy_unet():
    torch.manual_seed(0)
    return randomize_zero_init(SnapGenUNet(get_preset("toy-smoke").unet))


def test_round_trip_rebuilds_model_and_reproduces_outputs(tmp_path, toy_unet):
    cfg = get_preset("toy-smoke")
    path = save_model(toy_unet, tmp_path / "unet.safetensors", preset=cfg)
    loaded = load_model(path)
    assert isinstance(loaded, SnapGenUNet) and loaded.config == toy_unet.config
    x, t, cond = example_inputs(cfg, batch=2, device="cpu")
    assert torch.equal(toy_unet(x, t, **cond), loaded(x, t, **cond))
    assert read_preset(path) == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_decoder_round_trip(tmp_path):
    dec = TinyDecoder(get_preset("toy").decoder)
    loaded = load_model(save_model(dec, tmp_path / "dec.safetensors"), expected_kind="TinyDecoder")
    z = torch.randn(1, 16, 16, 16)
    assert torch.equal(dec(z), loaded(z))


def test_pickle_is_refused(tmp_path, toy_unet):
    zip_path = tmp_path / "model.pt"
    torch.save(toy_unet.state_dict(), zip_path)
    with pytest.raises(CheckpointError, match="pickled torch checkpoint; snapgen loads safetensors only"):
        load_model(zip_path)
    raw = tmp_path / "model.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(raw)


@pytest.mark.parametrize("first_bytes", [b"\x80\x02", b"PK"])
def test_a_safetensors_header_whose_length_reads_like_a_pickle_loads(tmp_path, first_bytes):
    """The 8-byte header length of a real safetensors file can begin with a pickle's (0x80 0x02: 640 bytes)
    or a zip's bytes ("PK": 19,280 bytes); such a file is an intact checkpoint, not a pickle."""
    from safetensors.torch import save_file

    from snapgen_model.storage.checkpoint import check_safetensors

    target = int.from_bytes(first_bytes, "little")
    path = tmp_path / "w.safetensors"
    for pad in range(0, target):
        save_file({"w": torch.zeros(3)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:len(first_bytes)] == first_bytes:
            break
    assert path.read_bytes()[:len(first_bytes)] == first_bytes
    check_safetensors(path)  # no CheckpointError


def test_truncated_file_is_refused(tmp_path, toy_unet):
    path = save_model(toy_unet, tmp_path / "unet.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        load_model(path)


def test_other_architecture_is_refused(tmp_path, toy_unet):
    path = save_model(toy_unet, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="holds a SnapGenUNet, expected a TinyDecoder"):
        load_model(path, expected_kind="TinyDecoder")
    # weights of a different-size UNet do not fit
    from snapgen_model.storage.checkpoint import load_weights
    bigger = SnapGenUNet(get_preset("toy").unet)
    with pytest.raises(CheckpointError, match="weights do not fit SnapGenUNet"):
        load_weights(bigger, path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: checkpoint file does not exist"):
        load_model(tmp_path / "nope.safetensors")
