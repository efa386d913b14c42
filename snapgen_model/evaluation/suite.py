"""Benchmark runs over a saved sample folder, and the results table (one call per task in tasks/).

Each `score_*` function reads only saved samples (GenEval layout, see `runner.py`), so re-scoring
never needs the generator. A benchmark that cannot run (no model, no CSV, no reference) returns a
row with `available: False` and the reason, never a made-up number.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from snapgen_model.evaluation import atomic, dpg, geneval
from snapgen_model.evaluation.fid import FeatureStats, FIDConfig, InceptionFeatures, fid_kid, reference_stats
from snapgen_model.evaluation.runner import load_prompt_images
from snapgen_model.imaging import make_grid

BENCHMARKS: tuple[str, ...] = ("geneval", "dpg", "fid", "clip")


def check_benchmarks(names: list[str]) -> list[str]:
    """`names` when every one is a known benchmark (and there is one), else a ValueError listing the choices."""
    bad = [b for b in names if b not in BENCHMARKS]
    if bad or not names:
        raise ValueError(f"unknown benchmarks {bad}; choose from {list(BENCHMARKS)}")
    return names


def unavailable(reason: str, **extra: Any) -> dict[str, Any]:
    """The row of a benchmark that could not run."""
    return {"available": False, "reason": reason, **extra}


def folder_images(folder: str | os.PathLike, prompts: Sequence[Mapping[str, Any]], images: int,
                  limit: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8 saved samples: every prompt's image 0, then every prompt's image 1, ...
    (so a `limit` > 0 keeps the prompt coverage even)."""
    stacked = np.stack([load_prompt_images(folder, i, images) for i in range(len(prompts))], axis=1)  # (n, P, ...)
    flat = stacked.reshape(-1, *stacked.shape[2:])
    return flat[:limit] if limit > 0 else flat


def folder_prompts(prompts: Sequence[Mapping[str, Any]], images: int, limit: int = 0) -> list[str]:
    """The prompt of each image `folder_images` returns, in the same order."""
    texts = [str(p["prompt"]) for _ in range(images) for p in prompts]
    return texts[:limit] if limit > 0 else texts


# ----------------------------------------------------------------------------- GenEval

def score_geneval(folder: str | os.PathLike, backend: geneval.GenEvalBackend,
                  splits: Mapping[str, str] | None = None, cfg: geneval.GenEvalConfig | None = None) -> dict[str, Any]:
    """Official-rule GenEval over a sample folder; writes `<folder>/results.jsonl`."""
    rows = geneval.score_folder(folder, backend, cfg, outfile=Path(folder) / "results.jsonl")
    return {"available": True, "backend": backend.name, **geneval.summarize(rows, splits)}


# ----------------------------------------------------------------------------- DPG-Bench

def write_dpg_grids(folder: str | os.PathLike, prompts: Sequence[Mapping[str, Any]], item_ids: Sequence[str],
                    out_dir: str | os.PathLike, images: int) -> Path:
    """`<out_dir>/<item_id>.png`: the first (up to) 4 samples of each prompt tiled 2x2."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(item_ids[:len(prompts)]):
        atomic.save_image(dpg.tile_2x2(load_prompt_images(folder, i, min(4, images))), out / f"{item}.png")
    return out


def score_dpg(grid_dir: str | os.PathLike, questions: Mapping[str, Sequence[dpg.DPGQuestion]],
              vqa: dpg.VQABackend, cfg: dpg.DPGConfig | None = None) -> dict[str, Any]:
    """DPG-Bench over a folder of 2x2 grids; per-item scores to `<grid_dir>/../dpg_scores.jsonl`."""
    items = dpg.score_grids(grid_dir, questions, vqa, cfg)
    lines = "".join(json.dumps(i.to_dict()) + "\n" for i in items)
    atomic.write_text(Path(grid_dir).parent / "dpg_scores.jsonl", lines)
    return {"available": True, "backend": vqa.name, **dpg.summarize(items, questions)}


# ----------------------------------------------------------------------------- FID / KID

def score_fid(generated: np.ndarray, reference: np.ndarray | FeatureStats, cache_dir: str | os.PathLike,
              cfg: FIDConfig | None = None) -> dict[str, Any]:
    """FID and KID of generated images against reference images or statistics; the features of
    both sets are cached by content hash, so re-scoring saved samples skips Inception."""
    extractor = InceptionFeatures(cfg)
    ref = reference if isinstance(reference, FeatureStats) else reference_stats(reference, extractor, cache_dir)
    gen = reference_stats(generated, extractor, cache_dir)
    return {"available": True, "extractor": extractor.identity, "reference_key": ref.key[:16], **fid_kid(gen, ref, cfg)}


# ----------------------------------------------------------------------------- grids and tables

def category_grids(folder: str | os.PathLike, prompts: Sequence[Mapping[str, Any]], images: int,
                   per_category: int = 8) -> dict[str, Image.Image]:
    """Per task tag: a grid of the first `per_category` prompts' samples (one row per prompt)."""
    by_tag: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_tag.setdefault(str(p.get("tag", "prompts")), []).append(i)
    grids = {}
    for tag, idx in by_tag.items():
        chosen = idx[:per_category]
        tiles = np.concatenate([load_prompt_images(folder, i, images) for i in chosen])
        captions = [prompts[i]["prompt"] for i in chosen for _ in range(images)]
        grids[tag] = make_grid(tiles, cols=images, captions=captions)
    return grids


