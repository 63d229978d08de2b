"""Safe media fetching (glimpse.server.media_fetch) against real HTTP(S) servers on loopback.

Every remote case talks to servers this file starts on 127.0.0.1 / 127.0.0.2 (nothing leaves the
machine); refusals are checked by the error type, by what the message must not reveal, and by the
internal server's request log staying empty. Local-file cases build a real tree under tmp_path.
127.0.0.2 passes the public-address rule only through GLIMPSE_UNSAFE_MEDIA_ADDRESSES (parsed here).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest
from PIL import Image

from glimpse.errors import InvalidInputError, MediaError, MediaTooLargeError
from glimpse.server.media_fetch import (
    ENV_UNSAFE_ADDRESSES,
    MediaAccessError,
    MediaPolicy,
    address_is_public,
    fetch_media,
    host_allowed,
    unsafe_media_addresses_from_env,
)

ALLOWED_IP = "127.0.0.2"  # the "public" media server; exempted through GLIMPSE_UNSAFE_MEDIA_ADDRESSES
INTERNAL_IP = "127.0.0.1"  # an "internal" service that must never be reached

# A self-signed certificate for DNS name media.test (valid 2000-2099), made with `openssl ca -selfsign`.
CERT_PEM = """-----BEGIN CERTIFICATE-----
MIIBcjCCARegAwIBAgIBATAKBggqhkjOPQQDAjAVMRMwEQYDVQQDDAptZWRpYS50
ZXN0MCAXDTAwMDEwMTAwMDAwMFoYDzIwOTkxMjMxMDAwMDAwWjAVMRMwEQYDVQQD
DAptZWRpYS50ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAELA3QRAZx1tqr
x2NqYUsckLVQO9FSFE/KflwYdEscFdMxFbuQCaDtRwTEiKLPnSrwN/49v3lOsK8P
mdyN87L74KNWMFQwFQYDVR0RBA4wDIIKbWVkaWEudGVzdDAPBgNVHRMBAf8EBTAD
AQH/MAsGA1UdDwQEAwIChDAdBgNVHQ4EFgQUeFaXTLH9Z0lTEWQHSGy7vBoBcgow
CgYIKoZIzj0EAwIDSQAwRgIhAMN+L7yWKGhjGSIFKuQIlCRtaE43T4MhkZVykb4k
9MeDAiEAmZshlwGFumLlqpZeh8aPeAV3fjrFZfmtaxZylK8rB/c=
-----END CERTIFICATE-----
"""
KEY_PEM = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgHukEhFHhKaAj3vwA
Wg2hiBNgXqEj5kfjtnqBVvSgk6ShRANCAAQsDdBEBnHW2qvHY2phSxyQtVA70VIU
T8p+XBh0SxwV0zEVu5AJoO1HBMSIos+dKvA3/j2/eU6wrw+Z3I3zsvvg
-----END PRIVATE KEY-----
"""


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class _Handler(BaseHTTPRequestHandler):
    """Routes: /img.png, /host (echoes Host), /redirect/N, /loop, redirects set by a test, /big-declared,
    /big-stream, /slow, /trickle, /page.html, anything else 404. Logs (path, Host) per request."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/png", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.log.append((self.path, self.headers.get("Host")))
        path = self.path.partition("?")[0]
        try:
            if path == "/img.png":
                self._send(200, PNG)
            elif path == "/host":
                self._send(200, self.headers.get("Host", "").encode(), "application/octet-stream")
            elif path.startswith("/redirect/"):
                n = int(path.rsplit("/", 1)[1])
                self._send(302, headers={"Location": f"/redirect/{n - 1}" if n > 0 else "/img.png"})
            elif path == "/loop":
                self._send(302, headers={"Location": "/loop"})
            elif path in srv.redirects:
                self._send(302, headers={"Location": srv.redirects[path]})
            elif path == "/big-declared":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
                self.wfile.write(PNG)
            elif path == "/big-stream":  # no Content-Length: the body ends when the connection closes
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            elif path == "/slow":
                srv.release.wait(5)
                self._send(200, PNG)
            elif path == "/trickle":  # each read is quick, the whole body is slow
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                for _ in range(25):
                    if srv.release.wait(0.2):
                        break
                    self.wfile.write(b"x")
                    self.wfile.flush()
            elif path == "/page.html":
                self._send(200, b"<html></html>", "text/html; charset=utf-8")
            else:
                self._send(404, b"no", "text/plain")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client hung up on purpose (size cap, timeout)


class _Server:
    def __init__(self, host: str, tls: ssl.SSLContext | None = None):
        self.httpd = ThreadingHTTPServer((host, 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.log = []
        self.httpd.release = threading.Event()
        self.httpd.redirects = {}  # path -> Location, set by a test
        self.sni: list[str | None] = []
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.log = self.httpd.log
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.httpd.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def media_server():
    server = _Server(ALLOWED_IP)
    yield server
    server.close()


@pytest.fixture
def internal_server():
    server = _Server(INTERNAL_IP)
    yield server
    server.close()


def fetch(url, policy, kind="image", **kw):
    return asyncio.run(fetch_media(url, policy, kind, **kw))


def remote_policy(**kw) -> MediaPolicy:
    kw.setdefault("allowed_media_domains", (ALLOWED_IP, "media.test", "other.test"))
    kw.setdefault(
        "unsafe_media_addresses", unsafe_media_addresses_from_env({ENV_UNSAFE_ADDRESSES: ALLOWED_IP})
    )
    return MediaPolicy(**kw)


def fixed_resolver(table: dict[str, list[str]], calls: list[str] | None = None):
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


# ---- http(s): allowed ----------------------------------------------------------------------------


def test_allowed_host_returns_the_served_bytes(media_server):
    assert fetch(f"http://{ALLOWED_IP}:{media_server.port}/img.png", remote_policy()) == PNG
    assert fetch(f"http://{ALLOWED_IP}:{media_server.port}/host", remote_policy(), "video") == (
        f"{ALLOWED_IP}:{media_server.port}".encode()  # application/octet-stream fits any kind
    )


def test_host_name_is_resolved_once_pinned_and_sent_as_host_header(media_server):
    calls: list[str] = []
    resolve = fixed_resolver({"media.test": [ALLOWED_IP]}, calls)
    body = fetch(f"http://media.test:{media_server.port}/host", remote_policy(), resolver=resolve)
    # The system resolver does not know media.test: the bytes could only come from the pinned IP.
    assert body == f"media.test:{media_server.port}".encode()
    assert calls == ["media.test"]


def test_dns_rebinding_cannot_move_the_connection(media_server, internal_server):
    """A resolver that answers public-then-private: only the first, vetted answer is ever dialled."""
    answers = [[ALLOWED_IP], ["169.254.169.254"], [INTERNAL_IP]]
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls) - 1, len(answers) - 1)]

    body = fetch(f"http://media.test:{media_server.port}/host", remote_policy(), resolver=rebinding)
    assert body == f"media.test:{media_server.port}".encode()
    assert calls == ["media.test"]  # no second lookup that a rebinding answer could win
    assert [p for p, _ in media_server.log] == ["/host"] and internal_server.log == []


def test_every_resolved_address_is_vetted(internal_server):
    resolve = fixed_resolver({"media.test": ["93.184.216.34", INTERNAL_IP]})
    with pytest.raises(MediaAccessError, match="non-public address") as err:
        fetch(f"http://media.test:{internal_server.port}/img.png", remote_policy(), resolver=resolve)
    assert INTERNAL_IP not in str(err.value) and "93.184" not in str(err.value)
    assert internal_server.log == []


def test_redirects_within_the_limit_are_followed(media_server):
    policy = remote_policy(max_redirects=3)
    assert fetch(f"http://{ALLOWED_IP}:{media_server.port}/redirect/2", policy) == PNG
    assert [p for p, _ in media_server.log] == ["/redirect/2", "/redirect/1", "/redirect/0", "/img.png"]


@pytest.mark.parametrize("path", ["/redirect/3", "/loop"])
def test_too_many_redirects(media_server, path):
    with pytest.raises(MediaAccessError, match="redirects more than 2 times"):
        fetch(f"http://{ALLOWED_IP}:{media_server.port}{path}", remote_policy(max_redirects=2))
    assert len(media_server.log) == 3  # the first request and 2 followed hops, no more


# ---- http(s): refused ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "169.254.169.254", "[::1]", "10.1.2.3", "[::ffff:127.0.0.1]", "0.0.0.0",
     "100.100.100.200", "[fd00:ec2::254]", "192.168.1.1"],
)  # fmt: skip
def test_internal_addresses_refused_without_the_switch(internal_server, host):
    policy = MediaPolicy(allowed_media_domains=("*",))  # every host allowed by name: the address rule decides
    url = f"http://{host}:{internal_server.port}/img.png"
    with pytest.raises(MediaAccessError, match="non-public address") as err:
        fetch(url, policy)
    assert str(err.value).count("127.0.0.1") == url.count("127.0.0.1")  # localhost's address not echoed
    assert internal_server.log == []


def test_host_not_in_allow_list(media_server):
    policy = remote_policy(allowed_media_domains=("images.example.com",))
    with pytest.raises(MediaAccessError, match="not listed in --allowed-media-domains"):
        fetch(f"http://{ALLOWED_IP}:{media_server.port}/img.png", policy)
    assert media_server.log == []


def test_remote_off_without_domains():
    with pytest.raises(MediaAccessError, match="remote media is off.*--allowed-media-domains"):
        fetch("https://images.example.com/a.png", MediaPolicy())


@pytest.mark.parametrize(
    "target", [f"http://{INTERNAL_IP}:{{internal}}/secret", "http://169.254.169.254/latest/meta-data/"]
)
def test_redirect_to_internal_address_refused_at_the_hop(media_server, internal_server, target):
    target = target.format(internal=internal_server.port)
    policy = remote_policy(allowed_media_domains=("*",))
    media_server.httpd.redirects["/hop"] = target
    with pytest.raises(MediaAccessError, match=r"\(redirect 1\).*non-public address") as err:
        fetch(f"http://{ALLOWED_IP}:{media_server.port}/hop", policy)
    assert "169.254" not in str(err.value) and INTERNAL_IP not in str(err.value)
    assert internal_server.log == []


def test_redirect_rebinding_is_checked_again(media_server):
    """Each hop resolves and vets its own host: other.test turning private is refused."""
    resolve = fixed_resolver({"media.test": [ALLOWED_IP], "other.test": ["10.0.0.7"]})
    media_server.httpd.redirects["/hop"] = f"http://other.test:{media_server.port}/img.png"
    with pytest.raises(MediaAccessError, match=r"\(redirect 1\).*non-public"):
        fetch(f"http://media.test:{media_server.port}/hop", remote_policy(), resolver=resolve)


@pytest.mark.parametrize(
    "target, message",
    [
        ("file:///etc/passwd", "only http and https"),
        ("http://elsewhere.example.net/a.png", "a host not listed"),
        # Locations without '//' once escaped from httpx's own redirect parsing as InvalidURL (a 500).
        ("data:image/png;base64,iVBORw0KGgo=", "only http and https"),
        ("DATA:,elsewhere", "only http and https"),
        ("javascript:alert('elsewhere')", "only http and https"),
        ("mailto:elsewhere@example.net", "only http and https"),
    ],
)
def test_redirect_off_policy_refused(media_server, target, message):
    media_server.httpd.redirects["/hop"] = target
    with pytest.raises(MediaAccessError, match=message) as err:
        fetch(
            f"http://{ALLOWED_IP}:{media_server.port}/hop", remote_policy(allowed_media_domains=(ALLOWED_IP,))
        )
    assert "elsewhere" not in str(err.value) and "passwd" not in str(err.value)  # the target is not echoed
    assert "base64" not in str(err.value) and "alert" not in str(err.value)
    assert [p for p, _ in media_server.log] == ["/hop"]


@pytest.mark.parametrize(
    "target, error, message",
    [
        ("http://[::1", MediaError, r"\(redirect 1\): its Location is not a valid URL"),
        ("http://xn--/a.png", MediaError, r"\(redirect 1\): the host name could not be resolved"),  # was IDNAError
        ("http://x..localhost/a.png", MediaError, r"\(redirect 1\): the host is not a valid host name"),
        (f"http://{'a' * 64}.localhost/a.png", MediaError, r"\(redirect 1\): the host is not a valid host name"),
        (f"http://{ALLOWED_IP}:99999/img.png", MediaError, r"\(redirect 1\): the port is out of range \(1-65535\)"),
    ],
)  # fmt: skip
def test_redirect_to_a_malformed_location(media_server, target, error, message):
    """A Location that httpx or the resolver cannot handle is a clean 400 naming the hop, not echoing it."""
    media_server.httpd.redirects["/hop"] = target
    with pytest.raises(error, match=message) as err:
        fetch(
            f"http://{ALLOWED_IP}:{media_server.port}/hop",
            remote_policy(allowed_media_domains=("*",)),
            resolver=fixed_resolver({}),  # no host of these is looked up in real DNS
        )
    assert (
        "xn--" not in str(err.value) and "localhost" not in str(err.value) and "99999" not in str(err.value)
    )
    assert [p for p, _ in media_server.log] == ["/hop"]


def test_oversize_by_content_length(media_server):
    with pytest.raises(MediaTooLargeError, match="Content-Length 1000000000.*--max-media-bytes"):
        fetch(f"http://{ALLOWED_IP}:{media_server.port}/big-declared", remote_policy(max_bytes=100_000))


def test_oversize_while_streaming(media_server):
    with pytest.raises(MediaTooLargeError, match="more than 100000 bytes"):
        fetch(f"http://{ALLOWED_IP}:{media_server.port}/big-stream", remote_policy(max_bytes=100_000))


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_slow_server_times_out(media_server, path):
    start = time.monotonic()
    with pytest.raises(MediaError, match="took longer than 0.6 s"):
        fetch(f"http://{ALLOWED_IP}:{media_server.port}{path}", remote_policy(timeout_s=0.6))
    assert time.monotonic() - start < 3.0  # the total cap, not the server, ended it


@pytest.mark.parametrize(
    "path, kind, message",
    [
        ("/page.html", "image", "Content-Type 'text/html', which is not image media"),
        ("/img.png", "video", "Content-Type 'image/png', which is not video media"),
        ("/nothing", "image", "HTTP 404"),
    ],
)
def test_bad_responses(media_server, path, kind, message):
    with pytest.raises(MediaError, match=message):
        fetch(f"http://{ALLOWED_IP}:{media_server.port}{path}", remote_policy(), kind)


def test_credentials_in_url_refused(media_server):
    with pytest.raises(MediaAccessError, match="credentials"):
        fetch(f"http://user:pw@{ALLOWED_IP}:{media_server.port}/img.png", remote_policy())


# ---- malformed URLs: each once escaped fetch_media as an unhandled exception (a 500) ---------------


@pytest.mark.parametrize("port", ["99999", "65536", "0", "-1", "99999999999999999999"])
@pytest.mark.parametrize("host", [ALLOWED_IP, "media.test"])
def test_port_out_of_range(media_server, host, port):
    calls: list[str] = []
    url = f"http://{host}:{port}/img.png"
    with pytest.raises(MediaError, match=rf"port {port} is out of range \(1-65535\)"):
        fetch(url, remote_policy(), resolver=fixed_resolver({"media.test": [ALLOWED_IP]}, calls))
    assert calls == [] and media_server.log == []


@pytest.mark.parametrize("host", [f"{'a' * 64}.localhost", "x..localhost", ".localhost", f"{'a' * 300}"])
def test_host_labels_idna_rejects_under_wildcard(host):
    """The system resolver's IDNA step raised UnicodeError for these; now refused before any lookup."""
    with pytest.raises(MediaError, match=r"is not a valid host name \(dot-separated labels of 1-63"):
        fetch(f"http://{host}/x.png", MediaPolicy(allowed_media_domains=("*",)))


