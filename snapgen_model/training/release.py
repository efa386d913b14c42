"""Shipped toy models: versioned release artifacts under `releases/` (plain PyTorch, no services).

A release is a toy teacher bundle (`bootstrap_bundle` layout: vae/, transformer/, text_encoder/ with its
tokenizer, bundle.json) saved in fp16 safetensors, plus `MODEL_CARD.md` (recipe hash, the command that
rebuilds it, training curves, score tables) and pictures under `card/`. The teacher is trained once by
`snapgen bootstrap-teacher --preset toy-release` and committed, as real pipelines ship SD3.5; the demo
loads it from its local folder through the production `from_pretrained` path (fp16 files are upcast to
float32 on CPU by the adapters).

A student release (`package_student_release`) is a pretrained student folder (`artifacts.student` layout:
the EMA UNet with its preset, the EMA conditioner, student.json) in fp16, with its `MODEL_CARD.md`,
`card/` pictures and `release.json` (the record: checksums, the teacher release it was distilled from,
scores). A pretraining run starts from one with `pretrain.init=release://toy-student/v1`.

Integrity: `releases/index.json` names every release with the sha256 of its record (bundle.json for a
teacher, release.json for a student), and the record holds the sha256 of every other file.
`verify_release` checks both and raises `LoadError` naming the first file that does not match (a
tampered or truncated release is never loaded). `release://<name>` is how a URI names a release
(`release_folder` verifies it and returns its folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from snapgen_model.distill.teacher import LoadError
from snapgen_model.evaluation import atomic
from snapgen_model.artifacts.teacher_bundle import BUNDLE_FILE, load_bundle, read_bundle_record

RELEASES_DIR = Path(__file__).resolve().parents[2] / "releases"
INDEX_FILE = "index.json"
CARD_FILE = "MODEL_CARD.md"
DEFAULT_RELEASE = "toy-teacher/v2"
MAX_RELEASE_BYTES = 25 * 1024 * 1024  # issue 14: a shipped toy teacher is at most 25 MB
STUDENT_RECORD = "release.json"  # a student release's record (a teacher's is its bundle.json)
STUDENT_FORMAT = "snapgen-student-release/1"
URI_SCHEME = "release://"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path, record: str = BUNDLE_FILE) -> dict[str, str]:
    """sha256 of every file of a release folder except its record (relative POSIX paths, sorted)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != record and not p.name.startswith(".")}


def read_index(releases_dir: Path | None = None) -> dict[str, Any]:
    """`releases/index.json`: {"releases": {name: {"bundle_sha256", "config_hash", "bytes", ...}}}."""
    path = Path(releases_dir or RELEASES_DIR) / INDEX_FILE
    if not path.is_file():
        return {"releases": {}}
    return json.loads(path.read_text())


def release_path(name: str = DEFAULT_RELEASE, releases_dir: Path | None = None) -> Path:
    """Folder of release `name` ("toy-teacher/v1"); `LoadError` listing the known releases if absent."""
    releases_dir = Path(releases_dir or RELEASES_DIR)
    known = read_index(releases_dir)["releases"]
    if name not in known:
        raise LoadError(f"release {name!r} is not in {releases_dir / INDEX_FILE}; known releases: {sorted(known) or 'none'}")
    return releases_dir / name


def verify_release(name: str = DEFAULT_RELEASE, releases_dir: Path | None = None) -> Path:
    """Check the release's bundle.json against the index and every file against bundle.json; returns the
    folder. `LoadError` names the file whose checksum differs, or that is missing or unlisted."""
    releases_dir = Path(releases_dir or RELEASES_DIR)
    folder = release_path(name, releases_dir)
    entry = read_index(releases_dir)["releases"][name]
    record_name = entry.get("record", BUNDLE_FILE)
    record_path = folder / record_name
    if not record_path.is_file():
        raise LoadError(f"release {name}: {record_path} is missing")
    if sha256_file(record_path) != entry.get("record_sha256", entry.get("bundle_sha256")):
        raise LoadError(f"release {name}: {record_path} does not match the sha256 in {releases_dir / INDEX_FILE}")
    expected = (read_bundle_record(folder) if record_name == BUNDLE_FILE else _student_record(record_path))["files"]
    actual = _files(folder, record_name)
    for rel, digest in expected.items():
        if rel not in actual:
            raise LoadError(f"release {name}: {folder / rel} is missing")
        if actual[rel] != digest:
            raise LoadError(f"release {name}: {folder / rel} does not match its sha256 in {record_name}")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise LoadError(f"release {name}: {folder / extra[0]} is not listed in {record_name}")
    return folder