def flatten_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metric names: geneval/<task>, geneval/overall, geneval/exact_count, geneval/split/<s>,
    dpg/overall, dpg/<category>, fid, kid, clip_score, reference/<row>/<benchmark>."""
    out: dict[str, float] = {}
    bench = results.get("benchmarks", {})
    g = bench.get("geneval", {})
    if g.get("available"):
        out["geneval/overall"] = g["overall"]
        out |= {f"geneval/{k}": v for k, v in g["tasks"].items()}
        out["geneval/exact_count"] = g["exact_count"]["overall"]
        out |= {f"geneval/split/{k}": v for k, v in g.get("splits", {}).items()}
    d = bench.get("dpg", {})
    if d.get("available"):
        out["dpg/overall"] = d["overall"]
        out |= {f"dpg/{k.replace(' ', '_')}": v for k, v in d["categories"].items()}
    f = bench.get("fid", {})
    if f.get("available"):
        out |= {"fid": f["fid"], "kid": f["kid"]}
    c = bench.get("clip", {})
    if c.get("available"):
        out["clip_score"] = c["value"]
    for row, scores in results.get("reference_rows", {}).items():
        out[f"reference/{row}/geneval"] = scores["geneval"]["overall"]
        if "dpg" in scores:
            out[f"reference/{row}/dpg"] = scores["dpg"]["overall"]
    return {k: float(v) for k, v in out.items()}


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("n/a" if v is None else str(v))


def table_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(benchmark, metric, value) rows of the results table, reference rows and n/a rows included."""
    rows: list[tuple[str, str, str]] = []
    for name, res in results.get("benchmarks", {}).items():
        if not res.get("available"):
            rows.append((name, "not available", res.get("reason", "")))
            continue
        if name == "geneval":
            rows += [("geneval", "overall (official)", _fmt(res["overall"])),
                     ("geneval", "exact object count", _fmt(res["exact_count"]["overall"]))]
            rows += [("geneval", t, f"{_fmt(v)} (exact {_fmt(res['exact_count']['tasks'][t])})")
                     for t, v in res["tasks"].items()]
            rows += [("geneval", f"split {s}", _fmt(v)) for s, v in res.get("splits", {}).items()]
        elif name == "dpg":
            rows.append(("dpg", "overall", _fmt(res["overall"])))
            rows += [("dpg", k, _fmt(v)) for k, v in res["categories"].items()]
        elif name == "fid":
            rows += [("fid", "FID", _fmt(res["fid"])), ("fid", "KID", f"{res['kid']:.4f} ± {res['kid_std']:.4f}"),
                     ("fid", "images / reference", f"{res['images']} / {res['reference_images']}")]
        elif name == "clip":
            rows.append(("clip", "CLIP score", _fmt(res["value"])))
    for row, scores in results.get("reference_rows", {}).items():
        dpg_text = f", DPG {_fmt(scores['dpg']['overall'])}" if "dpg" in scores else ""
        rows.append(("reference", row, f"GenEval {_fmt(scores['geneval']['overall'])} (exact "
                     f"{_fmt(scores['geneval']['exact_count']['overall'])}){dpg_text}"))
    return rows


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results table as markdown (the Prefect artifact and the MLflow text artifact)."""
    model = results.get("model", {})
    lines = [f"### Evaluation of `{model.get('ref', '?')}` ({model.get('preset', '?')}, "
             f"{results.get('generation', {}).get('conditioning', '')})", "",
             "| benchmark | metric | value |", "|---|---|---|"]
    lines += [f"| {b} | {m} | {v} |" for b, m, v in table_rows(results)]
    return "\n".join(lines)