@pytest.mark.parametrize(
    "host",
    ["x%00y.example", "x%2ey.example", "a b.example", "a!b.example", ".".join(["a" * 63] * 4) + ".example"],
)
def test_host_names_outside_dns_syntax_refused_without_a_lookup(host):
    calls: list[str] = []
    with pytest.raises(MediaError, match="is not a valid host name.*253 characters"):
        fetch(
            f"http://{host}/x.png",
            MediaPolicy(allowed_media_domains=("*",)),
            resolver=fixed_resolver({}, calls),
        )
    assert calls == []


@pytest.mark.parametrize("scheme", ["file://{tree}/", "http://127.0.0.2/", "https://\ud800.example/"])
def test_lone_surrogate_refused(tree, scheme):
    url = scheme.format(tree=tree) + "a\ud800.png"
    policy = remote_policy(allowed_local_media_path=tree, allowed_media_domains=("*",))
    with pytest.raises(MediaError, match=r"lone surrogate \(U\+D800\).*percent-encode"):
        fetch(url, policy)


@pytest.mark.parametrize("url", ["file://[::1/a.png", "file://[/a.png"])
def test_malformed_file_url(tree, url):
    with pytest.raises(MediaError, match="is not a valid URL"):
        fetch(url, MediaPolicy(allowed_local_media_path=tree))


