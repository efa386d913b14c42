"""Uploaded checkpoints keep the run's retention (`keep_checkpoints`), as the local ones do: a run's storage
holds the newest finished states, not one per `checkpoint_every` steps for ever. Storage here is the real
`Storage` on a file:// root (the same object layout as S3: one object per file, folders are prefixes)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tasks.pretrain import _uploader, prune_uploaded
from tasks.storage import Storage


def stored_folders(store: Storage, base: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for uri in store.list(base + "/"):
        folder, name = uri[len(base) + 1:].split("/", 1)
        out.setdefault(folder, set()).add(name)
    return out


def put(store: Storage, base: str, step: int, finished: bool = True) -> None:
    store.write_bytes(store.join(base, f"step-{step:08d}", "modules.safetensors"), b"w")
    if finished:
        store.write_text(store.join(base, f"step-{step:08d}", "state.json"), "{}")


def test_a_training_run_keeps_its_newest_states_in_storage(tmp_path):
    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.presets import get_preset
    from snapgen_model.training.data import load_cache_folder
    from snapgen_model.training.pretrain import PretrainConfig, fit
    from tests.reliability.train_child import write_cache

    store = Storage(root=f"file://{tmp_path / 'store'}")
    base = store.uri("runs", "pretrain-retention", "checkpoints")
    cfg = PretrainConfig.from_dict({"steps": 8, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 2,
                                    "keep_checkpoints": 2, "log_every": 1, "accelerator": "cpu",
                                    "kd": {"feature_kd": False}})
    data = load_cache_folder(write_cache(tmp_path / "cache"), ["clip"])
    result = fit(get_preset("toy-smoke"), cfg, data, CacheConfig(targets_per_sample=2), tmp_path / "state",
                 upload=_uploader(store, base, cfg.keep_checkpoints))
    assert result["step"] == 8
    stored = stored_folders(store, base)
    assert sorted(stored) == ["step-00000006", "step-00000008"]  # 2 and 4 were uploaded, then pruned
    assert all({"state.json", "modules.safetensors", "optimizer.safetensors"} <= files for files in stored.values())
    assert sorted(p.name for p in (tmp_path / "state").glob("step-*")) == sorted(stored)  # the local retention


def test_unfinished_uploads_older_than_the_kept_states_go_newer_ones_stay(tmp_path):
    store = Storage(root=f"file://{tmp_path}")
    base = store.uri("checkpoints")
    put(store, base, 2)
    put(store, base, 4, finished=False)  # an upload cut off before its state.json
    put(store, base, 6)
    put(store, base, 8)
    put(store, base, 10, finished=False)  # newer than every finished state: not touched
    assert prune_uploaded(store, base, keep=2) == ["step-00000002", "step-00000004"]
    assert sorted(stored_folders(store, base)) == ["step-00000006", "step-00000008", "step-00000010"]
    assert prune_uploaded(store, base, keep=2) == []  # nothing more to do
    assert prune_uploaded(store, store.uri("nothing-here"), keep=1) == []  # no checkpoints yet


def test_a_failed_delete_is_logged_and_training_goes_on(tmp_path, caplog):
    """Fault injected with a wrapper (a file:// store cannot refuse a delete to root): the prune logs a
    warning naming the folder, returns, and deletes at the next call."""
    store = Storage(root=f"file://{tmp_path}")
    base = store.uri("checkpoints")
    for step in (2, 4, 6):
        put(store, base, step)
    real_delete = store.delete

    def refuse(uri: str, **kwargs) -> None:
        raise OSError("injected: delete refused")
    store.delete = refuse  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="tasks.pretrain"):
        assert prune_uploaded(store, base, keep=1) == []
    assert "could not prune old checkpoints" in caplog.text and "checkpoints" in caplog.text
    assert sorted(stored_folders(store, base)) == ["step-00000002", "step-00000004", "step-00000006"]
    store.delete = real_delete  # type: ignore[method-assign]
    assert prune_uploaded(store, base, keep=1) == ["step-00000002", "step-00000004"]


@pytest.mark.parametrize("keep", [1, 3])
def test_the_uploader_prunes_after_each_upload(tmp_path, keep):
    store = Storage(root=f"file://{tmp_path / 'store'}")
    base = store.uri("checkpoints")
    upload = _uploader(store, base, keep)
    for step in range(1, 6):
        folder = Path(tmp_path / "state" / f"step-{step:08d}")
        folder.mkdir(parents=True)
        (folder / "modules.safetensors").write_bytes(b"w")
        (folder / "state.json").write_text("{}")
        upload(folder)
    assert sorted(stored_folders(store, base)) == [f"step-{s:08d}" for s in range(6 - keep, 6)]
