"""Servers the project starts listen on 127.0.0.1 unless told otherwise.

Runtime: the listening TCP sockets of the real servers the tests start (SeaweedFS, mlflow server,
the Prefect API server, a Dask cluster as the caching flow configures it) are read from /proc and
must all be loopback. Static: the `snapgen ui` command and the compose file default to 127.0.0.1."""
from __future__ import annotations

import inspect
import ipaddress
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _listen_table() -> dict[int, tuple[str, int]]:
    """socket inode -> (address, port) of every TCP socket in LISTEN state (IPv4 and IPv6)."""
    table = {}
    for name, size in (("tcp", 4), ("tcp6", 16)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A":
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints 32-bit words host-endian
            table[inode] = (str(ipaddress.ip_address(raw if size == 16 else raw[:4])), int(hex_port, 16))
    return table


def listening(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket held by ``pids``."""
    table, found = _listen_table(), set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in table:
                    found.add(table[inode])
    return sorted(found)


def group_pids(pgid: int) -> list[int]:
    from tests.fixtures.mlflow_server import group_members

    return group_members(pgid)


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_test_servers_listen_on_loopback_only(seaweed_s3, mlflow_server, prefect_harness, record):
    from prefect.settings import PREFECT_API_URL

    seen = {}
    if not seaweed_s3.is_running:
        seaweed_s3.start()
    seen["seaweedfs"] = listening(group_pids(seaweed_s3.process.pid))
    assert ("127.0.0.1", seaweed_s3.ports["s3"]) in seen["seaweedfs"], seen["seaweedfs"]
    seen["mlflow"] = listening(group_pids(mlflow_server.process.pid))
    assert ("127.0.0.1", mlflow_server.port) in seen["mlflow"], seen["mlflow"]
    api = urlsplit(PREFECT_API_URL.value())
    assert api.hostname == "127.0.0.1"
    table = _listen_table().values()
    seen["prefect"] = sorted({entry for entry in table if entry[1] == api.port})
    assert seen["prefect"], f"nothing listens on the Prefect API port {api.port}"
    exposed = {name: [a for a in addrs if not loopback(a[0])] for name, addrs in seen.items()}
    assert not any(exposed.values()), f"listening beyond loopback: {exposed}"
    record(servers={k: [f"{a}:{p}" for a, p in v] for k, v in seen.items()})


def test_dask_cluster_of_the_caching_flow_listens_on_loopback(monkeypatch, record):
    """The cluster `run_cache(task_runner="dask")` builds, started with the same arguments."""
    import prefect_dask
    from distributed import LocalCluster

    import flows.cache as fc

    captured = {}

    class Capture(Exception):
        pass

    def fake_runner(**kwargs):
        captured.update(kwargs)
        raise Capture

    monkeypatch.setattr(prefect_dask, "DaskTaskRunner", fake_runner)
    with pytest.raises(Capture):
        fc.run_cache(fc.CacheParams(dataset_uri="file:///nowhere", bundle_uri="file:///nowhere"), task_runner="dask",
                     workers=1)
    assert "address" not in captured and captured["cluster_kwargs"]["processes"] is True
    started = time.monotonic()
    with LocalCluster(**captured["cluster_kwargs"]) as cluster:
        addresses = [cluster.scheduler_address] + [w.address for w in cluster.workers.values()]
        pids = [os.getpid()] + [w.pid for w in cluster.workers.values() if getattr(w, "pid", None)]
        sockets = listening(pids)
        ports = {urlsplit(a).port for a in addresses}
        mine = [s for s in sockets if s[1] in ports]
    assert all(urlsplit(a).hostname == "127.0.0.1" for a in addresses), addresses
    assert len(mine) == len(ports) and all(loopback(a) for a, _ in mine), (addresses, sockets)
    record(dask=addresses, startup_s=time.monotonic() - started)


def test_server_commands_default_to_loopback():
    """`snapgen ui` binds 127.0.0.1 unless --host says otherwise; every port the compose file
    publishes goes to ${BIND_ADDRESS:-127.0.0.1}; no product code or test server fixture binds 0.0.0.0
    (inside infra/ containers do, behind those published ports)."""
    import yaml

    from flows.cli_pipeline import ui

    assert inspect.signature(ui).parameters["host"].default.default == "127.0.0.1"
    compose = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    published = [(name, p) for name, svc in compose.get("services", {}).items() for p in svc.get("ports", [])]
    assert published
    bad = [(n, p) for n, p in published if not str(p).startswith(("${BIND_ADDRESS:-127.0.0.1}:", "127.0.0.1:"))]
    assert not bad, f"published beyond loopback by default: {bad}"
    offenders = []
    for top in ("snapgen_model", "tasks", "flows", "tests/fixtures", "tests/reliability"):
        for path in (ROOT / top).rglob("*.py"):
            if path.name == Path(__file__).name:
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if "0.0.0.0" in line and "127.0.0.1" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, offenders