# ---- https: SNI and certificate checked against the URL's host, not the dialled IP ---------------


@pytest.fixture
def tls_server(tmp_path):
    (tmp_path / "c.pem").write_text(CERT_PEM)
    (tmp_path / "k.pem").write_text(KEY_PEM)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server = _Server(ALLOWED_IP, tls=ctx)
    yield server
    server.close()


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=CERT_PEM)
    return ctx


def test_https_sends_sni_of_the_url_host(tls_server):
    resolve = fixed_resolver({"media.test": [ALLOWED_IP]})
    body = fetch(
        f"https://media.test:{tls_server.port}/host",
        remote_policy(),
        resolver=resolve,
        ssl_context=_client_tls(),
    )
    assert body == f"media.test:{tls_server.port}".encode()
    assert tls_server.sni == ["media.test"]


def test_https_certificate_must_match_the_url_host(tls_server):
    resolve = fixed_resolver({"other.test": [ALLOWED_IP]})
    with pytest.raises(MediaError, match="TLS certificate not valid"):
        fetch(
            f"https://other.test:{tls_server.port}/img.png",
            remote_policy(),
            resolver=resolve,
            ssl_context=_client_tls(),
        )
    assert tls_server.log == []


# ---- file:// --------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(PNG)
    (root / "sub" / "b.png").write_bytes(PNG)
    (root / "clip.mp4").write_bytes(b"\0" * 64)
    (root / "notes.txt").write_text("secret")
    (root / "dir.png").mkdir()
    os.mkfifo(root / "pipe.png")
    (tmp_path / "secret.png").write_bytes(PNG)
    (root / "out.png").symlink_to(tmp_path / "secret.png")
    (root / "zero.png").symlink_to("/dev/zero")
    (root / "in.png").symlink_to(root / "sub" / "b.png")
    (root / "fifo_link.png").symlink_to(root / "pipe.png")
    (root / "notes_link.png").symlink_to(root / "notes.txt")
    return root


