"""tests/fixtures/processes.stop_process_tree: what the deployments test uses to stop its `prefect worker`.

A worker under load that ignores SIGTERM (and a flow-run child it started in its own session) is stopped
with SIGKILL after the grace period; nothing outlives the call."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil

from tests.fixtures.processes import stop_process_tree

STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_worker_that_ignores_sigterm_is_killed_with_its_children() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child_pid = int(proc.stdout.readline())
    started = time.monotonic()
    survivors = stop_process_tree(proc, grace_s=1.0)
    assert survivors == []
    assert time.monotonic() - started < 15
    assert proc.poll() is not None
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE


def test_a_worker_that_honours_sigterm_stops_within_the_grace_period() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    time.sleep(0.2)
    started = time.monotonic()
    assert stop_process_tree(proc, grace_s=30.0) == []
    assert time.monotonic() - started < 10  # SIGTERM sufficed: no wait for the 30 s grace period, no SIGKILL
