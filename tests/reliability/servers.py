"""Restartable real servers for the reliability tests.

``MlflowOnPort``: a real ``mlflow server`` (the session fixture's command line and environment)
whose port is fixed at construction, so it can be stopped mid-run and restarted on the same port
and the same SQLite store; clients keep their URI across the outage.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.fixtures.mlflow_server import free_port, server_command, server_env, stop_process_group, wait_healthy


@dataclass(eq=False)
class MlflowOnPort:
    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: list[float] = field(default_factory=list)  # seconds each start took

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> float:
        self.root.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(server_command(self.port, self.root), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.root, env=server_env(),
                                            start_new_session=True)
        wait_healthy(self.uri, self.process, self.root / "server.log", timeout)
        self.starts.append(time.monotonic() - began)
        return self.starts[-1]

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process_group(proc, grace_s=5.0)

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None
