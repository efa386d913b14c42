"""Shipped toy teacher releases: packaging in fp16, checksum verification (index -> bundle.json -> files),
loading through the production from_pretrained path, immutability and the size limit."""
from __future__ import annotations

import json

import pytest
import torch

from snapgen_model.distill.teacher import LoadError
from snapgen_model.training import bootstrap as bs
from snapgen_model.training import release as rel


@pytest.fixture(scope="module")
def smoke_bundle(tmp_path_factory):
    from tests.fixtures.smoke_bundle import build_smoke_bundle

    return build_smoke_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def released(smoke_bundle, tmp_path):
    picture = tmp_path / "grid.png"
    picture.write_bytes(b"\x89PNG fake picture bytes")
    folder = rel.package_release(smoke_bundle, "toy-teacher/v9", card="# card\n", card_files={"grid.png": picture},
                                 extra_record={"release_note": "test"}, releases_dir=tmp_path / "releases")
    return tmp_path / "releases", folder


def test_release_is_fp16_verified_and_loads_through_from_pretrained(smoke_bundle, released):
    releases_dir, folder = released
    assert rel.verify_release("toy-teacher/v9", releases_dir) == folder
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(weights).values()} == {torch.float16}
    record = json.loads((folder / "bundle.json").read_text())
    assert record["release"] == "toy-teacher/v9" and record["release_note"] == "test"
    assert "card/grid.png" in record["files"] and "MODEL_CARD.md" in record["files"]
    shipped, original = rel.load_release("toy-teacher/v9", releases_dir=releases_dir), bs.load_bundle(smoke_bundle)
    assert next(shipped.teacher.transformer.parameters()).dtype == torch.float32  # upcast on CPU
    cond = original.condition(["a photo of a red circle", ""])
    x = torch.randn(2, 16, original.config.latent_size, original.config.latent_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.9])
    v0 = original.teacher(x, t, cond["context"], cond["pooled"]).velocity
    v1 = shipped.teacher(x, t, cond["context"], cond["pooled"]).velocity
    torch.testing.assert_close(v1, v0, atol=2e-3, rtol=2e-2)  # fp16 rounding only
    entry = rel.read_index(releases_dir)["releases"]["toy-teacher/v9"]
    assert entry["config_hash"] == original.config.content_hash() and entry["bytes"] < rel.MAX_RELEASE_BYTES


def test_tampered_missing_or_extra_files_are_refused(released):
    releases_dir, folder = released
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="vae/diffusion_pytorch_model.safetensors does not match"):
        rel.load_release("toy-teacher/v9", releases_dir=releases_dir)
    weights.unlink()
    with pytest.raises(LoadError, match="is missing"):
        rel.verify_release("toy-teacher/v9", releases_dir)


def test_extra_file_and_edited_record_are_refused(released):
    releases_dir, folder = released
    (folder / "transformer" / "extra.bin").write_bytes(b"x")
    with pytest.raises(LoadError, match="extra.bin is not listed"):
        rel.verify_release("toy-teacher/v9", releases_dir)
    (folder / "transformer" / "extra.bin").unlink()
    record = json.loads((folder / "bundle.json").read_text())
    record["metrics"]["teacher_loss"] = 0.0
    (folder / "bundle.json").write_text(json.dumps(record))
    with pytest.raises(LoadError, match="does not match the sha256 in"):
        rel.verify_release("toy-teacher/v9", releases_dir)


def test_unknown_release_existing_release_and_size_limit(smoke_bundle, released, monkeypatch):
    releases_dir, _ = released
    with pytest.raises(LoadError, match="known releases: \\['toy-teacher/v9'\\]"):
        rel.verify_release("toy-teacher/v1", releases_dir)
    with pytest.raises(FileExistsError, match="immutable"):
        rel.package_release(smoke_bundle, "toy-teacher/v9", card="", releases_dir=releases_dir)
    monkeypatch.setattr(rel, "MAX_RELEASE_BYTES", 1000)  # the smoke bundle is ~0.4 MB
    with pytest.raises(ValueError, match="over the"):
        rel.package_release(smoke_bundle, "toy-teacher/v10", card="", releases_dir=releases_dir)
    assert not (releases_dir / "toy-teacher" / "v10").exists()


def _files_except_card(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("MODEL_CARD.md", "bundle.json")}


