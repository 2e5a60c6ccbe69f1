"""A lying server, for tests: a loopback HTTP proxy in front of the real server
that rewrites the server's *answers* by rule and records every request it
*received* (what a server, or anyone on the path, would learn).

tests/hostile.py edits what the server stores; this edits what it says. Rules:

    proxy.lie("GET", "/auth/kdf", lambda body, req: {...})        # JSON in, JSON out
    proxy.lie("GET", r"/blobs/.*", lambda data, req: ..., json=False)   # bytes
    proxy.lie("GET", r"/blobs/.*", truncate=True)    # a body cut short, connection closed

A rule matches the method and a regex over the API path (``/api/v1`` stripped,
no query string); ``times`` bounds how often it fires; ``when(req)`` narrows it.
Only 2xx answers are rewritten. ``proxy.received`` lists the requests.
"""
from __future__ import annotations

import json as jsonlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import pytest
import urllib3

API = "/api/v1"
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


@dataclass
class Received:
    method: str
    path: str                      # under /api/v1, without the query
    query: dict[str, list[str]]
    headers: dict[str, str]        # names in lower case
    body: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.body)


@dataclass
class Rule:
    method: str
    path: re.Pattern
    rewrite: Callable[[Any, Received], Any] | None
    json: bool = True
    truncate: bool = False
    times: int | None = None
    when: Callable[[Received], bool] | None = None
    fired: int = 0

    def matches(self, req: Received) -> bool:
        return (self.method == req.method and self.path.fullmatch(req.path) is not None
                and (self.times is None or self.fired < self.times)
                and (self.when is None or self.when(req)))


@dataclass
class LyingProxy:
    upstream: str
    host: str = "127.0.0.1"
    rules: list[Rule] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = urllib3.PoolManager(maxsize=32, block=False, retries=False,
                                         timeout=urllib3.Timeout(connect=5, read=120))
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._httpd = ThreadingHTTPServer((self.host, 0), handler)
        self._httpd.daemon_threads = True
        self.url = f"http://{self.host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="lying-proxy", daemon=True)
        self._thread.start()

    def lie(self, method: str, path: str, rewrite: Callable[[Any, Received], Any] | None = None, *,
            json: bool = True, truncate: bool = False, times: int | None = None,
            when: Callable[[Received], bool] | None = None) -> Rule:
        rule = Rule(method, re.compile(path), rewrite, json, truncate, times, when)
        with self._lock:
            self.rules.append(rule)
        return rule

    def honest(self) -> None:
        """Drop every rule: from now on the proxy forwards faithfully."""
        with self._lock:
            self.rules.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if (method is None or r.method == method)
                    and (path is None or re.fullmatch(path, r.path))]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._pool.clear()

    # ------------------------------------------------------------ serving
    def _rule_for(self, req: Received) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(req):
                    rule.fired += 1
                    return rule
        return None

    def _forward(self, req: Received, raw_path: str) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in req.headers.items() if k not in ("host", "connection")}
        resp = self._pool.urlopen(req.method, self.upstream + raw_path, body=req.body or None,
                                  headers=headers, redirect=False, retries=False,
                                  preload_content=True, decode_content=False)
        return resp.status, [(k, v) for k, v in resp.headers.items() if k.lower() not in _HOP], resp.data


class _Handler(BaseHTTPRequestHandler):
    proxy: LyingProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:      # quiet
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        path = url.path[len(API):] if url.path.startswith(API) else url.path
        req = Received(self.command, path, parse_qs(url.query), {k.lower(): v for k, v in self.headers.items()}, body)
        with self.proxy._lock:
            self.proxy.received.append(req)
        status, headers, data = self.proxy._forward(req, self.path)
        rule = self.proxy._rule_for(req) if 200 <= status < 300 else None
        if rule is not None and rule.rewrite is not None:
            if rule.json:
                data = jsonlib.dumps(rule.rewrite(jsonlib.loads(data), req)).encode()
            else:
                data = rule.rewrite(data, req)
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        if rule is not None and rule.truncate:
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


# ---------------------------------------------------------------- listing lies
# Rewrites for GET /fs/dirs/{id}/entries ({"entries": [...]}) and POST /fs/listings
# ({"listings": [{"dir", "entries"}]}), e.g.
#     proxy.lie("GET", r"/fs/dirs/[^/]+/entries", drop_entry(name_hash))
#     proxy.lie("POST", "/fs/listings", drop_entry(name_hash))
#     proxy.lie("GET", rf"/fs/dirs/{d}/entries", add_entry(old_entry))    # a deleted one back
#     proxy.lie("GET", rf"/fs/dirs/{d}/entries", lambda body, req: old_body)   # an old listing
def _each_listing(body: dict, change: Callable[[list[dict]], list[dict]]) -> dict:
    if "entries" in body:
        return body | {"entries": change(body["entries"])}
    return body | {"listings": [lst | {"entries": change(lst["entries"])} for lst in body["listings"]]}


def drop_entry(name_hash: str) -> Callable[[dict, Received], dict]:
    """Hide the entry ``name_hash`` from every listing."""
    return lambda body, req: _each_listing(body, lambda es: [e for e in es if e["name_hash"] != name_hash])


def add_entry(entry: dict, directory: str | None = None) -> Callable[[dict, Received], dict]:
    """Put ``entry`` (an EntryOut as once served) into the listing (of ``directory``
    only, for POST /fs/listings), unless it is there."""
    def add(es: list[dict]) -> list[dict]:
        return es if any(e["name_hash"] == entry["name_hash"] for e in es) else [*es, entry]

    def rewrite(body: dict, req: Received) -> dict:
        if "entries" in body:
            return _each_listing(body, add)
        return body | {"listings": [lst | {"entries": add(lst["entries"])} if directory in (None, lst["dir"]["id"])
                                    else lst for lst in body["listings"]]}
    return rewrite


@pytest.fixture
def lying_proxy():
    """``lying_proxy(server)``: a LyingProxy in front of ``server`` (or a server URL),
    closed at teardown."""
    proxies: list[LyingProxy] = []

    def factory(server, host: str = "127.0.0.1") -> LyingProxy:
        p = LyingProxy(getattr(server, "url", server), host)
        proxies.append(p)
        return p

    yield factory
    for p in proxies:
        p.close()
