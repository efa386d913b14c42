"""Evaluation bookkeeping: worker-independent seeds, saved samples reused without the generator,
resumable generation, the toy reference rows, and the results table."""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from snapgen_model.data.shapes import ShapesWorldConfig
from snapgen_model.evaluation import suite
from snapgen_model.evaluation.runner import (
    CheckpointGenerator,
    GenerationConfig,
    chunks,
    ensure_generated,
    generate_chunk,
    image_seed,
    prompt_groups,
    prompt_seeds,
    read_manifest,
    resolve_checkpoint,
)
from snapgen_model.evaluation.toy_backends import scene_parser_backend
from snapgen_model.evaluation.toy_reference import (
    ToyReferenceConfig,
    reference_images,
    score_reference_rows,
    toy_prompts,
)
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.presets import get_preset
from snapgen_model.storage.checkpoint import save_model
from tests.fixtures.checkpoints import randomize_zero_init

WORLD = ShapesWorldConfig()
PROMPTS = toy_prompts(WORLD, max_per_task=2)  # 12 prompts, every task


class SeedGenerator:
    """Deterministic fake generator: image = noise from the seed; counts calls."""

    identity = "seed-noise-v1"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts, seeds) -> np.ndarray:
        self.calls += 1
        return np.stack([np.random.default_rng(s).integers(0, 256, (64, 64, 3), dtype=np.uint8) for s in seeds])


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def test_image_seeds_are_stable_and_distinct() -> None:
    assert image_seed(0, 3, 1) == image_seed(0, 3, 1)
    seeds = {image_seed(b, i, j) for b in range(3) for i in range(50) for j in range(4)}
    assert len(seeds) == 600 and all(0 <= s < 2**31 for s in seeds)
    cfg = GenerationConfig(images_per_prompt=2, base_seed=5)
    assert prompt_seeds(cfg, 7) == [image_seed(5, 7, 0), image_seed(5, 7, 1)]


@pytest.mark.parametrize("workers,chunk_size", [(3, 5), (2, 1)])
def test_samples_do_not_depend_on_worker_count_or_chunking(tmp_path, workers: int, chunk_size: int) -> None:
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    ensure_generated(SeedGenerator(), serial, PROMPTS, GenerationConfig(chunk_size=len(PROMPTS), batch_prompts=2))
    cfg = GenerationConfig(chunk_size=chunk_size, batch_prompts=2)
    gen = SeedGenerator()

    def run(units):
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda unit: generate_chunk(gen, parallel, PROMPTS, unit, cfg), units))

    ensure_generated(gen, parallel, PROMPTS, cfg, run_chunks=run)
    assert _digests(serial) == _digests(parallel) and len(_digests(serial)) == 4 * len(PROMPTS)


def test_rescoring_reuses_saved_images_without_the_generator(tmp_path) -> None:
    gen, cfg = SeedGenerator(), GenerationConfig()
    first = ensure_generated(gen, tmp_path, PROMPTS, cfg)
    calls = gen.calls
    backend = scene_parser_backend(WORLD)
    before = suite.score_geneval(tmp_path, backend)
    again = ensure_generated(gen, tmp_path, PROMPTS, cfg)  # complete folder: auto-detected
    reused = ensure_generated(None, tmp_path, PROMPTS, cfg, reuse_images=True)
    assert not first["reused"] and again["reused"] and reused["reused"] and gen.calls == calls == 2  # 2 groups of 8
    assert suite.score_geneval(tmp_path, backend) == before
    assert read_manifest(tmp_path)["generation_key"] == first["key"]


def test_reuse_images_fails_on_missing_samples_and_generation_resumes(tmp_path) -> None:
    gen, cfg = SeedGenerator(), GenerationConfig()
    ensure_generated(gen, tmp_path, PROMPTS, cfg)
    digests = _digests(tmp_path)
    (tmp_path / "00004" / "samples" / "0002.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 12 prompts"):
        ensure_generated(None, tmp_path, PROMPTS, cfg, reuse_images=True)
    calls = gen.calls
    ensure_generated(gen, tmp_path, PROMPTS, cfg)
    assert gen.calls == calls + 1 and _digests(tmp_path) == digests  # only prompt 4's group redone, identically