def test_amend_card_changes_the_card_only_and_keeps_the_release_verified(released):
    releases_dir, folder = released
    before = _files_except_card(folder)
    old_sha = rel.sha256_file(folder / "MODEL_CARD.md")
    old_index = rel.read_index(releases_dir)["releases"]["toy-teacher/v9"]
    assert rel.amend_card("toy-teacher/v9", "# card\n\nsuperseded by v10\n", "superseded banner", releases_dir) is True
    assert (folder / "MODEL_CARD.md").read_text().endswith("superseded by v10\n")
    assert _files_except_card(folder) == before  # weights, configs, pictures byte for byte
    record = json.loads((folder / "bundle.json").read_text())
    assert record["files"]["MODEL_CARD.md"] == rel.sha256_file(folder / "MODEL_CARD.md") != old_sha
    assert record["card_amendments"] == [{"reason": "superseded banner", "card_sha256_before": old_sha,
                                          "card_sha256": record["files"]["MODEL_CARD.md"]}]
    entry = rel.read_index(releases_dir)["releases"]["toy-teacher/v9"]
    assert entry["bundle_sha256"] == rel.sha256_file(folder / "bundle.json") != old_index["bundle_sha256"]
    assert "record_sha256" not in entry and entry["config_hash"] == old_index["config_hash"]
    assert entry["bytes"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    rel.load_release("toy-teacher/v9", releases_dir=releases_dir)  # still loads through the verified path
    assert not list(folder.glob(".*.tmp")) and not list(releases_dir.glob(".*.tmp"))
    record_bytes = (folder / "bundle.json").read_bytes()  # the same card again: nothing to record
    assert rel.amend_card("toy-teacher/v9", "# card\n\nsuperseded by v10\n", "again", releases_dir) is False
    assert (folder / "bundle.json").read_bytes() == record_bytes


def test_amend_card_is_all_or_nothing(released, monkeypatch):
    releases_dir, folder = released
    names = ("MODEL_CARD.md", "bundle.json")
    before = {n: (folder / n).read_bytes() for n in names} | {"index": (releases_dir / "index.json").read_bytes()}

    def index_write_fails(*args, **kwargs):  # a fault injected on purpose: a full disk at the last write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rel, "_add_to_index", index_write_fails)
    with pytest.raises(OSError, match="No space left"):
        rel.amend_card("toy-teacher/v9", "# a new card\n", "fix", releases_dir)
    after = {n: (folder / n).read_bytes() for n in names} | {"index": (releases_dir / "index.json").read_bytes()}
    assert after == before  # card and record put back: the release still verifies
    assert rel.verify_release("toy-teacher/v9", releases_dir) == folder
    assert not list(folder.glob(".*.tmp"))


def test_amend_card_refuses_a_tampered_release_an_empty_card_and_no_reason(released):
    releases_dir, folder = released
    with pytest.raises(ValueError, match="reason"):
        rel.amend_card("toy-teacher/v9", "# new\n", " ", releases_dir)
    with pytest.raises(ValueError, match="card is empty"):
        rel.amend_card("toy-teacher/v9", "\n", "fix", releases_dir)
    (folder / "MODEL_CARD.md").write_text("# edited by hand\n")  # a hand edit is not an amendment
    with pytest.raises(LoadError, match="MODEL_CARD.md does not match"):
        rel.amend_card("toy-teacher/v9", "# new\n", "fix", releases_dir)


def test_release_card_command_amends_and_names_bad_input(released, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    releases_dir, folder = released
    card = tmp_path / "card.md"
    card.write_text("# card\n\ncorrected\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["release-card", "toy-teacher/v9", "--card", str(card), "--reason", "typo",
                             "--releases-dir", str(releases_dir)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.strip().splitlines()[-1]) | {"card": None} == {"release": "toy-teacher/v9", "card": None,
                                                                            "changed": True, "reason": "typo"}
    assert (folder / "MODEL_CARD.md").read_bytes() == card.read_bytes()
    again = runner.invoke(app, ["release-card", "toy-teacher/v9", "--card", str(card), "--reason", "typo",
                                "--releases-dir", str(releases_dir)])
    assert again.exit_code == 0 and "unchanged" in " ".join(again.output.split())
    missing = runner.invoke(app, ["release-card", "toy-teacher/v9", "--card", str(tmp_path / "nope.md"), "--reason", "x",
                                  "--releases-dir", str(releases_dir)])
    assert missing.exit_code == 2 and "nope.md: no such file" in "".join(missing.output.split("\n"))
    unknown = runner.invoke(app, ["release-card", "toy-teacher/v8", "--card", str(card), "--reason", "x",
                                  "--releases-dir", str(releases_dir)])
    assert unknown.exit_code == 2 and "known releases" in " ".join(unknown.output.split())
