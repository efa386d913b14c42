"""Toy-world prompt sets and reference rows (TOY_CALIBRATION.md "Scorer sanity rows").

Every toy table carries rows that bracket what a model can score, computed by the same rule code:

* `clean`: renders of scenes that satisfy each prompt exactly (the ceiling, ~1.0);
* `ae`: those renders passed through an autoencoder (`decode` function; the latent-model ceiling);
* `floor`: real shapes-world scenes drawn *ignoring the prompt* (a prompt-blind generator, ~0.15);
* `noise`: uniform noise images (~0.02); `blank`: the empty background (0).

Prompts are split into `seen` (train-split prompts) and `heldout` (prompts the world holds out of
training: held-out colour/shape pairs or prompts), reported separately.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from snapgen_model.config_base import ConfigBase, check
from snapgen_model.data.shapes import BACKGROUND_RGB, ShapesWorld, ShapesWorldConfig, enumerate_prompts, render_array
from snapgen_model.evaluation import dpg, geneval
from snapgen_model.evaluation.dpg import DPGQuestion
from snapgen_model.evaluation.toy_backends import OracleVQA, scene_for_prompt, scene_parser_backend, toy_questions

REFERENCE_ROWS: tuple[str, ...] = ("clean", "ae", "floor", "noise", "blank")
_ROW_CODE = {name: i for i, name in enumerate(REFERENCE_ROWS)}
Decode = Callable[[np.ndarray], np.ndarray]  # (N, H, W, 3) uint8 -> reconstructed (N, H, W, 3) uint8


@dataclass(frozen=True, kw_only=True)
class ToyReferenceConfig(ConfigBase):
    """Which reference rows to score and how."""

    images_per_prompt: int = 4  # samples per prompt in every row
    seed: int = 0  # seeds the scenes and the noise of the rows
    rows: tuple[str, ...] = ("clean", "floor", "noise", "blank")  # rows to score; "ae" needs a decode function
    dpg: bool = True  # also score the toy DPG-Bench questions

    def __post_init__(self) -> None:
        check(1 <= self.images_per_prompt <= 4, "ToyReferenceConfig.images_per_prompt",
              f"must be in 1..4 (DPG tiles 2x2), got {self.images_per_prompt}")
        bad = [r for r in self.rows if r not in REFERENCE_ROWS]
        check(not bad, "ToyReferenceConfig.rows", f"unknown rows {bad}; choose from {list(REFERENCE_ROWS)}")


# ----------------------------------------------------------------------------- prompt sets

def toy_prompts(world: ShapesWorldConfig, split: str = "all", max_per_task: int = 0,
                seed: int = 0) -> list[dict[str, Any]]:
    """GenEval-schema prompt records of the world; `max_per_task` > 0 keeps a seeded subset per task
    (in the world's order)."""
    records = enumerate_prompts(world, split)
    if max_per_task <= 0:
        return records
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for tag in dict.fromkeys(r["tag"] for r in records):
        idx = [i for i, r in enumerate(records) if r["tag"] == tag]
        keep += idx if len(idx) <= max_per_task else sorted(rng.choice(idx, max_per_task, replace=False).tolist())
    return [records[i] for i in sorted(keep)]


def prompt_splits(world: ShapesWorldConfig) -> dict[str, str]:
    """prompt -> "seen" or "heldout"."""
    held = {r["prompt"] for r in enumerate_prompts(world, "heldout")} if _has_heldout(world) else set()
    return {r["prompt"]: "heldout" if r["prompt"] in held else "seen" for r in enumerate_prompts(world, "all")}


def _has_heldout(world: ShapesWorldConfig) -> bool:
    return bool(world.held_out_pairs or world.held_out_prompts)


def item_id(index: int) -> str:
    """DPG item id of prompt `index` of a toy prompt set (also its grid's file stem)."""
    return f"{index:05d}"


def toy_dpg_questions(prompts: Sequence[Mapping[str, Any]]) -> dict[str, list[DPGQuestion]]:
    """DPG-style question graphs for a toy prompt set, keyed by item id."""
    return {item_id(i): toy_questions(item_id(i), p) for i, p in enumerate(prompts)}


def fid_reference_images(world: ShapesWorldConfig, count: int, seed: int = 1) -> np.ndarray:
    """Held-out renders for FID at toy scale: scenes of a world seeded apart from the training one."""
    images, _ = ShapesWorld(replace(world, seed=world.seed + 1_000_003 * (seed + 1))).batch(range(count), "all")
    return images


# ----------------------------------------------------------------------------- rows

def _rng(cfg: ToyReferenceConfig, row: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _ROW_CODE[row], index])