def test_file_inside_root_gives_its_real_path(tree):
    policy = MediaPolicy(allowed_local_media_path=tree)
    assert fetch(f"file://{tree}/a.png", policy) == os.path.realpath(tree / "a.png")
    assert fetch(f"file://{tree}/in.png", policy) == os.path.realpath(tree / "sub" / "b.png")
    assert fetch(f"file://localhost{tree}/sub/b.png", policy) == os.path.realpath(tree / "sub" / "b.png")
    assert fetch(f"file://{quote(str(tree))}/clip.mp4", policy, "video") == os.path.realpath(
        tree / "clip.mp4"
    )


@pytest.mark.parametrize(
    "rel, error, message",
    [
        ("../secret.png", MediaAccessError, "outside the allowed media directory"),
        ("sub/../../secret.png", MediaAccessError, "outside"),
        ("%2e%2e/secret.png", MediaAccessError, "outside"),
        ("out.png", MediaAccessError, "outside"),  # a symlink that leads out
        ("zero.png", MediaAccessError, "outside"),  # a symlink to a device
        ("dir.png", MediaAccessError, "not a regular file"),
        ("pipe.png", MediaAccessError, "not a regular file"),
        ("fifo_link.png", MediaAccessError, "not a regular file"),
        ("notes.txt", MediaAccessError, "is not an image file: its extension '.txt'"),
        ("missing.png", MediaError, "no such file"),
        ("a%00.png", MediaAccessError, r"NUL \(%00\)"),
    ],
)  # fmt: skip
def test_file_refusals(tree, rel, error, message):
    with pytest.raises(error, match=message) as err:
        fetch(f"file://{tree}/{rel}", MediaPolicy(allowed_local_media_path=tree))
    # The resolved target of a path or symlink is never echoed; only the user's own URL is.
    assert os.path.realpath(tree.parent / "secret.png") not in str(err.value) and "/dev/zero" not in str(
        err.value
    )


