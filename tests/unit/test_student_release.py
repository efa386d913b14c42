"""Shipped students: packaging a pretrained student as an fp16 release (checksums, index, immutability),
`release://` URIs, and `pretrain.init` (a run that starts from a trained student instead of random weights)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from snapgen_model.artifacts import student as st
from snapgen_model.distill.cache import CacheConfig
from snapgen_model.distill.teacher import LoadError
from snapgen_model.presets import get_preset
from snapgen_model.training import release as rel
from snapgen_model.training.pretrain import PretrainConfig, PretrainModule, fit
from tests.fixtures import memory_data

PRESET = get_preset("toy-smoke")
CACHE = CacheConfig(targets_per_sample=2)


def data():
    return memory_data.synthetic_data(CACHE, 16, 2, width=24, pooled=24, feat=True)


def cfg(**kw) -> PretrainConfig:
    base = dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1, accelerator="cpu",
                kd={"student_feature": "up1"})
    return PretrainConfig.from_dict(base | kw)


@pytest.fixture(scope="module")
def trained_student(tmp_path_factory):
    """A student folder as pretraining writes it: 4 steps from random init, EMA pair + raw pair + card."""
    root = tmp_path_factory.mktemp("trained")
    result = fit(PRESET, cfg(), data(), CACHE, root / "state")
    module = result["module"]
    folder = root / "student"
    st.save_student(folder, PRESET, module.ema_unet, module.ema_conditioner, raw_unet=module.student,
                    raw_conditioner=module.conditioner)
    st.write_card(folder, {"kind": st.CARD_KIND, "stage": "pretrain", "key": "abc123", "bundle_uri": "file:///nowhere",
                           "bundle_id": "d9060f043813792b", "encoders": [{"name": "clip"}], "dataset_hash": "ff"})
    return folder


@pytest.fixture
def releases(trained_student, tmp_path):
    picture = tmp_path / "grid.png"
    picture.write_bytes(b"\x89PNG fake picture bytes")
    folder = rel.package_student_release(trained_student, "toy-student/v9", card="# student card\n",
                                         teacher="release://toy-teacher/v2", card_files={"grid.png": picture},
                                         extra_record={"guidance": 2.0}, preset_overrides=["sampler.guidance=2.0"],
                                         releases_dir=tmp_path / "releases")
    return tmp_path / "releases", folder


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_student_release_is_fp16_verified_and_indexed(trained_student, releases):
    releases_dir, folder = releases
    assert rel.verify_release("toy-student/v9", releases_dir) == folder
    assert rel.release_folder("release://toy-student/v9", releases_dir) == folder
    assert rel.release_kind("toy-student/v9", releases_dir) == "student"
    for name in (st.UNET, st.CONDITIONER):
        assert {t.dtype for t in load_file(folder / name).values()} == {torch.float16}
    assert not (folder / st.UNET_RAW).exists()  # the EMA pair ships, the raw pair stays with the run
    entry = rel.read_index(releases_dir)["releases"]["toy-student/v9"]
    assert entry["kind"] == "student" and entry["record"] == rel.STUDENT_RECORD and entry["config_hash"] == "abc123"
    record = json.loads((folder / rel.STUDENT_RECORD).read_text())
    assert record["teacher"] == "release://toy-teacher/v2" and record["guidance"] == 2.0
    assert set(record["files"]) == {st.UNET, st.CONDITIONER, st.CARD, rel.CARD_FILE, "card/grid.png"}
    card = st.read_card(folder)  # the shipped card names the teacher release, not the machine it came from
    assert card["bundle_uri"] == "release://toy-teacher/v2" and card["release"] == "toy-student/v9"
    # the fp16 weights load into a float32 student, equal to the source up to fp16 rounding
    preset, unet, conditioner = st.load_student(folder)
    assert preset.sampler.guidance == 2.0 and preset.unet == PRESET.unet
    _, source, _ = st.load_student(trained_student)
    for (k, a), b in zip(unet.state_dict().items(), source.state_dict().values()):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-3, rtol=1e-3), k


def test_a_tampered_student_release_is_refused_naming_the_file(releases):
    releases_dir, folder = releases
    weights = folder / st.UNET
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(LoadError, match="unet_ema.safetensors does not match its sha256 in release.json"):
        rel.release_folder("release://toy-student/v9", releases_dir)
    (folder / "stray.txt").write_text("x")
    weights.write_bytes(bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF])))
    with pytest.raises(LoadError, match="stray.txt is not listed in release.json"):
        rel.verify_release("toy-student/v9", releases_dir)


def test_student_releases_are_immutable_and_keep_their_architecture(trained_student, releases, tmp_path):
    releases_dir, _ = releases
    with pytest.raises(FileExistsError, match="immutable"):
        rel.package_student_release(trained_student, "toy-student/v9", card="x", teacher="release://t",
                                    releases_dir=releases_dir)
    with pytest.raises(ValueError, match="architecture"):
        rel.package_student_release(trained_student, "toy-student/v10", card="x", teacher="release://t",
                                    preset_overrides=["unet.ffn_ratio=4"], releases_dir=releases_dir)
    assert "toy-student/v10" not in rel.read_index(releases_dir)["releases"]
    with pytest.raises(LoadError, match="not a finished student folder"):
        rel.package_student_release(tmp_path, "toy-student/v11", card="x", teacher="release://t",
                                    releases_dir=releases_dir)


def test_release_uris_name_known_releases_only(releases):
    releases_dir, _ = releases
    with pytest.raises(LoadError, match=r"toy-student/v8.*known releases: \['toy-student/v9'\]"):
        rel.release_folder("release://toy-student/v8", releases_dir)
    with pytest.raises(ValueError, match="not a release URI"):
        rel.release_folder("file:///tmp/x", releases_dir)


def test_init_starts_the_run_from_the_students_ema_weights(trained_student, tmp_path):
    """Raw weights, EMA copies and the conditioner all start from the saved EMA pair; without init the same
    seed gives the random initialisation."""
    _, unet, conditioner = st.load_student(trained_student)
    module = PretrainModule(PRESET, cfg(init=str(trained_student)), data(), CACHE)
    assert module.init_folder == trained_student
    for mine, saved in ((module.student, unet), (module.conditioner, conditioner),
                        (module.ema_unet, unet), (module.ema_conditioner, conditioner)):
        a, b = _state(mine), _state(saved)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = PretrainModule(PRESET, cfg(), data(), CACHE)
    assert fresh.init_folder is None
    assert any(not torch.equal(a, b) for a, b in zip(_state(fresh.student).values(), _state(unet).values()))


def test_init_from_a_release_uri_and_a_resumed_run_ignores_it(trained_student, releases, tmp_path, monkeypatch):
    releases_dir, folder = releases
    monkeypatch.setattr(rel, "RELEASES_DIR", releases_dir)  # never the repository's releases/
    run = cfg(init="release://toy-student/v9", steps=4, checkpoint_every=2)
    from tests.fixtures.training import StopAt

    part = fit(PRESET, run, data(), CACHE, tmp_path / "state", callbacks=[StopAt(2)])
    assert part["module"].init_folder == folder
    # resuming loads the saved state: the init is not read again (its folder may be gone by then)
    monkeypatch.setattr(rel, "RELEASES_DIR", tmp_path / "gone")
    resumed = fit(PRESET, run, data(), CACHE, tmp_path / "state")
    assert resumed["step"] == 4 and resumed["module"].init_folder is None


def test_init_that_does_not_fit_is_refused_naming_it(trained_student, tmp_path):
    other = get_preset("toy-smoke", ["unet.channels=[16, 32, 48]"])
    with pytest.raises(ValueError, match=r"pretrain.init=.*do not fit this run's student \(unet.channels"):
        PretrainModule(other, cfg(init=str(trained_student)), data(), CACHE)
    with pytest.raises(ValueError, match=r"pretrain.init=.*unet_ema.safetensors does not exist"):
        PretrainModule(PRESET, cfg(init=str(tmp_path / "missing")), data(), CACHE)


def test_run_key_of_a_random_init_run_is_unchanged_by_the_init_field():
    """Runs from before `pretrain.init` existed keep their key, so their saved state is found and resumed."""
    from tasks.keys import content_key
    from tasks.pretrain import run_key

    manifest = {"key": "cache-key"}
    config = cfg()
    legacy = {k: v for k, v in config.to_dict().items() if k != "init"}
    assert run_key(manifest, "toy-smoke", [], config) == content_key([manifest["key"], "toy-smoke", [], legacy], 16)
    assert run_key(manifest, "toy-smoke", [], cfg(init="release://toy-student/v1")) != run_key(
        manifest, "toy-smoke", [], config)


def test_release_uris_resolve_wherever_a_model_folder_is_named(releases, monkeypatch):
    """`local_folder` (evaluation, distillation, pretrain.init) and the CLI's --model check take release://."""
    from flows.cli_checks import BadInput, check_model
    from tasks.cache import local_folder

    releases_dir, folder = releases
    monkeypatch.setattr(rel, "RELEASES_DIR", releases_dir)
    assert local_folder("release://toy-student/v9") == folder
    check_model("--model", "release://toy-student/v9", settings=None)
    with pytest.raises(BadInput, match=r"--model release://toy-student/v3: .*known releases"):
        check_model("--model", "release://toy-student/v3", settings=None)