def test_other_seeds_regenerate_and_never_mix_in_one_folder(tmp_path) -> None:
    gen = SeedGenerator()
    a = ensure_generated(gen, tmp_path / "a", PROMPTS, GenerationConfig(base_seed=0))
    b = ensure_generated(gen, tmp_path / "b", PROMPTS, GenerationConfig(base_seed=1))
    assert a["key"] != b["key"] and _digests(tmp_path / "a") != _digests(tmp_path / "b")
    with pytest.raises(ValueError, match="another generation"):
        ensure_generated(gen, tmp_path / "a", PROMPTS, GenerationConfig(base_seed=1))
    assert chunks(12, GenerationConfig(chunk_size=5, batch_prompts=1)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert chunks(12, GenerationConfig(chunk_size=5, batch_prompts=4)) == [list(range(8)), list(range(8, 12))]
    assert prompt_groups([9, 1, 2, 8], GenerationConfig(batch_prompts=4)) == [[1, 2], [8, 9]]


def _toy_checkpoint(folder: Path) -> Path:
    cfg = get_preset("toy-smoke")
    torch.manual_seed(0)
    save_model(randomize_zero_init(SnapGenUNet(cfg.unet)), folder / "unet.safetensors", preset=cfg)
    save_model(TinyDecoder(cfg.decoder), folder / "decoder.safetensors")
    return folder


def test_checkpoint_generator_is_batch_independent_and_keyed_by_sampler(tmp_path) -> None:
    unet, decoder = resolve_checkpoint(_toy_checkpoint(tmp_path / "ckpt"))
    assert decoder == tmp_path / "ckpt" / "decoder.safetensors"
    gen = CheckpointGenerator(unet, decoder_path=decoder, steps=2)
    seeds = [image_seed(0, 0, j) for j in range(3)]
    together = gen(["a circle"] * 3, seeds)
    alone = gen(["a circle"], seeds[1:2])
    assert together.shape == (3, 32, 32, 3) and together.dtype == np.uint8
    np.testing.assert_allclose(alone[0].astype(int), together[1].astype(int), atol=1)
    assert gen.identity != CheckpointGenerator(unet, decoder_path=decoder, steps=3).identity
    assert "null" in gen.conditioning  # no text encoder yet: prompt-blind, and it says so
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere.safetensors")


def test_toy_reference_rows_in_the_expected_order() -> None:
    prompts = toy_prompts(WORLD)  # all 177 prompts: the floor needs them (single_object has 3)
    rows = score_reference_rows(prompts, WORLD, ToyReferenceConfig())
    g = {row: r["geneval"]["overall"] for row, r in rows.items()}
    d = {row: r["dpg"]["overall"] for row, r in rows.items()}
    assert g["clean"] >= 0.99 and rows["clean"]["geneval"]["exact_count"]["overall"] >= 0.99
    assert 0.10 <= g["floor"] <= 0.22, g  # calibration: 0.148 (single_object alone ~0.5)
    assert rows["floor"]["geneval"]["tasks"]["single_object"] > 0.3
    assert g["noise"] <= 0.05 and g["blank"] == 0.0 and g["floor"] > g["noise"]
    assert d["clean"] >= 0.99 and d["clean"] > d["floor"] > d["noise"] and d["blank"] == 0.0


def test_reference_rows_are_seeded_and_ae_needs_a_decoder() -> None:
    a = reference_images("floor", PROMPTS[:3], WORLD)
    b = reference_images("floor", PROMPTS[:3], WORLD)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="decode"):
        reference_images("ae", PROMPTS[:3], WORLD)
    identity = score_reference_rows(PROMPTS, WORLD, ToyReferenceConfig(rows=("clean",)), decode=lambda x: x)
    assert set(identity) == {"clean", "ae"}
    assert identity["ae"]["geneval"]["overall"] == identity["clean"]["geneval"]["overall"]


def test_results_table_and_metric_names() -> None:
    rows = score_reference_rows(PROMPTS, WORLD, ToyReferenceConfig(rows=("clean",)))
    results = {"model": {"ref": "x", "preset": "toy"}, "generation": {"conditioning": "null"},
               "benchmarks": {"geneval": {"available": True, **rows["clean"]["geneval"]},
                              "dpg": {"available": True, **rows["clean"]["dpg"]},
                              "fid": {"available": True, "fid": 12.5, "kid": 0.01, "kid_std": 0.001, "images": 8,
                                      "reference_images": 8},
                              "clip": {"available": False, "reason": "no CLIP model given"}},
               "reference_rows": rows}
    metrics = suite.flatten_metrics(results)
    assert metrics["geneval/overall"] == 1.0 and metrics["geneval/color_attr"] == 1.0 and metrics["fid"] == 12.5
    assert "clip_score" not in metrics and metrics["reference/clean/geneval"] == 1.0 and "dpg/entity" in metrics
    table = suite.results_markdown(results)
    assert "| clip | not available | no CLIP model given |" in table and "exact object count" in table


