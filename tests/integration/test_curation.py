"""Curation flow end to end on file:// and on a real SeaweedFS, with every kind of bad input."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def png_bytes(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).resize(size, Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_of(png: bytes, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (IHDR CRC recomputed)."""
    data = bytearray(png_bytes(0))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def build_sources(root: Path) -> tuple[list[dict], dict[str, str]]:
    """Mixed sources with every bad input; returns (specs, expected reason per raw key)."""
    folder = root / "pairs"
    folder.mkdir(parents=True)
    good = {f"good{i}": png_bytes(i) for i in range(6)}
    for name, data in good.items():
        (folder / f"{name}.png").write_bytes(data)
        (folder / f"{name}.txt").write_text(f"a picture number {name}")
    (folder / "dotted.name.v2.png").write_bytes(png_bytes(50))  # key with dots: kept, sanitised
    (folder / "dotted.name.v2.txt").write_text("dots in the key")
    (folder / "dotted_name_v2.png").write_bytes(png_bytes(51))  # collides after sanitising: kept
    (folder / "dotted_name_v2.txt").write_text("collision")
    bad = {
        "truncjpg": ("jpg", jpeg_of(png_bytes(60))[:200], "truncated_image"),
        "truncpng": ("png", png_bytes(61)[:120], "truncated_image"),
        "zero": ("png", b"", "empty_file"),
        "notimage": ("jpg", b"this is not an image at all" * 10, "not_an_image"),
        "bomb": ("png", bomb_png(), "decompression_bomb"),
        "zexactdup": ("png", good["good0"], "exact_duplicate"),  # sorts after good0: the copy
        "neardup": ("jpg", jpeg_of(good["good1"], 85), "near_duplicate"),
        "tiny": ("png", png_bytes(62, size=(16, 16)), "too_small"),
        "wide": ("png", png_bytes(63, size=(400, 40)), "bad_aspect_ratio"),
    }
    expected = {}
    for name, (ext, data, reason) in bad.items():
        (folder / f"{name}.{ext}").write_bytes(data)
        (folder / f"{name}.txt").write_text(f"caption of {name}")
        expected[f"pairs/{name}"] = reason
    (folder / "nocaption.png").write_bytes(png_bytes(70))
    expected["pairs/nocaption"] = "missing_caption"
    (folder / "emptycap.png").write_bytes(png_bytes(71))
    (folder / "emptycap.txt").write_text("   ")
    expected["pairs/emptycap"] = "empty_caption"
    (folder / "latin1.png").write_bytes(png_bytes(72))
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    expected["pairs/latin1"] = "caption_not_utf8"

    manifest = root / "list.jsonl"
    (root / "m").mkdir()
    (root / "m" / "one.png").write_bytes(png_bytes(80))
    rows = [{"path": "m/one.png", "caption": "from the manifest"},
            {"path": "file:///definitely/not/here.png", "caption": "gone"},
            {"caption": "no path"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected["man/1"] = "unreadable_source"
    expected["man/2"] = "bad_manifest_row"

    shard = root / "in-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            for ext, data in (("png", png_bytes(90 + i)), ("txt", f"shard sample {i}".encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tree = root / "classes"
    for c, cls in enumerate(["cat", "dog"]):
        (tree / cls).mkdir(parents=True)
        (tree / cls / f"{cls}1.png").write_bytes(png_bytes(100 + c))
    specs = [
        {"kind": "folder", "uri": f"file://{folder}", "name": "pairs"},
        {"kind": "manifest", "uri": f"file://{manifest}", "name": "man"},
        {"kind": "webdataset", "uri": f"file://{shard}", "name": "wds"},
        {"kind": "imagefolder", "uri": f"file://{tree}", "name": "inet"},
        {"kind": "shapes", "count": 20, "name": "shapes"},
    ]
    return specs, expected


@pytest.fixture
def file_env(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"file://{tmp_path}/storage")
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    return tmp_path


def run_curate(specs, out, **kw):
    from flows.curate import CurateParams, curate_flow

    return curate_flow(CurateParams(sources=specs, out=out, **kw))


def read_quarantine(out_dir: Path) -> dict[str, str]:
    lines = (out_dir / "quarantine.jsonl").read_text().splitlines()
    return {json.loads(l)["key"]: json.loads(l)["reason"] for l in lines}


def test_curation_file_backend_every_bad_input(file_env, prefect_harness):
    specs, expected = build_sources(file_env / "src")
    out_dir = file_env / "ds"
    manifest = run_curate(specs, f"file://{out_dir}", overrides=["samples_per_shard=8"])
    counts = manifest["counts"]
    assert counts["input"] == counts["kept"] + counts["quarantined"]
    quarantine = read_quarantine(out_dir)
    assert quarantine == expected, {k: (quarantine.get(k), v) for k, v in expected.items() if quarantine.get(k) != v}
    # kept: 6 good + 2 dotted + 1 manifest + 3 shard + 2 class-folder + 20 shapes
    assert counts["kept"] == 34 and counts["quarantined"] == len(expected)
    assert len(manifest["shards"]) == 5 and sum(s["samples"] for s in manifest["shards"]) == 34
    from snapgen_model.data.sources import iter_tar_groups
    keys, labels = [], {}
    for shard in manifest["shards"]:
        path = out_dir / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        for key, members in iter_tar_groups(path.open("rb")):
            keys.append(key)
            assert "json" in members and ("png" in members or "jpg" in members)
            if "cls" in members:
                labels[key] = int(members["cls"])
    assert len(set(keys)) == 34 and not any("." in k for k in keys)
    assert "pairs_dotted_name_v2" in keys and sum(k.startswith("pairs_dotted_name_v2") for k in keys) == 2
    assert labels == {"inet_cat_cat1": 0, "inet_dog_dog1": 1}
    assert manifest["mlflow_run_id"]

    again = run_curate(specs, f"file://{out_dir}", overrides=["samples_per_shard=8"])
    assert again["cache_hit"] and again["dataset_hash"] == manifest["dataset_hash"]


def test_missing_source_fails_before_any_work(file_env, prefect_harness):
    out_dir = file_env / "never"
    with pytest.raises(FileNotFoundError, match="does/not/exist"):
        run_curate([{"kind": "folder", "uri": f"file://{file_env}/does/not/exist"}, {"kind": "shapes", "count": 3}],
                   f"file://{out_dir}", track=False)
    assert not out_dir.exists()


def test_interrupted_run_resumes_without_redoing_shards(file_env, prefect_harness, monkeypatch):
    """Fault injection by patching the library's shard writer (a fault no real server produces)."""
    import tasks.curate as tc

    real = tc.write_shard
    calls = []

    def flaky(samples, path):
        calls.append(str(path))
        if "shard-000002" in str(path):
            raise RuntimeError("injected crash between shards")  # not an I/O error: no retry
        return real(samples, path)

    monkeypatch.setattr(tc, "write_shard", flaky)
    specs = [{"kind": "shapes", "count": 40, "name": "shapes"}]
    out_dir = file_env / "resume"
    with pytest.raises(Exception, match="injected crash"):
        run_curate(specs, f"file://{out_dir}", overrides=["samples_per_shard=10", "chunk_size=10"], track=False)
    assert not (out_dir / "manifest.json").exists()
    done_before = sorted(p.name for p in (out_dir / "shards").glob("*.json"))
    assert "shard-000002.json" not in done_before and len(done_before) >= 1
    calls.clear()
    monkeypatch.setattr(tc, "write_shard", lambda s, p: (calls.append(str(p)), real(s, p))[1])
    manifest = run_curate(specs, f"file://{out_dir}", overrides=["samples_per_shard=10", "chunk_size=10"], track=False)
    assert manifest["counts"] == {"input": 40, "kept": 40, "quarantined": 0}
    assert len(calls) == 4 - len(done_before)  # finished shards were not rewritten


def test_curation_on_seaweedfs(seaweed_s3, tmp_path, monkeypatch, prefect_harness):
    import boto3

    bucket = seaweed_s3.new_bucket()
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"s3://{bucket}/root")
    monkeypatch.setenv("SNAPGEN_S3_ENDPOINT_URL", seaweed_s3.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    client = boto3.client("s3", endpoint_url=seaweed_s3.endpoint_url, region_name=seaweed_s3.region,
                          aws_access_key_id=seaweed_s3.access_key, aws_secret_access_key=seaweed_s3.secret_key)
    for i in range(4):
        client.put_object(Bucket=bucket, Key=f"src/p{i}.png", Body=png_bytes(200 + i))
        client.put_object(Bucket=bucket, Key=f"src/p{i}.txt", Body=f"s3 caption {i}".encode())
    client.put_object(Bucket=bucket, Key="list.jsonl", Body=(
        json.dumps({"uri": f"s3://{bucket}/src/p0.png", "caption": "dup via manifest"}) + "\n" +
        json.dumps({"uri": f"s3://{bucket}/src/missing.png", "caption": "unreadable"}) + "\n").encode())
    specs = [{"kind": "folder", "uri": f"s3://{bucket}/src", "name": "s3pairs"},
             {"kind": "manifest", "uri": f"s3://{bucket}/list.jsonl", "name": "s3man"},
             {"kind": "shapes", "count": 10, "name": "shapes"}]
    out = f"s3://{bucket}/datasets/d1"
    manifest = run_curate(specs, out, overrides=["samples_per_shard=5"], track=False)
    assert manifest["counts"] == {"input": 16, "kept": 14, "quarantined": 2, "exact_duplicate": 1,
                                  "unreadable_source": 1}
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="datasets/d1/")["Contents"]}
    assert {"datasets/d1/manifest.json", "datasets/d1/quarantine.jsonl"} <= listed
    assert sum(k.endswith(".tar") for k in listed) == 3
    assert run_curate(specs, out, overrides=["samples_per_shard=5"], track=False)["cache_hit"]
