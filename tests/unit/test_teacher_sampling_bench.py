"""bench/teacher_sampling.py: its grid parser names bad points, and the shifted Euler grid is used and then put back."""
from __future__ import annotations

import pytest
import torch

from bench import teacher_sampling as ts
import snapgen_model.artifacts.teacher_bundle as tb
from snapgen_model.diffusion.samplers import make_timesteps


def test_parse_grid_reads_points() -> None:
    assert ts.parse_grid("24:5:1, 48:7.5:3") == [(24, 5.0, 1.0), (48, 7.5, 3.0)]


@pytest.mark.parametrize("text, named", [("24:5", "24:5"), ("x:5:1", "x:5:1"), ("0:5:1", "0:5:1"), ("24:5:1:9", "24:5:1:9"),
                                         ("24:nan:1", "24:nan:1"), ("24:5:inf", "24:5:inf"),
                                         ("24:0.5:1", "24:0.5:1"), ("24:5:0", "24:5:0"), (" , ", "no points")])
def test_parse_grid_names_the_bad_point(text: str, named: str) -> None:
    with pytest.raises(SystemExit, match=named):
        ts.parse_grid(text)


def test_euler_shift_changes_the_teacher_grid_and_restores_it() -> None:
    plain = tb.make_timesteps(8, 1.0, "cpu")
    with ts.euler_shift(3.0):
        shifted = tb.make_timesteps(8, 1.0, "cpu")
    assert torch.allclose(shifted, make_timesteps(8, 3.0))
    assert not torch.allclose(shifted, plain)  # more of the grid at high noise
    assert bool((shifted[1:-1] > plain[1:-1]).all())
    assert tb.make_timesteps is make_timesteps and torch.equal(tb.make_timesteps(8, 1.0, "cpu"), plain)


def test_table_lists_every_point_with_seen_and_held_out() -> None:
    row = {"steps": 24, "guidance": 5.0, "shift": 1.0, "overall": 0.5, "exact_count": 0.25,
           "splits": {"seen": 0.52, "heldout": 0.0}, "tasks": {t: 0.1 for t in ts.TASKS}}
    lines = ts.table([row, row | {"steps": 48}]).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|")
    assert lines[2].startswith("| 24 | 5 | 1 | 0.500 | 0.250 | 0.520 | 0.000 | 0.100") and lines[3].startswith("| 48 |")