def test_the_toy_demo_continues_the_shipped_student_and_a_teacher_is_refused_as_init():
    """The repository's toy-student/v1 verifies (every sha256), and `pretrain.init` must name a student release."""
    from flows.pipeline_config import PipelineConfigError, build_config, resolved_stage_configs

    resolved = resolved_stage_configs(build_config("toy", []))
    assert resolved["pretrain"]["init"] == "release://toy-student/v1" and resolved["pretrain_init"]
    rel.release_folder(resolved["pretrain"]["init"])
    with pytest.raises(PipelineConfigError, match="toy-teacher/v2 holds a teacher, not a student"):
        resolved_stage_configs(build_config("toy", ["pretrain.train.init=release://toy-teacher/v2"]))
    scratch = resolved_stage_configs(build_config("toy", ["pretrain.train.init="]))
    assert scratch["pretrain"]["init"] == "" and "pretrain_init" not in scratch


def test_student_card_pieces(tmp_path):
    """Best guidance (ties: the lower), the per-task grid from an evaluation folder, the smoothed curve."""
    import numpy as np
    from PIL import Image

    from snapgen_model.evaluation.geneval import prompt_folder, sample_path
    from snapgen_model.training import student_card as sc

    assert sc.best_guidance({1.0: {"overall": 0.3}, 2.0: {"overall": 0.4}, 4.0: {"overall": 0.4}}) == 2.0
    with pytest.raises(ValueError, match="empty"):
        sc.best_guidance({})
    for i, (tag, prompt) in enumerate([("single_object", "a photo of a circle"), ("colors", "a photo of a red square"),
                                       ("single_object", "a photo of a square")]):
        prompt_folder(tmp_path, i).mkdir(parents=True)
        (prompt_folder(tmp_path, i) / "metadata.jsonl").write_text(json.dumps({"tag": tag, "prompt": prompt}))
        sample_path(tmp_path, i, 0).parent.mkdir()
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(sample_path(tmp_path, i, 0))
    grid = sc.folder_task_grid(tmp_path, per_task=2, scale=1)
    rows = np.asarray(grid)
    assert grid.width < 40 and grid.height > 2 * 8 + 2 * 24  # two task rows of two cells, captions under
    assert (rows == 80).all(axis=-1).any()  # the third prompt's image (grey level 80) is in the first row
    with pytest.raises(ValueError, match="no evaluation samples"):
        sc.folder_task_grid(tmp_path / "empty")
    points = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(40)]
    assert sc.loss_curve(points[:1], tmp_path / "none.png") is None
    assert sc.loss_curve(points, tmp_path / "curve.png").is_file()