def test_file_link_to_another_extension_does_not_reveal_it(tree):
    """The extension rule is judged on the file read, but the message names only the URL's own path."""
    with pytest.raises(MediaAccessError, match="leads to a file whose extension is not one of") as err:
        fetch(f"file://{tree}/notes_link.png", MediaPolicy(allowed_local_media_path=tree))
    assert ".txt" not in str(err.value) and "notes.txt" not in str(err.value)


def test_file_other_forms_refused(tree):
    policy = MediaPolicy(allowed_local_media_path=tree)
    with pytest.raises(MediaAccessError, match="not a host"):
        fetch(f"file://otherhost{tree}/a.png", policy)
    with pytest.raises(MediaAccessError, match="local files are off.*--allowed-local-media-path"):
        fetch(f"file://{tree}/a.png", MediaPolicy())
    with pytest.raises(MediaTooLargeError, match=f"{len(PNG)} bytes, over the limit of 10 bytes"):
        fetch(f"file://{tree}/a.png", MediaPolicy(allowed_local_media_path=tree, max_bytes=10))


@pytest.mark.parametrize("url", ["/etc/passwd", "a.png", "ftp://x.org/a.png", "gopher://x", "C:\\a.png", ""])
def test_bare_paths_and_other_schemes_refused(tree, url):
    with pytest.raises(
        MediaAccessError, match="data: URL.*--allowed-local-media-path.*--allowed-media-domains"
    ):
        fetch(url, MediaPolicy(allowed_local_media_path=tree, allowed_media_domains=("x.org",)))


