"""Curation sources: enumerate candidates, then load their bytes, through an injected object reader.

Source kinds (DESIGN.md stage 1): a folder of image + caption pairs (`a.jpg` + `a.txt`), a JSONL or
parquet manifest of (path or s3:// URI, caption), existing WebDataset shards, a class-per-folder
tree (ImageNet layout), and the procedural shapes world. Candidates are small JSON-able dicts so a
chunk of them can be handed to a retriable task; nothing here talks to S3 directly: the caller
passes an `ObjectReader` (the project's storage layer satisfies it for `file://` and `s3://`).
"""
from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import tarfile
from typing import IO, Any, BinaryIO, Iterator, Literal, Protocol, cast

from snapgen_model.config_base import ConfigBase, ConfigError, check, check_choice

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
CAPTION_EXTS = {"txt", "caption"}


class ObjectReader(Protocol):
    """What sources need from storage (implemented by `tasks.storage.Storage`)."""

    def read_bytes(self, uri: str) -> bytes: ...
    def list(self, prefix_uri: str) -> list[str]: ...
    def exists(self, uri: str) -> bool: ...
    def open_read(self, uri: str) -> BinaryIO: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceSpec(ConfigBase):
    """One curation input."""

    kind: Literal["folder", "manifest", "webdataset", "imagefolder", "shapes"]
    uri: str = ""  # file:// or s3:// location (folder, manifest file, shard prefix or .tar, class tree)
    name: str = ""  # short name used in keys and quarantine records (default: kind + position)
    count: int = 0  # shapes: number of scenes to generate
    split: str = "train"  # shapes: train / heldout / all
    resolution: int = 64  # shapes: image side in pixels
    # shapes: ShapesWorldConfig fields as a JSON object (e.g. a teacher bundle's world, so the student's
    # data never shows the bundle's held-out pairs); "" = the default world at `resolution`
    world: str = ""

    def __post_init__(self) -> None:
        check_choice(self.kind, "source.kind", ("folder", "manifest", "webdataset", "imagefolder", "shapes"))
        if self.world:
            try:
                check(isinstance(json.loads(self.world), dict), "source.world", "must be a JSON object")
            except json.JSONDecodeError as exc:
                raise ConfigError(f"source.world: not valid JSON ({exc})") from None
        if self.kind == "shapes":
            check(self.count >= 1, "source.count", "shapes source needs count >= 1")
        else:
            check(bool(self.uri), "source.uri", f"{self.kind} source needs a uri")