def release_kind(name: str, releases_dir: Path | None = None) -> str:
    """"teacher" or "student": what release `name` holds (`LoadError` if it is not in the index)."""
    release_path(name, releases_dir)
    return read_index(releases_dir)["releases"][name].get("kind", "teacher")


def is_release_uri(uri: str) -> bool:
    return str(uri).startswith(URI_SCHEME)


def release_folder(uri: str, releases_dir: Path | None = None) -> Path:
    """The verified folder of `release://<name>` (every sha256 checked; `LoadError` naming the file that
    does not match, or the known releases when `name` is not one of them)."""
    return verify_release(release_name(uri), releases_dir)


def release_name(uri: str) -> str:
    """"toy-student/v1" of "release://toy-student/v1"."""
    if not is_release_uri(uri):
        raise ValueError(f"{uri!r} is not a release URI ({URI_SCHEME}<name>, e.g. {URI_SCHEME}{DEFAULT_RELEASE})")
    return uri[len(URI_SCHEME):].strip("/")


def _student_record(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text())
    if record.get("format") != STUDENT_FORMAT:
        raise LoadError(f"{path}: format {record.get('format')!r}, expected {STUDENT_FORMAT!r}")
    return record


def load_release(name: str = DEFAULT_RELEASE, device: str | torch.device = "cpu", releases_dir: Path | None = None):
    """Verify, then load the release through the production adapters (`bootstrap_bundle.load_bundle`)."""
    return load_bundle(verify_release(name, releases_dir), device)