def test_the_shipped_student_needs_its_own_teacher_and_a_teacher_release_must_hold_a_teacher():
    from flows.pipeline_config import PipelineConfigError, build_config, resolved_stage_configs

    for overrides, message in ((["teacher.release=null"], "trained with the teacher release://toy-teacher/v2, but "
                                                          "this pipeline's teacher is bootstrapped"),
                               (["teacher.release=toy-teacher/v1"], "this pipeline's teacher is release://toy-teacher/v1"),
                               (["teacher.release=toy-student/v1"], "toy-student/v1 holds a student, not a teacher")):
        with pytest.raises(PipelineConfigError, match=message):
            resolved_stage_configs(build_config("toy", overrides))
    resolved_stage_configs(build_config("toy", ["teacher.release=null", "pretrain.train.init="]))


def test_amend_card_of_a_student_release_updates_release_json_and_its_index_sha(releases):
    releases_dir, folder = releases
    weights = (folder / st.UNET).read_bytes()
    old = rel.read_index(releases_dir)["releases"]["toy-student/v9"]["record_sha256"]
    rel.amend_card("toy-student/v9", "# student card\n\nrebuild: two lines\n", "runnable rebuild lines", releases_dir)
    record = json.loads((folder / rel.STUDENT_RECORD).read_text())
    assert record["card_amendments"][-1]["reason"] == "runnable rebuild lines"
    assert rel.read_index(releases_dir)["releases"]["toy-student/v9"]["record_sha256"] == \
        rel.sha256_file(folder / rel.STUDENT_RECORD) != old
    assert (folder / st.UNET).read_bytes() == weights
    assert rel.release_folder("release://toy-student/v9", releases_dir) == folder
