"""Progress lines of a training run: step, loss, speed and time left, at most every `every_s`, and at the end."""
from __future__ import annotations

import lightning.pytorch as pl
import torch

from snapgen_model.training.progress import ProgressCallback, progress_line


class _Line(pl.LightningModule):
    """y = 3x by least squares, batches of 8 as dicts (the shape of snapgen's index batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def train_dataloader(self):
        x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader([{"step": torch.tensor(i), "idx": x[i * 8:(i + 1) * 8]} for i in range(8)],
                                           batch_size=None)

    def training_step(self, batch, batch_idx):
        x = batch["idx"]
        loss = ((self.w * x - 3 * x) ** 2).mean()
        self.log("loss/total", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SleepsAt(_Line):
    """`_Line` whose step `at` sleeps `seconds` (a warm-up, a pause)."""

    def __init__(self, at: int, seconds: float) -> None:
        super().__init__()
        self.at, self.seconds = at, seconds

    def training_step(self, batch, batch_idx):
        if batch_idx == self.at:
            import time

            time.sleep(self.seconds)
        return super().training_step(batch, batch_idx)


def _every_line(module: pl.LightningModule, root, **progress) -> list[str]:
    """Every progress line of an 8-step run (one per step, and the end)."""
    lines: list[str] = []
    pl.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[ProgressCallback(lines.append, 8, 0.0, **progress)],
               default_root_dir=root).fit(module)
    return lines


def test_every_step_reported_with_loss_speed_and_time_left_then_the_end(tmp_path):
    lines: list[str] = []
    cb = ProgressCallback(lines.append, total_steps=8, every_s=0.0)
    pl.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path).fit(_Line())
    assert len(lines) == 9  # one per step (every_s=0), one at the end
    assert lines[0].startswith("step 1/8 (12%)") and lines[0].endswith("first step (warm-up); time left from the next line")
    assert "left" in lines[1] and "img/s" not in lines[0]
    assert lines[-1].startswith("step 8/8 (100%)") and "left" not in lines[-1]
    assert all("loss " in line for line in lines) and all(" img/s" in line for line in lines[1:])
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in lines]
    assert losses[-1] < losses[0]  # the logged loss, not a constant


def test_a_resumed_run_says_where_it_resumes(tmp_path):
    """A run that continues from a saved state (after a SIGTERM or a kill) names the step it resumes at first."""

    class Resumed(_Line):
        def current_step(self) -> int:
            return 5 + self.global_step

    lines: list[str] = []
    cb = ProgressCallback(lines.append, total_steps=8, every_s=0.0)
    pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path).fit(Resumed())
    assert lines[0] == "resuming at step 5/8 from the saved training state"
    assert lines[1].startswith("step 6/8") and lines[-1].startswith("step 8/8 (100%)")
    fresh: list[str] = []
    pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[ProgressCallback(fresh.append, 8, 0.0)], default_root_dir=tmp_path).fit(_Line())
    assert not any("resuming" in line for line in fresh)


def test_speed_and_time_left_leave_out_the_warm_up_step(tmp_path):
    """The first step carries the warm-up (torch.compile on CPU: minutes): counted in, a 90-minute run's first
    lines read "0 img/s, about 1240 h left". Here it takes 1.5 s and the other seven almost nothing: the time
    left after step 2 is a few seconds at most, not 6 x 0.75 s, and the speed is far above 8 / 1.5 s."""
    lines = _every_line(_SleepsAt(0, 1.5), tmp_path)
    assert "warm-up" in lines[0] and "img/s" not in lines[0]
    left = lines[1].split("about ")[1].split(" left")[0]
    assert left.endswith(" s") and float(left[:-2]) < 3.0, lines[1]
    assert float(lines[-1].split(" img/s")[0].rsplit(", ", 1)[1]) > 20, lines[-1]


def test_lines_are_rate_limited(tmp_path):
    lines: list[str] = []
    cb = ProgressCallback(lines.append, total_steps=8, every_s=3600.0)
    pl.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path).fit(_Line())
    assert len(lines) == 1 and lines[0].startswith("step 8/8")


def test_line_text_by_hand():
    # 100 of 500 steps in 50 s (a run resumed at step 0): 400 steps left at 0.5 s each = 200 s = about 3 min
    assert progress_line(100, 500, 50.0, 0.21344, 256.0, 100) == \
        "step 100/500 (20%), 50 s, loss 0.2134, 256 img/s, about 3 min left"
    # resumed at 400: 20 steps trained in 10 s, 80 left -> 40 s
    assert progress_line(420, 500, 10.0, None, None, 20) == "step 420/500 (84%), 10 s, about 40 s left"
    # 279 s elapsed, of which 4 s for the 10 steps after the warm-up step: 89 left -> about 36 s
    assert progress_line(11, 100, 279.0, None, 25.0, 10, 4.0) == "step 11/100 (11%), 279 s, 25 img/s, about 36 s left"
    assert progress_line(1, 100, 279.0, 3.9, None, 0) == \
        "step 1/100 (1%), 279 s, loss 3.9000, first step (warm-up); time left from the next line"


def test_a_launched_runs_progress_lines_are_forwarded_and_the_rest_kept_for_errors(capsys):
    """Several-device pretraining runs in a child process: rank 0 prints marked progress lines on stderr,
    the parent passes them to its run log as they come and keeps the other output for an error message."""
    from tasks.launch import PROGRESS_MARK, forward_progress, launch_hooks

    spec = {"progress": True, "stage": "distill", "distill": {"steps": 40}}
    (cb,) = launch_hooks(spec)["callbacks"]
    cb.report("step 4/40 (10%), 3 s")
    printed = capsys.readouterr().err
    assert printed == f"{PROGRESS_MARK}step 4/40 (10%), 3 s\n" and cb.total == 40
    seen: list[str] = []
    tail = forward_progress(["warning: x\n", printed, "Traceback\n", "boom\n"], seen.append, tail=2)
    assert seen == ["step 4/40 (10%), 3 s"]
    assert tail == ["Traceback", "boom"]


def test_the_launch_spec_carries_the_resume_policy(tmp_path):
    """`snapgen pretrain --resume none` on several devices trains from scratch, as in one process: the
    launcher reads the policy from the spec (it fell back to "latest" when the spec had none)."""
    from snapgen_model.training.pretrain import PretrainConfig
    from tasks.pretrain import launch_spec

    cfg = PretrainConfig().with_overrides(["devices=2", "mode=cached"])
    manifest = {"config": {}, "feature_layers": [-1]}
    for policy in ("none", "latest", str(tmp_path / "step-00000010")):
        spec = launch_spec(str(tmp_path), manifest, "toy", [], cfg, tmp_path / "state", ["clip"], resume=policy)
        assert spec["resume"] == policy and spec["pretrain"]["devices"] == 2 and spec["stage"] == "pretrain"


def test_speed_after_a_pause_is_the_recent_speed(tmp_path):
    """Speed and time left come from the last `window_s` seconds: a run paused for a while (here 2 s in step 4, a
    window of 1 s) reports its own speed again a line later. Averaged since the first step, every later line would
    read under 8 x 7 / 2 = 28 img/s; the steps themselves take milliseconds (under 200 ms each passes)."""
    lines = _every_line(_SleepsAt(3, 2.0), tmp_path, window_s=1.0)
    speed = [float(line.split(" img/s")[0].rsplit(", ", 1)[1]) for line in lines[1:]]
    assert speed[2] < 28, lines[3]  # the line of the paused step carries the pause
    assert min(speed[3:]) > 40, lines  # the lines after it do not
    left = lines[4].split("about ")[1].split(" left")[0]
    # 2 steps left at the recent speed; at the average since the first step, 2 x 2 s / 5 = 0.8 s: "about 1 s"
    assert left == "0 s", lines[4]
