"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real S3 server (SeaweedFS).

Real servers do not fail on cue, so this proxy produces the faults a flaky network or an
overloaded object store produces: HTTP 500/503 replies (with S3 XML error bodies), connection
resets (RST) before any reply, responses cut off half way through the body, and delays. Every
other request is forwarded unchanged (byte for byte, Host header included, so SigV4 signatures
stay valid) to the upstream server.

Faults are rules: ``proxy.add(kind, count=N | None, ...)`` applies to the next N matching
requests (None: until ``clear()``), optionally only to a method and/or a path substring. The
proxy counts requests and injected faults in ``stats``.
"""
from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

KINDS = ("status", "reset", "truncate", "delay")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_S3_CODES = {500: "InternalError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}


@dataclass
class Rule:
    kind: str
    count: int | None = 1  # None: persistent
    status: int = 503
    delay_s: float = 0.0
    method: str | None = None
    path_contains: str | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.count is not None and self.hits >= self.count:
            return False
        if self.method and method != self.method:
            return False
        return not self.path_contains or self.path_contains in path


@dataclass
class Stats:
    requests: int = 0
    forwarded: int = 0
    faults: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, outcome) of every request


class FaultProxy:
    """``with FaultProxy(upstream_url) as proxy: ... proxy.endpoint_url ...``"""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules: list[Rule] = []
        self.stats = Stats()
        self.lock = threading.Lock()
        self.server = _QuietServer((host, port), _handler_for(self))
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def add(self, kind: str, count: int | None = 1, **options: Any) -> Rule:
        """Inject fault ``kind`` (status, reset, truncate, delay) into the next ``count`` matching requests."""
        if kind not in KINDS:
            raise ValueError(f"fault kind {kind!r}: choose one of {KINDS}")
        rule = Rule(kind, count, **options)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def _take_rule(self, method: str, path: str) -> Rule | None:
        with self.lock:
            self.stats.requests += 1
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    self.stats.faults[rule.kind] += 1
                    return rule
        return None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out and hung up (broken pipe, reset) is expected here: no traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reset(self) -> None:
            """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _note(self, outcome: str) -> None:
            with proxy.lock:
                proxy.stats.log.append((self.command, self.path, outcome))

        def _handle(self) -> None:
            body = self._body()
            rule = proxy._take_rule(self.command, self.path)
            if rule is not None and rule.kind == "reset":
                self._note("reset")
                self._reset()
                return
            if rule is not None and rule.kind == "status":
                self._note(f"status {rule.status}")
                code = _S3_CODES.get(rule.status, "InternalError")
                xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>injected by the fault proxy</Message><Resource>{self.path}</Resource></Error>").encode()
                self.send_response(rule.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                return
            if rule is not None and rule.kind == "delay":
                self._note(f"delay {rule.delay_s}s")
                time.sleep(rule.delay_s)
            status, reason, headers, payload = self._forward(body)
            self.send_response(status, reason)
            for key, value in headers:
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            length = dict((k.lower(), v) for k, v in headers).get("content-length")
            self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(payload)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if rule is not None and rule.kind == "truncate" and len(payload) > 1:
                self._note("truncate")
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self._reset()
                return
            self.wfile.write(payload)
            with proxy.lock:
                proxy.stats.forwarded += 1
            if rule is None:
                self._note(f"forwarded {status}")

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in headers.items():
                    conn.putheader(key, value)
                conn.endheaders(body or None)
                resp = conn.getresponse()
                payload = resp.read()
                return resp.status, resp.reason, resp.getheaders(), payload
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