def test_folder_images_and_prompts_share_one_order(tmp_path) -> None:
    ensure_generated(SeedGenerator(), tmp_path, PROMPTS, GenerationConfig(images_per_prompt=3))
    images, texts = suite.folder_images(tmp_path, PROMPTS, 3, limit=14), suite.folder_prompts(PROMPTS, 3, limit=14)
    assert len(images) == len(texts) == 14 and texts[:12] == [p["prompt"] for p in PROMPTS]
    expected = SeedGenerator()([texts[13]], [image_seed(0, 1, 1)])[0]  # image 1 of prompt 1
    np.testing.assert_array_equal(images[13], expected)


# ----------------------------------------------------------------------------- task logic (.fn, no Prefect server)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_unknown_registry_refs_and_missing_files_fail_clearly(tmp_path, monkeypatch) -> None:
    from tasks.evaluate import resolve_model

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path))
    with pytest.raises(LookupError, match="models:/snapgen@champion.*not found in the registry"):
        resolve_model.fn("models:/snapgen@champion")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model.fn(str(tmp_path / "missing.safetensors"))
    info = resolve_model.fn("file://" + str(_toy_checkpoint(tmp_path / "ckpt")))
    assert info["preset"] == "toy-smoke" and info["decoder"] and len(info["model_id"]) == 16


@pytest.mark.skipif(not (SHARED / "geneval").is_dir(), reason="shared benchmark data not present")
def test_full_scale_prompt_sets_and_unavailable_rows(tmp_path, monkeypatch) -> None:
    from tasks.evaluate import build_prompt_sets, score_dpg_task, score_fid_task, score_geneval_task

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path))
    monkeypatch.setenv("SNAPGEN_GENEVAL_METADATA_PATH", str(SHARED / "geneval" / "evaluation_metadata.jsonl"))
    monkeypatch.setenv("SNAPGEN_DPG_BENCH_DIR", str(SHARED / "dpg_bench"))
    sets = build_prompt_sets.fn("full", {}, {}, ["geneval", "dpg"], 0, 0)
    assert len(sets["geneval"]) == 553 and len(sets["dpg"]) == 1065
    assert {p["tag"] for p in sets["geneval"]} == {"single_object", "two_object", "counting", "colors", "position",
                                                   "color_attr"}
    none = {"detector": None, "clip": None, "colour": None, "vqa": None}
    assert "no model path" in score_geneval_task.fn(str(tmp_path), "full", {}, {}, none)["reason"]
    dpg_row = score_dpg_task.fn(str(tmp_path), "full", {}, {}, sets["dpg"][:2], 4, none, None)
    assert not dpg_row["available"] and "dpg_bench.csv" in dpg_row["reason"]  # the shared CSV is empty
    fid_row = score_fid_task.fn(str(tmp_path), "full", {}, {}, [], 4, {})
    assert not fid_row["available"] and "reference" in fid_row["reason"]


def test_real_generator_output_is_bitwise_independent_of_workers_and_chunks(tmp_path) -> None:
    unet, decoder = resolve_checkpoint(_toy_checkpoint(tmp_path / "ckpt"))
    gen = CheckpointGenerator(unet, decoder_path=decoder, steps=2)
    prompts = PROMPTS[:6]
    one = GenerationConfig(images_per_prompt=2, batch_prompts=2, chunk_size=6)
    ensure_generated(gen, tmp_path / "one", prompts, one)
    cfg = GenerationConfig(images_per_prompt=2, batch_prompts=2, chunk_size=2)

    def run(units):
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda unit: generate_chunk(gen, tmp_path / "two", prompts, unit, cfg), units))

    ensure_generated(gen, tmp_path / "two", prompts, cfg, run_chunks=run)
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")


def test_held_out_prompts_are_reported_as_their_own_split() -> None:
    from snapgen_model.evaluation.toy_reference import prompt_splits

    world = ShapesWorldConfig(held_out_pairs=(("red", "circle"),))
    splits = prompt_splits(world)
    assert splits["a photo of a red circle"] == "heldout" and splits["a photo of a blue circle"] == "seen"
    prompts = [p for p in toy_prompts(world) if p["tag"] == "colors"]
    rows = score_reference_rows(prompts, world, ToyReferenceConfig(rows=("clean",), dpg=False))
    assert rows["clean"]["geneval"]["splits"] == {"heldout": 1.0, "seen": 1.0}
