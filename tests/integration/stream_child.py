"""Training child on the streaming data path for the kill -9 test: `tests.reliability.train_child`
(the product's fit / fit_distill) with `data=stream` and the cache folder streamed, not loaded."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def run(spec: dict[str, Any], callbacks: tuple = ()) -> dict[str, Any]:
    import snapgen_model.training.data as data_module
    from snapgen_model.training.stream import StreamData
    from tests.reliability import train_child

    original = data_module.load_cache_folder  # train_child imports it at call time: swap it for this run only
    data_module.load_cache_folder = lambda folder, encoders: StreamData.from_folder(folder, encoders)
    try:
        spec = spec | {"extra": {"data": "stream", "shuffle_buffer": 3} | spec.get("extra", {})}
        return train_child.run(spec, callbacks)
    finally:
        data_module.load_cache_folder = original


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    if spec.get("result_path"):
        Path(spec["result_path"]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
