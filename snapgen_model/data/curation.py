"""Curation of image-caption samples (DESIGN.md stage 1): checks, de-duplication, buckets, keys.

Pure functions over bytes and small records; I/O (local or S3) is done by the caller. Every input
sample ends as exactly one of: kept, or quarantined with a reason from `REASONS`, so counts balance:
input = kept + quarantined.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import warnings
from typing import Any, Iterator, Literal

import numpy as np
from PIL import Image

from snapgen_model.config_base import ConfigBase, check, check_choice

# every quarantine reason the curation stage can give (stable strings: tests and dashboards use them)
REASONS = {
    "empty_file": "zero-byte file",
    "not_an_image": "bytes are not a decodable image",
    "truncated_image": "truncated or corrupt image data",
    "decompression_bomb": "image dimensions exceed the pixel limit",
    "too_small": "shorter side below min_side",
    "bad_aspect_ratio": "aspect ratio outside the allowed range",
    "missing_caption": "no caption for this image",
    "empty_caption": "caption is empty",
    "caption_not_utf8": "caption is not valid UTF-8",
    "caption_too_long": "caption longer than max_caption_chars",
    "exact_duplicate": "same bytes as an earlier sample",
    "near_duplicate": "perceptual hash within near_dup_distance of an earlier sample",
    "unreadable_source": "the source object could not be read",
    "orphan_caption": "caption file without an image",
    "bad_manifest_row": "manifest row without a usable path or caption",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurationConfig(ConfigBase):
    """Filters and shard layout of the curation stage."""

    min_side: int = 32  # minimum shorter image side in pixels
    min_aspect: float = 0.25  # smallest allowed width / height
    max_aspect: float = 4.0  # largest allowed width / height
    max_pixels: int = 64_000_000  # decompression-bomb guard: width * height above this is refused
    min_caption_chars: int = 1  # captions shorter than this (after stripping) are empty
    max_caption_chars: int = 2000  # captions longer than this are refused
    # perceptual-hash Hamming distance counted as a near duplicate (-1 = off); not applied to the shapes
    # generator, whose seeded scenes are distinct by construction but look alike to a 64-bit phash
    near_dup_distance: int = 4
    samples_per_shard: int = 1000  # samples per output WebDataset shard
    chunk_size: int = 1000  # candidates per validation task (unit of retry of the first pass)
    reencode: Literal["keep", "png", "jpeg", "webp"] = "keep"  # re-encode policy for kept images
    jpeg_quality: int = 95  # quality when re-encoding to JPEG/WebP
    bucket_aspects: tuple[float, ...] = (0.5, 0.75, 1.0, 1.333, 2.0)  # aspect-ratio bucket centres (w/h)

    def __post_init__(self) -> None:
        check(self.min_side >= 1, "curation.min_side", "must be >= 1")
        check(0 < self.min_aspect <= 1 <= self.max_aspect, "curation.min_aspect",
              f"need 0 < min_aspect <= 1 <= max_aspect, got {self.min_aspect}, {self.max_aspect}")
        check(self.max_pixels > 0, "curation.max_pixels", "must be > 0")
        check(self.max_caption_chars >= self.min_caption_chars, "curation.max_caption_chars",
              "must be >= min_caption_chars")
        check(self.near_dup_distance >= -1, "curation.near_dup_distance", "must be >= -1 (-1 disables)")
        check(self.samples_per_shard >= 1, "curation.samples_per_shard", "must be >= 1")
        check(self.chunk_size >= 1, "curation.chunk_size", "must be >= 1")
        check_choice(self.reencode, "curation.reencode", ("keep", "png", "jpeg", "webp"))
        check(1 <= self.jpeg_quality <= 100, "curation.jpeg_quality", "must be in [1, 100]")
        check(len(self.bucket_aspects) >= 1, "curation.bucket_aspects", "needs at least one bucket")


@dataclasses.dataclass
class Checked:
    """Outcome of checking one candidate: kept fields, or a quarantine reason."""

    key: str
    source: str
    reason: str | None = None  # None = passes the per-sample checks
    detail: str = ""
    caption: str | None = None
    label: int | None = None
    width: int = 0
    height: int = 0
    format: str = ""
    sha256: str = ""
    phash: str = ""  # 16 hex digits (64-bit DCT hash)
    bucket: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decode_caption(raw: bytes | str | None, cfg: CurationConfig) -> tuple[str | None, str | None]:
    """(caption, reason): checks presence, UTF-8, emptiness and length."""
    if raw is None:
        return None, "missing_caption"
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption_not_utf8"
    text = " ".join(raw.split())
    if len(text) < cfg.min_caption_chars:
        return None, "empty_caption"
    if len(text) > cfg.max_caption_chars:
        return None, "caption_too_long"
    return text, None


# signatures of the formats we accept: bytes that start like an image but fail to open are truncated
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def probe_image(data: bytes, cfg: CurationConfig) -> tuple[Image.Image | None, str | None, str]:
    """Fully decode `data` with a pixel limit. Returns (image, reason, detail)."""
    if not data:
        return None, "empty_file", "0 bytes"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            fmt = probe.format or ""
    except Image.DecompressionBombError as exc:
        return None, "decompression_bomb", str(exc)[:200]
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        reason = "truncated_image" if data.startswith(IMAGE_MAGIC) else "not_an_image"
        return None, reason, f"{type(exc).__name__}: {str(exc)[:160]}"
    if w * h > cfg.max_pixels:
        return None, "decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except Exception as exc:
        return None, "truncated_image", f"{type(exc).__name__}: {str(exc)[:160]}"
    image.info["snapgen_format"] = fmt
    return image, None, ""


def phash(image: Image.Image) -> str:
    """64-bit DCT perceptual hash (imagehash.phash) as 16 hex digits."""
    import imagehash

    return str(imagehash.phash(image.convert("RGB"), hash_size=8))


def aspect_bucket(width: int, height: int, cfg: CurationConfig) -> str:
    """Name of the nearest aspect-ratio bucket (in log space), e.g. 'ar1.000'."""
    ratio = np.log(width / height)
    centres = np.log(np.asarray(cfg.bucket_aspects))
    return f"ar{cfg.bucket_aspects[int(np.argmin(np.abs(centres - ratio)))]:.3f}"


def check_sample(key: str, source: str, data: bytes | None, caption: bytes | str | None, cfg: CurationConfig,
                 *, label: int | None = None, caption_required: bool = True) -> Checked:
    """Per-sample checks in a fixed order: image decode, size, aspect, caption."""
    rec = Checked(key=key, source=source, label=label)
    image, reason, detail = probe_image(data or b"", cfg)
    if reason:
        rec.reason, rec.detail = reason, detail
        return rec
    if image is None or data is None:
        raise RuntimeError("check_sample: probe_image passed a sample without an image (it gives a reason for those)")
    rec.width, rec.height, rec.format = image.width, image.height, image.info.get("snapgen_format", "")
    rec.sha256 = hashlib.sha256(data).hexdigest()
    if min(image.size) < cfg.min_side:
        rec.reason, rec.detail = "too_small", f"{image.width}x{image.height} < {cfg.min_side}"
        return rec
    aspect = image.width / image.height
    if not cfg.min_aspect <= aspect <= cfg.max_aspect:
        rec.reason, rec.detail = "bad_aspect_ratio", f"{aspect:.3f} not in [{cfg.min_aspect}, {cfg.max_aspect}]"
        return rec
    if caption_required or caption is not None:
        rec.caption, reason = decode_caption(caption, cfg)
        if reason:
            rec.reason = reason
            return rec
    rec.phash = phash(image)
    rec.bucket = aspect_bucket(image.width, image.height, cfg)
    return rec


def deduplicate(records: list[Checked], cfg: CurationConfig) -> None:
    """Mark exact (sha256) and near (phash Hamming <= distance) duplicates in place; the first wins."""
    seen_sha: dict[str, str] = {}
    kept_hashes: list[int] = []
    kept_keys: list[str] = []
    for rec in records:
        if rec.reason:
            continue
        if rec.sha256 in seen_sha:
            rec.reason, rec.detail = "exact_duplicate", f"same bytes as {seen_sha[rec.sha256]}"
            continue
        seen_sha[rec.sha256] = rec.key
        if rec.extra.get("candidate", {}).get("kind") == "shapes":
            continue
        h = int(rec.phash, 16)
        if cfg.near_dup_distance >= 0 and kept_hashes:
            dist = _hamming(np.asarray(kept_hashes, dtype=np.uint64), np.uint64(h))
            j = int(np.argmin(dist))
            if dist[j] <= cfg.near_dup_distance:
                rec.reason, rec.detail = "near_duplicate", f"phash distance {int(dist[j])} to {kept_keys[j]}"
                continue
        kept_hashes.append(h)
        kept_keys.append(rec.key)


def _hamming(hashes: np.ndarray, h: np.uint64) -> np.ndarray:
    x = np.bitwise_xor(hashes, h)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-]")


def sanitise_key(raw: str) -> str:
    """WebDataset keys may not contain dots (the extension separator) or path characters."""
    return _KEY_SAFE.sub("_", raw.strip("/")).strip("_") or "sample"


def unique_keys(raw_keys: list[str]) -> list[str]:
    """Sanitised keys, made unique with a short hash of the raw key on collisions (never dropped)."""
    out, used = [], set()
    for raw in raw_keys:
        key = sanitise_key(raw)
        if key in used:
            key = f"{key}_{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
            n = 1
            while key in used:
                key, n = f"{key}_{n}", n + 1
        used.add(key)
        out.append(key)
    return out


def reencode(data: bytes, fmt: str, cfg: CurationConfig) -> tuple[bytes, str]:
    """Apply the re-encode policy; returns (bytes, extension)."""
    original = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(fmt.upper())
    if cfg.reencode == "keep" and original:
        return data, original
    target = "png" if cfg.reencode == "keep" else cfg.reencode
    image = Image.open(io.BytesIO(data)).convert("RGB")
    buf = io.BytesIO()
    params = {} if target == "png" else {"quality": cfg.jpeg_quality}
    image.save(buf, format={"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[target], **params)
    return buf.getvalue(), {"jpeg": "jpg"}.get(target, target)


def dataset_hash(kept: list[dict[str, Any]], cfg: CurationConfig) -> str:
    """Content hash of a curated dataset: kept samples (key, bytes hash, caption, label) + config."""
    h = hashlib.sha256(cfg.to_json().encode())
    for rec in kept:
        h.update(json.dumps([rec["key"], rec["sha256"], rec.get("caption"), rec.get("label")]).encode())
    return h.hexdigest()


# ---- the three passes of a curation run (the caller does the I/O and the fan-out) ----------------

def check_candidates(cands: list[dict[str, Any]], reader, cfg: CurationConfig,
                     world_factory=None) -> list[dict[str, Any]]:
    """Pass 1 (per chunk): load and check each candidate. One record per candidate, in order."""
    from snapgen_model.data.sources import load_candidates

    out = []
    for cand, data, caption, error in load_candidates(cands, reader, world_factory):
        if cand.get("reason"):
            rec = Checked(key=cand["raw_key"], source=cand["source"], reason=cand["reason"],
                          detail=cand.get("detail", ""))
        elif error is not None:
            rec = Checked(key=cand["raw_key"], source=cand["source"], reason="unreadable_source", detail=error)
        else:
            rec = check_sample(cand["raw_key"], cand["source"], data, caption, cfg, label=cand.get("label"),
                               caption_required="label" not in cand)
        rec.extra = {"candidate": {k: v for k, v in cand.items() if k not in ("reason", "detail")}}
        out.append(rec.to_dict())
    return out


@dataclasses.dataclass
class CurationPlan:
    kept: list[dict[str, Any]]  # checked records that pass, with their final sanitised `key`
    quarantined: list[dict[str, Any]]  # {key, source, reason, detail}
    shards: list[list[dict[str, Any]]]  # kept records per output shard
    counts: dict[str, int]  # input, kept, quarantined, and one count per reason
    dataset_hash: str


def plan_dataset(records: list[dict[str, Any]], cfg: CurationConfig) -> CurationPlan:
    """Pass 2 (global): de-duplicate, make keys unique, assign kept samples to shards."""
    checked = [Checked(**r) for r in records]
    deduplicate(checked, cfg)
    kept = [r for r in checked if r.reason is None]
    for rec, key in zip(kept, unique_keys([r.key for r in kept])):
        rec.extra["raw_key"], rec.key = rec.key, key
    quarantined = [{"key": r.key, "source": r.source, "reason": r.reason, "detail": r.detail}
                   for r in checked if r.reason is not None]
    counts = {"input": len(checked), "kept": len(kept), "quarantined": len(quarantined)}
    for q in quarantined:
        counts[q["reason"]] = counts.get(q["reason"], 0) + 1
    kept_dicts = [r.to_dict() for r in kept]
    n = cfg.samples_per_shard
    shards = [kept_dicts[i:i + n] for i in range(0, len(kept_dicts), n)]
    return CurationPlan(kept_dicts, quarantined, shards, counts, dataset_hash(kept_dicts, cfg))


def shard_samples(records: list[dict[str, Any]], reader, cfg: CurationConfig,
                  world_factory=None) -> Iterator[dict[str, Any]]:
    """Pass 3 (per shard): re-read each kept sample and yield its WebDataset sample dict."""
    from snapgen_model.data.sources import load_candidates

    cands = [dict(r["extra"]["candidate"]) for r in records]
    for rec, (cand, data, _caption, error) in zip(records, load_candidates(cands, reader, world_factory)):
        if error is not None or data is None or hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise IOError(f"sample {rec['key']} from {rec['source']} changed or vanished since it was checked "
                          f"({error or 'content hash differs'}); rerun curation")
        payload, ext = reencode(data, rec["format"], cfg)
        meta = {"source": rec["source"], "raw_key": rec["extra"]["raw_key"], "width": rec["width"],
                "height": rec["height"], "bucket": rec["bucket"], "sha256": rec["sha256"]}
        if cand.get("metadata"):
            meta["scene"] = cand["metadata"]
        sample = {"__key__": rec["key"], ext: payload, "json": json.dumps(meta).encode()}
        if rec.get("caption") is not None:
            sample["txt"] = rec["caption"].encode("utf-8")
        if rec.get("label") is not None:
            sample["cls"] = str(rec["label"]).encode()
        yield sample
