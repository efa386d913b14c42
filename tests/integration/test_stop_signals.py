"""Stopping a command that runs a flow: Ctrl-C and SIGTERM to the whole process group end it promptly and
cleanly, and take Prefect's temporary API server with it.

Before: Prefect started its temporary server in the command's process group, so Ctrl-C (SIGINT to the whole
foreground group) and `kill -TERM -- -<group>` stopped the server together with the command, which then tried
to record the stop on the server it had just lost. A Ctrl-C'd flow hung for minutes printing "--- Error
logging to API ---"; a group SIGTERM printed connection-refused tracebacks for 75 s; a SIGTERM to the command
alone left the server running after the command had gone. Real Prefect (its own temporary server), real signals.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# what `snapgen` does before its first flow (flows.cli's callback and the commands' prefect_env_defaults)
CHILD = textwrap.dedent("""
    import sys, time, types
    from flows.console import exit_on_sigterm
    from tasks.defaults import prefect_env_defaults

    prefect_env_defaults(types.SimpleNamespace(home=sys.argv[1]))
    exit_on_sigterm()
    from prefect import flow

    @flow
    def long_stage():
        print("READY", flush=True)
        for _ in range(1200):
            time.sleep(0.25)

    try:
        long_stage()
    except KeyboardInterrupt:  # as click ends a Ctrl-C'd `snapgen` command: "Aborted!", exit 1
        print("Aborted!")
        sys.exit(1)
""")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "out.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PYTHONPATH": str(ROOT), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "400"}
    with open(log, "wb") as out:  # a group of its own, as a shell gives a foreground command
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "home")], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 420
    while "READY" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the flow did not start (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return proc, log


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 1), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_process_group_stops_the_flow_and_its_server_cleanly(tmp_path, signum, code):
    proc, log = _start(tmp_path)
    port = int(re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", log.read_text()).group(1))
    assert _listening(port)
    os.killpg(proc.pid, signum)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running 60 s after the signal:\n{log.read_text(errors='replace')[-3000:]}")
    text = log.read_text(errors="replace")
    assert "Error logging to API" not in text and "Traceback" not in text and "ConnectError" not in text, text[-3000:]
    assert proc.returncode == code, (proc.returncode, text[-2000:])
    assert "Crashed" in text or "aborted" in text  # the stop was recorded on the server, which was still up
    deadline = time.monotonic() + 15
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _listening(port), f"Prefect's temporary server on port {port} outlived the command"
