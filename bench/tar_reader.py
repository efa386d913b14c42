"""The project's tar reader (`data.sources.iter_tar_groups`) against webdataset's own stages
(`tariterators.tar_file_iterator` + `group_by_keys`) on the same shards: samples/s, alternating
rounds, and whether both yield the same samples in the same order.

    python bench/tar_reader.py "SHARD_GLOB" [--shards 8] [--rounds 3]
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snapgen_model.data.sources import iter_tar_groups  # noqa: E402


def webdataset_groups(stream):
    """(key, {ext: bytes}) through webdataset's tar stages."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def files():
        for member in tar_file_iterator(stream):
            member["__url__"] = ""
            yield member

    for sample in group_by_keys(files()):
        key = sample.pop("__key__")
        yield key, {k: v for k, v in sample.items() if not k.startswith("__")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pattern")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    shards = sorted(glob.glob(args.pattern))[:args.shards]
    if not shards:
        raise SystemExit(f"no shards match {args.pattern!r}")
    readers = {"ours (iter_tar_groups)": iter_tar_groups, "webdataset stages": webdataset_groups}
    for rnd in range(args.rounds):
        for name, read in readers.items():
            start, n, size = time.perf_counter(), 0, 0
            for shard in shards:
                with open(shard, "rb") as f:
                    for _, members in read(f):
                        n, size = n + 1, size + sum(len(v) for v in members.values())
            dt = time.perf_counter() - start
            print(f"round {rnd} {name}: {n} samples, {size / 1e6:.1f} MB, {n / dt:,.0f} samples/s", flush=True)
    same = all(list(iter_tar_groups(open(s, "rb"))) == list(webdataset_groups(open(s, "rb"))) for s in shards)
    print(f"same samples in the same order: {same}")


if __name__ == "__main__":
    main()
