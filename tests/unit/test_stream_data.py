"""Streaming training data (`data=stream`): per-rank disjoint shards or samples, corrupt data counted
as the in-memory loader counts it, an exact resumable position, and bitwise resume of training."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from snapgen_model.distill.cache import CacheConfig
from snapgen_model.presets import get_preset
from snapgen_model.training.data import load_cache_folder
from snapgen_model.training.pretrain import PretrainConfig, fit
from snapgen_model.training.state import latest_state
from snapgen_model.training.stream import SampleStream, ShardSource, StreamBatches, StreamData
from tests.fixtures.caches import cache_sample, npy, write_cache
from tests.fixtures.training import StopAt, same, weights

PRESET = get_preset("toy-smoke")
CACHE = CacheConfig(targets_per_sample=2)



def sample(key: str, rng, latent=(16, 8, 8), targets: int = 2, tokens: int = 6) -> dict:
    return cache_sample(key, rng, latent=latent, targets=targets, tokens=tokens)


def clean_cache(folder: Path, sizes=(5, 4, 5)) -> Path:
    rng = np.random.default_rng(0)
    n = iter(range(1000))
    return write_cache(folder, [[sample(f"k{next(n):04d}", rng) for _ in range(size)] for size in sizes])


def corrupt_cache(folder: Path) -> Path:
    """4 shards, 17 samples promised: a garbled .npy, a NaN latent, a foreign layout, and a tar cut
    inside its 3rd sample (samples 3..5 lost: 2 after the cut + the cut one)."""
    rng = np.random.default_rng(1)
    n = iter(range(1000))
    shards = [[sample(f"k{next(n):04d}", rng) for _ in range(size)] for size in (4, 5, 3, 5)]
    shards[0][1]["latent.npy"] = b"\x93NUMPY garbage"
    shards[1][2]["latent.npy"] = npy(np.full((16, 8, 8), np.nan))
    shards[2][0]["clip.tokens.npy"] = npy(rng.normal(size=(7, 24)))  # another layout
    write_cache(folder, shards)
    path = folder / "shards" / "shard-000003.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    third = [m for m in members if m.name.startswith("k0014")][0]
    path.write_bytes(path.read_bytes()[:third.offset_data + 10])
    return folder


def epoch0_keys(data: StreamData, rank: int, world: int) -> tuple[list[str], dict]:
    """Keys this rank reads in epoch 0 (before the buffer), and its counters after the epoch."""
    s = SampleStream(data, seed=3, rank=rank, world=world, buffer_size=1)
    keys = []
    while True:
        key = s.next_input().key
        if s.epoch > 0:
            return keys, s.stats
        keys.append(key)


@pytest.mark.parametrize("world", [1, 2, 4, 5])
def test_ranks_read_disjoint_data_and_count_corruption_like_the_memory_loader(tmp_path, world):
    folder = corrupt_cache(tmp_path / "cache")
    memory = load_cache_folder(folder, ["clip"])
    assert memory.skipped == {"bad_samples": 6, "bad_shards": 1} and len(memory) == 11
    data = StreamData.from_folder(folder, ["clip"])
    per_rank = [epoch0_keys(data, r, world) for r in range(world)]
    keys = [k for ks, _ in per_rank for k in ks]
    assert sorted(keys) == sorted(memory.keys), "every valid sample once per epoch, over all ranks"
    assert all(len(ks) > 0 for ks, _ in per_rank)
    assert {f: sum(st[f] for _, st in per_rank) for f in memory.skipped} == memory.skipped
    if world > 4:  # fewer shards than ranks: every rank reads every shard, keeps its own samples
        assert SampleStream(data, seed=3, rank=0, world=world, buffer_size=1).split == "samples"


def test_counts_are_not_repeated_in_later_epochs(tmp_path):
    data = StreamData.from_folder(corrupt_cache(tmp_path / "cache"), ["clip"])
    s = SampleStream(data, seed=0, rank=0, world=1, buffer_size=4)
    for _ in range(40):  # ~4 epochs
        s.next_sample()
    assert s.epoch >= 3 and s.stats == {"bad_samples": 6, "bad_shards": 1}


def test_every_rank_yields_one_batch_per_step(tmp_path):
    data = StreamData.from_folder(clean_cache(tmp_path / "cache", sizes=(6, 1, 1)), ["clip"])  # unequal shards
    for rank in range(2):
        batches = list(StreamBatches(data, batch=4, seed=0, start=0, steps=7, rank=rank, world=2, buffer_size=3))
        assert [b["step"] for b in batches] == list(range(7)) and all(len(b["data"]) == 2 for b in batches)


def test_shuffle_buffer_reorders_but_keeps_epoch_contents(tmp_path):
    data = StreamData.from_folder(clean_cache(tmp_path / "cache"), ["clip"])
    plain = SampleStream(data, seed=0, rank=0, world=1, buffer_size=1)
    order = [plain.next_sample()[1] for _ in range(14)]
    assert sorted(order) == sorted(load_cache_folder(tmp_path / "cache", ["clip"]).keys)
    shuffled = SampleStream(data, seed=0, rank=0, world=1, buffer_size=6)
    drawn = [shuffled.next_sample()[1] for _ in range(14 * 5)]
    assert drawn[:14] != order
    counts = {k: drawn.count(k) for k in order}
    assert min(counts.values()) >= 2 and sum(counts.values()) == 70, counts


@pytest.mark.parametrize("cut", [0, 3, 9, 23])
def test_position_restores_exactly(tmp_path, cut):
    """A stream restored from a (JSON round-tripped) snapshot continues with the same samples, from
    inside a shard, across epoch boundaries and over damaged shards."""
    data = StreamData.from_folder(corrupt_cache(tmp_path / "cache"), ["clip"])
    a = SampleStream(data, seed=5, rank=0, world=1, buffer_size=5)
    for _ in range(cut):
        a.next_sample()
    position = json.loads(json.dumps(a.snapshot()))
    rest = [a.next_sample() for _ in range(20)]
    b = SampleStream(data, seed=5, rank=0, world=1, buffer_size=5)
    b.restore(position)
    again = [b.next_sample() for _ in range(20)]
    assert [r[:2] for r in rest] == [r[:2] for r in again]
    assert all(np.array_equal(x.arrays[n], y.arrays[n]) for x, y in zip(rest, again) for n in x.arrays)
    assert a.snapshot() == b.snapshot()


def test_injected_opener(tmp_path):
    """The stream reads through any `open_fn(name)` (the task layer passes Storage.open_read)."""
    folder = clean_cache(tmp_path / "cache")
    blobs = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.glob("shards/*.tar")}
    opened = []

    def open_fn(name):
        opened.append(name)
        return io.BytesIO(blobs[name])

    data = StreamData(ShardSource(list(blobs), open_fn, where="memory://cache"), ["clip"])
    batch = next(iter(StreamBatches(data, batch=4, seed=0, start=0, steps=1, buffer_size=2)))
    assert len(batch["data"]) == 4 and set(opened) <= set(blobs) and opened


def test_task_layer_source_reads_through_storage(tmp_path):
    from tasks.pretrain import StoreOpener, stream_source
    from tasks.settings import get_settings
    from tasks.storage import Storage

    folder = corrupt_cache(tmp_path / "cache")
    source = stream_source(f"file://{folder}", Storage.from_settings(get_settings(home=tmp_path / "home")))
    assert isinstance(source.open_fn, StoreOpener) and source.names == [f"shards/shard-{i:06d}.tar" for i in range(4)]
    assert source.expected["shard-000003.tar"] == 5
    local = ShardSource.from_folder(folder)
    assert source.names == local.names and source.expected == local.expected


# ---------------------------------------------------------------------------------------------- training

def cfg(**kw) -> PretrainConfig:
    base = dict(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2, log_every=1, accelerator="cpu",
                kd={"feature_kd": False}, data="stream", shuffle_buffer=5)
    return PretrainConfig.from_dict(base | kw)


def test_pretrain_stream_resume_is_bitwise_identical(tmp_path):
    folder = corrupt_cache(tmp_path / "cache")
    stream = lambda: StreamData.from_folder(folder, ["clip"])  # noqa: E731 - a fresh stream per run
    full = fit(PRESET, cfg(), stream(), CACHE, tmp_path / "full")
    assert full["step"] == 6 and full["data_skipped"] == {"bad_samples": 6, "bad_shards": 1}  # 24 samples > 1 epoch
    part = fit(PRESET, cfg(), stream(), CACHE, tmp_path / "part", callbacks=[StopAt(3)])
    assert part["step"] == 3
    meta = json.loads((latest_state(tmp_path / "part") / "state.json").read_text())
    assert meta["step"] == 3 and meta["data_position"]["world"] == 1
    position = meta["data_position"]["ranks"][0]["stream"]
    assert len(position["buffer"]) == 5 and position["emitted"] == 12
    resumed = fit(PRESET, cfg(), stream(), CACHE, tmp_path / "part")
    assert resumed["resumed_from"].endswith("step-00000003") and resumed["step"] == 6
    assert resumed["data_skipped"] == full["data_skipped"]
    for name in ("modules.safetensors", "optimizer.safetensors"):
        assert same(weights(tmp_path / "full", name), weights(tmp_path / "part", name)), name
    fit(PRESET, cfg(data="memory"), load_cache_folder(folder, ["clip"]), CACHE, tmp_path / "memory")
    assert not same(weights(tmp_path / "memory"), weights(tmp_path / "full"))  # another batch order
    done = fit(PRESET, cfg(), stream(), CACHE, tmp_path / "full")  # complete: counters from the checkpoint
    assert done["step"] == 6 and done["data_skipped"] == full["data_skipped"]


def test_reader_process_runs_ahead_but_resumes_exactly(tmp_path):
    """With a background reader (data_workers=1) the stream runs batches ahead of training; the
    checkpoint still holds the position of the last batch trained on."""
    folder = clean_cache(tmp_path / "cache")
    stream = lambda: StreamData.from_folder(folder, ["clip"])  # noqa: E731
    fit(PRESET, cfg(steps=5), stream(), CACHE, tmp_path / "a")
    assert fit(PRESET, cfg(steps=5, data_workers=1), stream(), CACHE, tmp_path / "b", callbacks=[StopAt(2)])["step"] == 2
    assert fit(PRESET, cfg(steps=5, data_workers=1), stream(), CACHE, tmp_path / "b")["step"] == 5
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_data_mode_must_match_the_data(tmp_path):
    from snapgen_model.config_base import ConfigError

    folder = clean_cache(tmp_path / "cache")
    with pytest.raises(ValueError, match="pretrain.data=stream needs a StreamData"):
        fit(PRESET, cfg(), load_cache_folder(folder, ["clip"]), CACHE, tmp_path / "x")
    with pytest.raises(ConfigError, match="pretrain.data_workers"):
        cfg(data_workers=2)


def test_distill_stream_resume_is_bitwise_identical(tmp_path):
    from tests.unit.test_distill_steps import cfg as distill_cfg
    from tests.unit.test_distill_steps import student_and_conditioner, teacher_null, tiny_teacher
    from snapgen_model.training.distill_steps import fit_distill

    folder = clean_cache(tmp_path / "cache", sizes=(3, 3))

    def run(root, callbacks=()):
        student, conditioner = student_and_conditioner()
        return fit_distill(PRESET, distill_cfg(steps=4, data="stream", shuffle_buffer=3),
                           StreamData.from_folder(folder, ["clip"]), CACHE, root, teacher=tiny_teacher(),
                           student=student, conditioner=conditioner, teacher_null=teacher_null(), callbacks=callbacks)

    assert run(tmp_path / "full")["step"] == 4
    assert run(tmp_path / "part", [StopAt(2)])["step"] == 2
    resumed = run(tmp_path / "part")
    assert resumed["resumed_from"].endswith("step-00000002") and resumed["step"] == 4
    for name in ("modules.safetensors", "optimizer.safetensors"):
        assert same(weights(tmp_path / "full", name), weights(tmp_path / "part", name)), name