def _ext(path: str) -> str:
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _stem(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in posixpath.basename(path) else path


def _relative(uri: str, root: str) -> str:
    return uri[len(root):].lstrip("/") if uri.startswith(root) else posixpath.basename(uri)


def enumerate_source(spec: SourceSpec, reader: ObjectReader) -> Iterator[dict[str, Any]]:
    """Candidates of one source. Items that are not samples (orphan captions, unsupported files,
    unreadable shards) come out as candidates with a `reason` so they are counted, not dropped."""
    name = spec.name or spec.kind
    if spec.kind == "folder":
        yield from _folder(spec.uri, name, reader)
    elif spec.kind == "imagefolder":
        yield from _imagefolder(spec.uri, name, reader)
    elif spec.kind == "manifest":
        yield from _manifest(spec.uri, name, reader)
    elif spec.kind == "webdataset":
        yield from _webdataset(spec.uri, name, reader)
    else:
        for i in range(spec.count):
            yield {"source": name, "raw_key": f"{name}/{spec.split}-{i:08d}", "kind": "shapes",
                   "index": i, "split": spec.split, "resolution": spec.resolution,
                   **({"world": spec.world} if spec.world else {})}


def _folder(root: str, name: str, reader: ObjectReader) -> Iterator[dict[str, Any]]:
    root = root.rstrip("/") + "/"
    files = reader.list(root)
    by_stem: dict[str, dict[str, str]] = {}
    for uri in files:
        by_stem.setdefault(_stem(_relative(uri, root)), {})[_ext(uri)] = uri
    for stem in sorted(by_stem):
        exts = by_stem[stem]
        images = sorted(e for e in exts if e in IMAGE_EXTS)
        captions = sorted(e for e in exts if e in CAPTION_EXTS)
        other = sorted(set(exts) - IMAGE_EXTS - CAPTION_EXTS)
        for e in images:
            cap = exts[captions[0]] if captions else None
            yield {"source": name, "raw_key": f"{name}/{stem}" + (f"_{e}" if len(images) > 1 else ""),
                   "kind": "file", "image": exts[e], "caption_uri": cap}
        if captions and not images:
            yield {"source": name, "raw_key": f"{name}/{stem}", "kind": "file", "image": None,
                   "reason": "orphan_caption", "detail": exts[captions[0]]}
        for e in other:
            yield {"source": name, "raw_key": f"{name}/{stem}_{e}", "kind": "file", "image": exts[e],
                   "reason": "not_an_image", "detail": f"unsupported extension .{e}"}


def _imagefolder(root: str, name: str, reader: ObjectReader) -> Iterator[dict[str, Any]]:
    root = root.rstrip("/") + "/"
    files = [u for u in reader.list(root) if "/" in _relative(u, root)]
    classes = sorted({_relative(u, root).split("/", 1)[0] for u in files})
    index = {c: i for i, c in enumerate(classes)}
    for uri in files:
        rel = _relative(uri, root)
        cls = rel.split("/", 1)[0]
        cand = {"source": name, "raw_key": f"{name}/{_stem(rel)}", "kind": "file", "image": uri,
                "caption_text": cls, "label": index[cls], "classes": len(classes)}
        if _ext(uri) not in IMAGE_EXTS:
            cand |= {"reason": "not_an_image", "detail": f"unsupported extension .{_ext(uri)}"}
        yield cand


def _manifest(uri: str, name: str, reader: ObjectReader) -> Iterator[dict[str, Any]]:
    base = uri.rsplit("/", 1)[0]
    for i, row in enumerate(_manifest_rows(uri, reader)):
        path = row.get("path") or row.get("uri") or row.get("image")
        caption = row.get("caption", row.get("text"))
        key = f"{name}/{row.get('key') or i}"
        if not isinstance(path, str) or not path:
            yield {"source": name, "raw_key": key, "kind": "file", "image": None, "reason": "bad_manifest_row",
                   "detail": f"row {i}: no path/uri/image field"}
            continue
        if "://" not in path and not path.startswith("/"):
            path = f"{base}/{path}"
        elif path.startswith("/"):
            path = "file://" + path
        yield {"source": name, "raw_key": key, "kind": "file", "image": path,
               "caption_text": caption if isinstance(caption, str) else None}


def _manifest_rows(uri: str, reader: ObjectReader) -> list[dict[str, Any]]:
    data = reader.read_bytes(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                rows.append({"__error__": f"line {n}: {exc}"})
    return rows


def _webdataset(uri: str, name: str, reader: ObjectReader) -> Iterator[dict[str, Any]]:
    shards = [uri] if uri.endswith(".tar") else sorted(u for u in reader.list(uri) if u.endswith(".tar"))
    for shard in shards:
        sname = posixpath.basename(shard)[:-4]
        index, error = tar_index(reader, shard)
        for key, members in index:
            images = sorted(e for e in members if e.split(".")[-1] in IMAGE_EXTS)
            cand = {"source": name, "raw_key": f"{name}/{sname}/{key}", "kind": "tar", "shard": shard,
                    "member_key": key, "image_ext": images[0] if images else None}
            if not images:
                cand |= {"reason": "not_an_image", "detail": f"sample has no image member ({sorted(members)})"}
            yield cand
        if error is not None:
            yield {"source": name, "raw_key": f"{name}/{sname}/__unreadable__", "kind": "tar", "shard": shard,
                   "reason": "unreadable_source", "detail": error}


def tar_index(reader: ObjectReader, shard: str) -> tuple[list[tuple[str, set[str]]], str | None]:
    """(key, member extensions) of every sample readable in a shard, and the error that stopped it."""
    out: list[tuple[str, set[str]]] = []
    try:
        for key, members in iter_tar_groups(reader.open_read(shard)):
            out.append((key, set(members)))
    except (tarfile.TarError, OSError, EOFError, FileNotFoundError) as exc:
        return out, f"{type(exc).__name__}: {str(exc)[:160]}"
    return out, None


def iter_tar_groups(stream: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar, grouping consecutive members by WebDataset key (path up to the basename's first dot).

    Kept over webdataset's `tar_file_iterator` + `group_by_keys` after measuring both on the same shards
    (bench/RESULTS.md "WebDataset's tar stages against ours"): the same samples in the same order at the
    same speed, but webdataset's grouping holds a finished sample until the next key arrives, so a tar
    cut inside a sample also loses the complete sample before it; this reader yields it first."""
    key = ""
    group: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = posixpath.basename(info.name)
            prefix = posixpath.dirname(info.name)
            stem, _, ext = base.partition(".")
            k = f"{prefix}/{stem}".lstrip("/") if prefix else stem
            if k != key and group:
                yield key, group
                group = {}
            key = k
            group[ext.lower()] = cast(IO[bytes], tar.extractfile(info)).read()  # a regular file: never None
    if group:
        yield key, group


def load_candidates(cands: list[dict[str, Any]], reader: ObjectReader,
                    world_factory=None) -> Iterator[tuple[dict[str, Any], bytes | None, Any, str | None]]:
    """(candidate, image bytes, raw caption, error) for each candidate, in order. Tar candidates are
    read with one streaming pass per shard; shapes candidates are rendered by `world_factory(res)`."""
    tar_data = _read_tar_members([c for c in cands if c.get("kind") == "tar" and not c.get("reason")], reader)
    for cand in cands:
        if cand.get("reason"):
            yield cand, None, None, None
        elif cand["kind"] == "file":
            yield (cand, *_load_file(cand, reader))
        elif cand["kind"] == "tar":
            got = tar_data.get((cand["shard"], cand["member_key"]))
            if isinstance(got, str) or got is None:
                yield cand, None, None, got or "sample missing from shard on re-read"
            else:
                caption = got.get("txt", got.get("caption"))
                yield cand, got.get(cand["image_ext"]), caption, None
        else:
            yield (cand, *_render_shapes(cand, world_factory))


def _load_file(cand: dict[str, Any], reader: ObjectReader) -> tuple[bytes | None, Any, str | None]:
    try:
        data = reader.read_bytes(cand["image"])
    except Exception as exc:  # missing object, permission, persistent I/O failure
        return None, None, f"{type(exc).__name__}: {str(exc)[:160]}"
    caption: Any = cand.get("caption_text")
    if cand.get("caption_uri"):
        try:
            caption = reader.read_bytes(cand["caption_uri"])
        except Exception as exc:
            return None, None, f"caption {type(exc).__name__}: {str(exc)[:160]}"
    return data, caption, None


def _read_tar_members(cands: list[dict[str, Any]], reader: ObjectReader) -> dict[tuple[str, str], Any]:
    wanted: dict[str, set[str]] = {}
    for c in cands:
        wanted.setdefault(c["shard"], set()).add(c["member_key"])
    out: dict[tuple[str, str], Any] = {}
    for shard, keys in wanted.items():
        try:
            for key, members in iter_tar_groups(reader.open_read(shard)):
                if key in keys:
                    out[(shard, key)] = members
        except (tarfile.TarError, OSError, EOFError) as exc:
            for key in keys - {k for s, k in out if s == shard}:
                out[(shard, key)] = f"{type(exc).__name__}: {str(exc)[:160]}"
    return out


def _render_shapes(cand: dict[str, Any], world_factory) -> tuple[bytes | None, Any, str | None]:
    world = world_factory(cand["resolution"], cand.get("world", ""))
    image, scene = world.image(cand["index"], cand["split"])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    cand["metadata"] = scene_metadata(scene)
    return buf.getvalue(), scene.caption, None


def scene_metadata(scene) -> dict[str, Any]:
    """JSON-able ground truth of a shapes scene (caption, task tag, GenEval metadata, objects)."""
    return {"tag": scene.tag, "prompt": scene.prompt, "geneval": scene.metadata,
            "objects": [dataclasses.asdict(o) for o in scene.objects]}
