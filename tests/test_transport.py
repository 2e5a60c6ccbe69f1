"""The client's wire (zkfs/transport.py) and the retry promises built on it
(zkfs/api.py): a request that may have reached the server is never sent twice
unless it is idempotent, a short or cut-off answer is an error (never short
data), and every failure is one clear Unreachable/ServerError.

The faults come from a raw TCP peer on 127.0.0.1 that answers each request in a
chosen wrong way; the happy path runs against a real server.
"""
from __future__ import annotations

import datetime
import gc
import ipaddress
import socket
import ssl
import threading
import time
import weakref
from uuid import uuid4

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zkfs.api import ApiClient
from zkfs.errors import ServerError, Unreachable
from zkfs.transport import ConnectError, ConnectionCut, ReadTimeout, Urllib3Transport


class FaultyPeer:
    """Accepts connections and, per request, reads it whole and then does
    ``behaviour``: "hang up" (close without answering), "truncate" (promise 100
    body bytes, send 10, close) or "stall" (never answer)."""

    def __init__(self, behaviour: str):
        self.behaviour = behaviour
        self.requests: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, body = buf.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head.split(b"\r\n")[0])
            if self.behaviour == "truncate":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            elif self.behaviour == "stall":
                self._stop.wait(30)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for c in self._conns:
            c.close()


@pytest.fixture
def peer(request):
    p = FaultyPeer(request.param)
    yield p
    p.close()


def _refused_url() -> str:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_refused_connection_is_a_connect_error_and_a_clear_unreachable():
    url = _refused_url()
    transport = Urllib3Transport(max_connections=2, connect_timeout=1, read_timeout=1)
    with pytest.raises(ConnectError):
        transport.send("GET", url + "/x")
    api = ApiClient(url, retry_seconds=0.3)
    t0 = time.monotonic()
    with pytest.raises(Unreachable, match=r"cannot reach the server at http://127\.0\.0\.1:\d+"):
        api.ops([])
    assert time.monotonic() - t0 < 3, "a refused POST is retried only within the retry window"


@pytest.mark.parametrize("peer", ["hang up"], indirect=True)
def test_a_change_cut_off_after_sending_is_not_sent_again(peer):
    api = ApiClient(peer.url, token="t", retry_seconds=1.0)
    with pytest.raises(Unreachable):
        api.ops([{"op": "noop"}])
    assert [r.split(b" ")[0] for r in peer.requests] == [b"POST"], \
        "a POST that reached the server was repeated (it may have been applied)"


@pytest.mark.parametrize("peer", ["hang up", "truncate"], indirect=True)
def test_reads_cut_off_are_retried_then_reported_never_returned_short(peer):
    transport = Urllib3Transport(max_connections=2, connect_timeout=1, read_timeout=5)
    with pytest.raises(ConnectionCut):
        transport.send("GET", peer.url + "/x")
    api = ApiClient(peer.url, token="t", retry_seconds=0.8)
    with pytest.raises(Unreachable):
        api.get_blob(uuid4(), uuid4())
    assert len(peer.requests) >= 3, "an idempotent read should have been retried"


@pytest.mark.parametrize("peer", ["stall"], indirect=True)
def test_a_silent_server_times_out(peer):
    transport = Urllib3Transport(max_connections=2, connect_timeout=1, read_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(ReadTimeout):
        transport.send("GET", peer.url + "/x")
    assert 0.4 < time.monotonic() - t0 < 5


def test_real_server_round_trip(server):
    """Query, JSON answer and JSON error bodies against the real server (every
    CLI and mount test goes through this transport as well)."""
    api = ApiClient(server.url)
    assert api.kdf("nobody-here")["alg"] == "argon2id"    # decoy parameters
    for call in (lambda: api.get_blob(uuid4(), uuid4()), lambda: api.put_blob(uuid4(), uuid4(), b"x" * 5000)):
        with pytest.raises(ServerError) as err:           # no token
            call()
        assert err.value.status == 401
    api.close()


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_an_untrusted_certificate_is_refused_and_said_so(tmp_path):
    """https:// verifies the server's certificate (THREAT_MODEL: network attacker):
    a self-signed one gets a clear TLS error, and no request is sent through it."""
    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got_request = threading.Event()

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    if tls.recv(1024):
                        got_request.set()
            except (ssl.SSLError, OSError):
                pass                                  # the client hung up mid-handshake

    threading.Thread(target=serve, daemon=True).start()
    try:
        api = ApiClient(f"https://127.0.0.1:{port}", token="secret-token", retry_seconds=0.3)
        with pytest.raises(Unreachable, match="TLS: .*certificate verify failed"):
            api.account()
        assert not got_request.is_set(), "a request (and its token) went through an untrusted connection"
    finally:
        listener.close()


class _Marker:
    """Stands for a caller's buffers (a chunk's plaintext, its token)."""


def test_a_failed_request_keeps_nothing_of_its_callers_alive():
    """A request that fails leaves no reference cycle (the retry loop's state and
    the exception's frames) holding its callers' frames: a mount writing with the
    server away kept every chunk it tried to upload, plaintext and ciphertext,
    until Python's cycle collector happened to run (1.3 GiB for 0.5 GiB written)."""
    api = ApiClient(_refused_url(), retry_seconds=0.3)
    held: list[weakref.ref] = []

    def caller():
        buffers = _Marker()
        held.append(weakref.ref(buffers))
        api.ops([])

    gc.collect()
    gc.disable()
    try:
        try:
            caller()
        except Unreachable:
            pass
        assert held and held[0]() is None, "the failed request's caller frame is still alive"
    finally:
        gc.enable()
