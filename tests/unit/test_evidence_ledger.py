"""bench/toy_evidence.py's ledger: a piece's key follows every stage's resolved config (so a preset edit
retrains instead of reusing pieces trained under the old settings), and a ledger of another key version
is refused, not overwritten."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests.fixtures.bench import load_bench_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def evidence():
    return load_bench_script("toy_evidence")


def test_a_preset_edit_changes_the_key_with_the_same_overrides(evidence, monkeypatch):
    from flows import pipeline_config

    overrides = ["pretrain.train.kd.combine=scaled", "pretrain.train.seed=0"]
    before = evidence.pipeline_key("toy", overrides)
    assert evidence.pipeline_key("toy", overrides) == before  # deterministic
    edited = pipeline_config.toy()
    edited.pretrain.train = [*edited.pretrain.train, "steps=77"]
    monkeypatch.setitem(pipeline_config.PRESETS, "toy", lambda: edited)
    assert evidence.pipeline_key("toy", overrides) != before
    monkeypatch.undo()
    assert evidence.pipeline_key("toy", overrides) == before
    # an override that resolves to the preset's own value is the same piece
    assert evidence.pipeline_key("toy", [*overrides, "curate.scenes=8000"]) == before


def test_a_ledger_of_another_version_is_refused_and_left_alone(evidence, tmp_path):
    old = tmp_path / "ledger.json"
    old.write_text(json.dumps({"version": 1, "entries": {"k": {"variant": "scaled"}}}))
    with pytest.raises(SystemExit, match="version 1"):
        evidence.Ledger(old)
    assert json.loads(old.read_text())["entries"] == {"k": {"variant": "scaled"}}
    fresh = evidence.Ledger(tmp_path / "new.json")
    fresh.put("k2", "piece", {"x": 1})
    assert json.loads((tmp_path / "new.json").read_text())["version"] == evidence.LEDGER_VERSION


def test_fields_added_since_v2_stay_out_of_the_key_at_their_neutral_value(evidence):
    """Distillation's device placement and KD draw were added after ledger v2: at their old values they leave a key as it
    was (pieces recorded before stay valid), on two devices it is a different piece."""
    from flows.pipeline_config import build_config, resolved_stage_configs

    overrides = ["pretrain.train.kd.combine=scaled", "pretrain.train.seed=0", "distill.train.kd_timesteps=uniform"]
    resolved = resolved_stage_configs(build_config("toy", overrides))
    added = ("strategy", "devices", "num_nodes", "kd_timesteps")
    assert set(added) <= set(resolved["distill"])
    for name in added:
        resolved["distill"].pop(name)
    resolved.pop("export")  # a stage the evidence does not run, resolved by --dry-run since 2026-12-07
    resolved["teacher"]["path"] = "releases/toy-teacher/v2"  # the shipped release, relative to the checkout
    assert evidence.pipeline_key("toy", overrides) == evidence._key(["pipeline", "toy", resolved])
    assert evidence.pipeline_key("toy", [*overrides, "distill.train.devices=2"]) != evidence.pipeline_key("toy", overrides)
    # the product's default draw (the preset's density) trains differently: another piece
    assert evidence.pipeline_key("toy", overrides[:2]) != evidence.pipeline_key("toy", overrides)


def test_the_committed_ledger_holds_every_pipeline_of_the_committed_evidence_command(evidence):
    """The command bench/RESULTS.md records ("Toy evidence") still finds all six students in the committed ledger:
    a change to the `toy` pipeline or to what `snapgen run --dry-run` resolves that would retrain them (hours on 2
    cores) fails here, where it has to be decided (pinned in the evidence's overrides, or a new ledger)."""
    args = evidence.parse_args(["--ledger", str(ROOT / "bench" / "evidence" / "ledger-toy-v2.json"),
                                "--pretrain-steps", "4000", "--distill-steps", "300",
                                "--set", "pretrain.train.compile=true", "--set", "distill.train.kd_timesteps=uniform"])
    entries = json.loads((ROOT / "bench" / "evidence" / "ledger-toy-v2.json").read_text())["entries"]
    missing = [(variant, seed) for variant in ("task_only", "weighted", "scaled") for seed in args.seed_list
               if evidence.pipeline_key("toy", evidence.pipeline_overrides(args, variant, seed)) not in entries]
    assert missing == []


def test_a_pipeline_key_is_the_same_in_a_clone_at_another_path(evidence, tmp_path, monkeypatch):
    """CI clones the project to another folder: the shipped teacher's absolute path must not enter the key (it did,
    and the committed ledger's six students would be retrained in every clone that is not at /work/main)."""
    from snapgen_model.training import release

    here = evidence.pipeline_key("toy", ["pretrain.train.seed=0"])
    clone = tmp_path / "elsewhere"
    clone.mkdir()
    (clone / "releases").symlink_to(ROOT / "releases")
    monkeypatch.setattr(evidence, "ROOT", clone)
    monkeypatch.setattr(release, "RELEASES_DIR", clone / "releases")
    assert evidence.checkout_relative(str(clone / "releases" / "toy-teacher" / "v2")) == "releases/toy-teacher/v2"
    assert evidence.checkout_relative("/somewhere/else/teacher") == "/somewhere/else/teacher"
    assert evidence.pipeline_key("toy", ["pretrain.train.seed=0"]) == here


def test_each_ledger_reports_in_its_own_section(evidence):
    """A longer run (another ledger) must not overwrite the finished one's tables in bench/RESULTS.md."""
    v2, long = evidence.HEADING.format(ledger="ledger-toy-v2"), evidence.HEADING.format(ledger="ledger-toy-long")
    assert v2 != long and v2.startswith("## ") and long.startswith("## ")
    assert v2 in (ROOT / "bench" / "RESULTS.md").read_text()  # the committed section is the finished v2 run's


def test_a_carried_state_resumes_pretraining_on_another_machine_bitwise(evidence, tmp_path):
    """A piece cut off mid-pretraining used to start again from step 0 on a fresh machine (its state lived only
    under --home): about 80 minutes per student lost per session. `save_carry` copies the newest state of every
    unfinished run next to the ledger, `load_carry` puts it where the run resumes from on another home, and the
    resumed run ends bitwise where an uninterrupted one does. Finished runs are not carried, a carried state is
    replaced by a newer one, and a newer local state is not overwritten by an older carried one."""
    from tests.unit.test_pretrain import CACHE, PRESET, _weights, cfg, synthetic_data
    from tests.fixtures.training import StopAt
    from snapgen_model.training.pretrain import fit
    from snapgen_model.training.state import latest_state

    data = synthetic_data()
    fit(PRESET, cfg(), data, CACHE, tmp_path / "straight")
    machine_a, machine_b, carry = tmp_path / "a", tmp_path / "b", tmp_path / "carry"
    run = "pretrain-0123abcd"
    fit(PRESET, cfg(), data, CACHE, machine_a / "runs" / run / "state", callbacks=[StopAt(3)])
    (machine_a / "runs" / "pretrain-finished" / "state" / "step-00000006").mkdir(parents=True)
    (machine_a / "runs" / "pretrain-finished" / "state" / "step-00000006" / "state.json").write_text("{}")
    (carry / "pretrain-finished" / "step-00000002").mkdir(parents=True)  # carried earlier, finished since
    (carry / "pretrain-finished" / "step-00000002" / "state.json").write_text("{}")
    other = machine_a / "runs" / "pretrain-another-ledger" / "state" / "step-00000004"  # trained before, elsewhere
    other.mkdir(parents=True)
    (other / "state.json").write_text("{}")
    os.utime(other / "state.json", (1e9, 1e9))

    said = evidence.save_carry(machine_a, carry, finished={"finished"})  # --save-carry: the run trained last
    assert sorted(p.name for p in carry.iterdir()) == [run]
    assert [p.name for p in (carry / run).iterdir()] == ["step-00000003"] and len(said) == 2
    assert evidence.save_carry(machine_a, carry, finished={"finished"}) == []  # nothing newer: nothing copied
    # a stopped invocation carries what it trained itself: nothing written since it started, nothing carried
    assert evidence.save_carry(machine_a, tmp_path / "carry2", finished=set(), since=time.time() + 60) == []

    assert evidence.load_carry(machine_b, carry) == [f"resuming {run} from its carried step-00000003 ({carry})"]
    resumed = fit(PRESET, cfg(), data, CACHE, machine_b / "runs" / run / "state")
    assert resumed["resumed_from"].endswith("step-00000003") and resumed["step"] == 6
    a, b = _weights(latest_state(tmp_path / "straight")), _weights(latest_state(machine_b / "runs" / run / "state"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert evidence.load_carry(machine_b, carry) == []  # the local state (step 6) is newer than the carried one

    fit(PRESET, cfg(), data, CACHE, machine_a / "runs" / run / "state")  # machine A trains on to step 6
    evidence.save_carry(machine_a, carry, finished=set())
    assert [p.name for p in (carry / run).iterdir()] == ["step-00000006"]  # replaced, not added
    assert evidence.load_carry(tmp_path / "c", carry, finished={"0123abcd"}) == []  # finished: not put back


def test_a_sigterm_stop_carries_the_state_it_trained_and_still_exits_143(evidence, tmp_path, monkeypatch):
    """The stop path of `main`: the pipeline raises SystemExit(143) (what training does on SIGTERM), the state it
    wrote is copied beside the ledger, the exit code stays 143, and the process's SIGTERM handler is put back."""
    import signal

    home, ledger = tmp_path / "home", tmp_path / "evidence" / "ledger-x.json"
    for name, value in (("SNAPGEN_HOME", str(home)), ("PREFECT_HOME", str(tmp_path / "prefect"))):
        monkeypatch.setenv(name, value)

    def stopped_pipeline(args, ledger_, preset, plan):
        state = home / "runs" / "pretrain-feedbeef" / "state" / "step-00000300"
        state.mkdir(parents=True)
        (state / "state.json").write_text(json.dumps({"step": 300}))
        raise SystemExit(143)

    monkeypatch.setattr(evidence, "compute", stopped_pipeline)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        evidence.main(["--preset", "toy-smoke", "--home", str(home), "--ledger", str(ledger), "--json", "", "--grid", ""])
    assert stop.value.code == 143
    assert (tmp_path / "evidence" / "carry" / "ledger-x" / "pretrain-feedbeef" / "step-00000300" / "state.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is before