# ---- data: ----------------------------------------------------------------------------------------


def test_data_url_decodes():
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert fetch(url, MediaPolicy()) == PNG
    wrapped = "data:;base64," + base64.encodebytes(PNG).decode()  # MIME line breaks, no media type
    assert fetch(wrapped, MediaPolicy()) == PNG


@pytest.mark.parametrize(
    "url, error, message",
    [
        ("data:image/png;base64,iVBO@@==", MediaError, "invalid base64 in data URL"),
        ("data:image/png;base64,iVBORw0", MediaError, "invalid base64 in data URL"),  # bad padding
        ("data:image/png,rawbytes", MediaError, "must be base64"),
        ("data:image/png;base64", MediaError, "malformed data URL"),
        ("data:text/html;base64,PGI+", MediaError, "not image media"),
        ("data:image/png;base64," + "A" * 200, MediaTooLargeError, "150 bytes, over the limit of 100 bytes"),
    ],
)
def test_bad_data_urls(url, error, message):
    with pytest.raises(error, match=message):
        fetch(url, MediaPolicy(max_bytes=100))


# ---- pure rules -----------------------------------------------------------------------------------


def test_host_allowed_matching():
    domains = ("images.example.com", "*.cdn.example.org", "[2001:db8::1]")
    assert host_allowed("images.example.com", domains)
    assert host_allowed("IMAGES.Example.COM.", domains)  # case and a trailing dot do not matter
    assert host_allowed("a.cdn.example.org", domains) and host_allowed("a.b.cdn.example.org", domains)
    assert host_allowed("2001:db8::1", domains)
    for host in (
        "example.com",
        "cdn.example.org",
        "evilcdn.example.org",
        "images.example.com.evil.net",
        "x.com",
    ):
        assert not host_allowed(host, domains), host
    assert host_allowed("anything.net", ("*",))


@pytest.mark.parametrize(
    "address, public",
    [("8.8.8.8", True), ("2606:4700:4700::1111", True), ("93.184.216.34", True),
     ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.0.1", False),
     ("169.254.169.254", False), ("100.64.0.1", False), ("100.100.100.200", False), ("0.0.0.0", False),
     ("224.0.0.1", False), ("255.255.255.255", False), ("240.0.0.1", False), ("168.63.129.16", False),
     ("::1", False), ("::", False), ("fe80::1", False), ("fd00:ec2::254", False), ("ff02::1", False),
     ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("2002:7f00:1::", False),
     ("2002:a00:1::", False), ("64:ff9b::a9fe:a9fe", False), ("2001:0:4136:e378:8000:63bf:80ff:fffe", False)],
)  # fmt: skip
def test_address_is_public(address, public):
    # The expected column is the IANA special-purpose registry by hand (RFC 6890 and successors).
    assert address_is_public(address) is public


def test_policy_validation(tmp_path):
    with pytest.raises(InvalidInputError, match="--allowed-local-media-path"):
        MediaPolicy(allowed_local_media_path=tmp_path / "nope")
    with pytest.raises(InvalidInputError, match="not a host name"):
        MediaPolicy(allowed_media_domains=("https://images.example.com/",))
    with pytest.raises(InvalidInputError, match="--max-media-bytes"):
        MediaPolicy(max_bytes=0)
    with pytest.raises(InvalidInputError, match="--media-fetch-timeout"):
        MediaPolicy(timeout_s=float("nan"))
    assert any("is '/'" in w for w in MediaPolicy(allowed_local_media_path="/").warnings())