def package_release(bundle_folder: str | Path, name: str, *, card: str, card_files: Mapping[str, Path] | None = None,
                    extra_record: Mapping[str, Any] | None = None, releases_dir: Path | None = None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write release `name` from a finished bundle folder: models re-saved in `dtype` safetensors,
    tokenizer, `MODEL_CARD.md` (`card`), pictures (`card_files`: relative name -> source file) under
    card/, bundle.json (with the files' sha256 and `extra_record` fields) last, then the index entry.
    Refuses to overwrite an existing release and a result over MAX_RELEASE_BYTES."""
    from snapgen_model.distill.toy_text import save_text_encoder

    releases_dir = Path(releases_dir or RELEASES_DIR)
    tmp = _new_release(releases_dir, name)
    bundle = load_bundle(bundle_folder)
    bundle.vae.vae.to(dtype).save_pretrained(tmp / "vae", safe_serialization=True)
    bundle.teacher.transformer.to(dtype).save_pretrained(tmp / "transformer", safe_serialization=True)
    save_text_encoder(bundle.text.model.to(dtype), bundle.text.tokenizer, tmp / "text_encoder")
    record = dict(bundle.record) | dict(extra_record or {}) | {"release": name, "weights_dtype": str(dtype).removeprefix("torch.")}
    out, size = _publish(tmp, releases_dir, name, BUNDLE_FILE, record, card, card_files)
    _add_to_index(releases_dir, name, {"bundle_sha256": sha256_file(out / BUNDLE_FILE), "config_hash": record["config_hash"],
                                       "preset": record.get("preset"), "bytes": size,
                                       "weights_dtype": record["weights_dtype"]})
    return out


def package_student_release(student_folder: str | Path, name: str, *, card: str, teacher: str,
                            card_files: Mapping[str, Path] | None = None, extra_record: Mapping[str, Any] | None = None,
                            preset_overrides: Sequence[str] = (), releases_dir: Path | None = None,
                            dtype: torch.dtype = torch.float16) -> Path:
    """Write student release `name` from a finished student folder (`artifacts.student` layout): the EMA
    UNet (its preset in the metadata) and the EMA conditioner re-saved in `dtype`, student.json (the
    source card, its teacher replaced by `teacher`, the URI of the teacher it was trained from, e.g.
    release://toy-teacher/v2), `MODEL_CARD.md` (`card`), pictures under card/, then release.json (the
    record: every file's sha256, `extra_record`) and the index entry. Refuses to overwrite a release and
    a result over MAX_RELEASE_BYTES."""
    from snapgen_model.artifacts import student as st

    releases_dir = Path(releases_dir or RELEASES_DIR)
    source = Path(student_folder)
    if (releases_dir / name).exists():
        raise FileExistsError(f"release {name} already exists at {releases_dir / name}; releases are immutable, "
                              "pick a new version")
    if not st.is_student_folder(source):
        raise LoadError(f"{source}: not a finished student folder (it needs {st.CARD}, {st.UNET} and {st.CONDITIONER})")
    source_card = st.read_card(source)
    preset, unet, conditioner = st.load_student(source)
    if preset_overrides:
        changed = preset.with_overrides(list(preset_overrides))
        if changed.unet != preset.unet:
            raise ValueError(f"release {name}: preset_overrides {list(preset_overrides)} change the UNet's architecture")
        preset = changed
    tmp = _new_release(releases_dir, name)
    st.save_student(tmp, preset, unet.to(dtype), conditioner.to(dtype))
    st.write_card(tmp, source_card | {"bundle_uri": teacher, "release": name})
    record = {"format": STUDENT_FORMAT, "kind": "student", "release": name, "preset": preset.name,
              "config_hash": source_card.get("key"), "teacher": teacher,
              "weights_dtype": str(dtype).removeprefix("torch.")} | dict(extra_record or {})
    out, size = _publish(tmp, releases_dir, name, STUDENT_RECORD, record, card, card_files)
    _add_to_index(releases_dir, name, {"kind": "student", "record": STUDENT_RECORD,
                                       "record_sha256": sha256_file(out / STUDENT_RECORD),
                                       "config_hash": record["config_hash"], "preset": preset.name, "bytes": size,
                                       "weights_dtype": record["weights_dtype"]})
    return out


def amend_card(name: str, card: str | bytes, reason: str, releases_dir: Path | None = None) -> bool:
    """Replace the MODEL_CARD.md of an intact release (a correction to its prose; weights, configs and pictures
    stay byte for byte): the card's sha256 in the record, an entry in the record's `card_amendments` (the
    reason, and the card's sha256 before and after), the record's sha256 and size in the index, then the release
    verified again. All or nothing: if any write fails, the card, the record and the index are put back as they
    were. Returns False (and records nothing) when the card is unchanged. `LoadError` if the release does not
    verify before; ValueError for an empty card or reason."""
    data = card.encode("utf-8") if isinstance(card, str) else bytes(card)
    if not data.strip():
        raise ValueError(f"release {name}: the new card is empty")
    if not reason.strip():
        raise ValueError(f"release {name}: say why the card is amended (reason)")
    releases_dir = Path(releases_dir or RELEASES_DIR)
    folder = verify_release(name, releases_dir)
    entry = read_index(releases_dir)["releases"][name]
    record_name = entry.get("record", BUNDLE_FILE)
    paths = {"card": folder / CARD_FILE, "record": folder / record_name, "index": releases_dir / INDEX_FILE}
    old = {k: p.read_bytes() for k, p in paths.items()}
    before, after = hashlib.sha256(old["card"]).hexdigest(), hashlib.sha256(data).hexdigest()
    if after == before:
        return False
    record = json.loads(old["record"])
    record["files"][CARD_FILE] = after
    record.setdefault("card_amendments", []).append({"reason": reason.strip(), "card_sha256_before": before,
                                                     "card_sha256": after})
    new_record = (json.dumps(record, indent=2, default=_json_default) + "\n").encode("utf-8")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
    size += len(data) - len(old["card"]) + len(new_record) - len(old["record"])
    digest_key = "record_sha256" if "record_sha256" in entry else "bundle_sha256"
    try:
        atomic.write_bytes(paths["card"], data)
        atomic.write_bytes(paths["record"], new_record)
        _add_to_index(releases_dir, name, dict(entry) | {digest_key: hashlib.sha256(new_record).hexdigest(),
                                                           "bytes": size})
        verify_release(name, releases_dir)
    except BaseException:
        for key, path in paths.items():
            atomic.write_bytes(path, old[key])
        raise
    return True


def _new_release(releases_dir: Path, name: str) -> Path:
    """The empty staging folder of release `name`; FileExistsError if the release exists (immutable)."""
    out = releases_dir / name
    if out.exists():
        raise FileExistsError(f"release {name} already exists at {out}; releases are immutable, pick a new version")
    tmp = releases_dir / f".{name.replace('/', '-')}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, releases_dir: Path, name: str, record_name: str, record: dict[str, Any], card: str,
             card_files: Mapping[str, Path] | None) -> tuple[Path, int]:
    """Finish a staged release: the card and its pictures, the record (every file's sha256) last, the size
    limit, then the folder moved into place at once. Returns (folder, bytes)."""
    for rel, src in (card_files or {}).items():
        dst = tmp / "card" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    (tmp / CARD_FILE).write_text(card)
    record["files"] = _files(tmp, record_name)
    (tmp / record_name).write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    if size > MAX_RELEASE_BYTES:
        shutil.rmtree(tmp)
        raise ValueError(f"release {name}: {size / 2**20:.1f} MB is over the {MAX_RELEASE_BYTES / 2**20:.0f} MB limit")
    out = releases_dir / name
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out, size


def _add_to_index(releases_dir: Path, name: str, entry: Mapping[str, Any]) -> None:
    index = read_index(releases_dir)
    index["releases"][name] = dict(entry)
    index_tmp = releases_dir / f".{INDEX_FILE}.tmp"
    index_tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(index_tmp, releases_dir / INDEX_FILE)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