def _row_images(row: str, index: int, prompt: Mapping[str, Any], world: ShapesWorldConfig,
                cfg: ToyReferenceConfig, decode: Decode | None) -> np.ndarray:
    """(n, H, W, 3) uint8 images of one row for one prompt."""
    n, res = cfg.images_per_prompt, world.resolution
    rng = _rng(cfg, row, index)
    if row in ("clean", "ae"):
        images = np.stack([render_array(scene_for_prompt(prompt, world, rng), world) for _ in range(n)])
        if row == "ae":
            images = np.asarray(decode(images), dtype=np.uint8)  # type: ignore[misc]
        return images
    if row == "floor":
        draws = ShapesWorld(world)
        return np.stack([render_array(draws.sample(int(rng.integers(2**31)), "all"), world) for _ in range(n)])
    if row == "noise":
        return rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    return np.broadcast_to(np.asarray(BACKGROUND_RGB, np.uint8), (n, res, res, 3)).copy()


def reference_images(row: str, prompts: Sequence[Mapping[str, Any]], world: ShapesWorldConfig,
                     cfg: ToyReferenceConfig | None = None, decode: Decode | None = None) -> list[np.ndarray]:
    """Per prompt, the row's (n, H, W, 3) uint8 images."""
    cfg = cfg or ToyReferenceConfig()
    if row not in REFERENCE_ROWS:
        raise ValueError(f"unknown reference row {row!r}; choose from {list(REFERENCE_ROWS)}")
    if row == "ae" and decode is None:
        raise ValueError("the 'ae' reference row needs a decode function (a toy autoencoder round trip)")
    return [_row_images(row, i, p, world, cfg, decode) for i, p in enumerate(prompts)]


def score_toy_images(images: Sequence[np.ndarray], prompts: Sequence[Mapping[str, Any]], world: ShapesWorldConfig,
                     splits: Mapping[str, str] | None = None, with_dpg: bool = True) -> dict[str, Any]:
    """GenEval (official rules + exact-count diagnostic + splits) and toy DPG of in-memory images."""
    from PIL import Image

    backend = scene_parser_backend(world)
    rows = [geneval.score_pil(Image.fromarray(im), p, backend, filename=f"{item_id(i)}/samples/{j:04d}.png")
            for i, (ims, p) in enumerate(zip(images, prompts)) for j, im in enumerate(ims)]
    out: dict[str, Any] = {"geneval": geneval.summarize(rows, splits)}
    if with_dpg:
        questions = toy_dpg_questions(prompts)
        vqa = OracleVQA(world)
        items = [dpg.score_item(dpg.tile_2x2(ims[:4]), questions[item_id(i)], vqa,
                                dpg.DPGConfig(tiles=min(4, len(ims)))) for i, ims in enumerate(images)]
        out["dpg"] = dpg.summarize(items, questions)
    return out


def score_reference_rows(prompts: Sequence[Mapping[str, Any]], world: ShapesWorldConfig,
                         cfg: ToyReferenceConfig | None = None, decode: Decode | None = None) -> dict[str, Any]:
    """Row name -> scores of that row (rows in `cfg.rows`, plus "ae" whenever `decode` is given)."""
    cfg = cfg or ToyReferenceConfig()
    rows = list(cfg.rows) + (["ae"] if decode is not None and "ae" not in cfg.rows else [])
    splits = prompt_splits(world) if _has_heldout(world) else None
    return {row: score_toy_images(reference_images(row, prompts, world, cfg, decode), prompts, world, splits, cfg.dpg)
            for row in rows if row != "ae" or decode is not None}