# ---- GLIMPSE_UNSAFE_MEDIA_ADDRESSES: loopback test origins, and nothing else ---------------------


def test_unsafe_addresses_from_env_takes_loopback_only():
    assert unsafe_media_addresses_from_env({}) == frozenset()
    assert unsafe_media_addresses_from_env({ENV_UNSAFE_ADDRESSES: " "}) == frozenset()
    got = unsafe_media_addresses_from_env({ENV_UNSAFE_ADDRESSES: " 127.0.0.2, ::0001,127.255.0.9,"})
    assert got == {"127.0.0.2", "::1", "127.255.0.9"}  # canonical text


@pytest.mark.parametrize(
    "value", ["169.254.169.254", "10.0.0.1", "127.0.0.2,10.0.0.1", "localhost", "0.0.0.0", "8.8.8.8",
              "127.0.0.1:8080", "[::1]", "::1%lo", "127.0.0.0/8", "fd00:ec2::254"],
)  # fmt: skip
def test_unsafe_addresses_from_env_refuses_the_rest(value):
    with pytest.raises(InvalidInputError, match=f"{ENV_UNSAFE_ADDRESSES}: .* is not a loopback IP address"):
        unsafe_media_addresses_from_env({ENV_UNSAFE_ADDRESSES: value})


@pytest.mark.parametrize("address", ["169.254.169.254", "10.0.0.1", "localhost", 2130706433])
def test_policy_refuses_non_loopback_unsafe_addresses(address):
    with pytest.raises(InvalidInputError, match=ENV_UNSAFE_ADDRESSES):
        MediaPolicy(allowed_media_domains=("*",), unsafe_media_addresses=frozenset({address}))


def test_unsafe_addresses_are_named_in_the_startup_warning():
    policy = MediaPolicy(unsafe_media_addresses=frozenset({"127.0.0.2", "::1"}))
    (warning,) = policy.warnings()
    assert ENV_UNSAFE_ADDRESSES in warning and "127.0.0.2" in warning and "::1" in warning


def test_unsafe_address_is_exempt_from_the_address_rule_only(media_server, internal_server):
    """The listed address passes the public-address rule; the allow-list and other addresses do not."""
    unsafe = unsafe_media_addresses_from_env({ENV_UNSAFE_ADDRESSES: f"{ALLOWED_IP},::1"})
    url = f"http://{ALLOWED_IP}:{media_server.port}/img.png"
    with pytest.raises(MediaAccessError, match="non-public"):
        fetch(url, MediaPolicy(allowed_media_domains=("*",)))  # not listed: refused
    assert fetch(url, MediaPolicy(allowed_media_domains=("*",), unsafe_media_addresses=unsafe)) == PNG
    with pytest.raises(MediaAccessError, match="not listed in --allowed-media-domains"):
        fetch(url, MediaPolicy(allowed_media_domains=("media.test",), unsafe_media_addresses=unsafe))
    with pytest.raises(MediaAccessError, match="non-public"):
        fetch(
            f"http://{INTERNAL_IP}:{internal_server.port}/img.png",
            MediaPolicy(allowed_media_domains=("*",), unsafe_media_addresses=unsafe),
        )
    assert [p for p, _ in media_server.log] == ["/img.png"] and internal_server.log == []


def test_serve_refuses_a_non_loopback_unsafe_address_and_the_old_flag(tiny_checkpoint, capsys):
    """A real `glimpse serve` with the variable set to a metadata address exits 2 with one line."""
    from test_server import ServerProcess  # imported here: it pulls in transformers

    try:
        server = ServerProcess(
            tiny_checkpoint("glm46v"), env={ENV_UNSAFE_ADDRESSES: "169.254.169.254"}, timeout=120
        )
    except RuntimeError as exc:
        failure = str(exc)
    else:
        server.stop()
        pytest.fail(f"glimpse serve started with {ENV_UNSAFE_ADDRESSES}=169.254.169.254")
    assert "exited with 2" in failure and "Traceback" not in failure
    assert f"glimpse: error: {ENV_UNSAFE_ADDRESSES}: '169.254.169.254' is not a loopback IP address" in failure

    from glimpse.cli import build_parser  # the flag that bypassed every address check is gone

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--test-allow-media-address", "127.0.0.2"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --test-allow-media-address" in capsys.readouterr().err
