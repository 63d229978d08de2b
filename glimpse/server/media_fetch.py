"""Step 0 of the data path, media fetching for the server: one media URL -> bytes or a vetted local path.

`fetch_media(url, policy, kind) -> bytes | str`: a data: URL gives its decoded bytes; a file:// URL
gives the real path (str) of a regular media file under the operator's root; an http(s) URL gives
the body fetched from a vetted public address. Policy refusals raise MediaAccessError; unreadable
or oversize media and malformed URLs raise MediaError / MediaTooLargeError. Messages never name a
resolved path or address, nor a redirect's target.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import math
import os
import re
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from glimpse.errors import InvalidInputError, MediaError, MediaTooLargeError

logger = logging.getLogger(__name__)

# The server flags that set each MediaPolicy field; error messages name them.
FLAG_LOCAL_ROOT = "--allowed-local-media-path"
FLAG_DOMAINS = "--allowed-media-domains"
FLAG_MAX_BYTES = "--max-media-bytes"
FLAG_TIMEOUT = "--media-fetch-timeout"
FLAG_REDIRECTS = "--max-media-redirects"
# Test-only: loopback addresses exempt from the public-address rule (comma-separated; no CLI flag).
ENV_UNSAFE_ADDRESSES = "GLIMPSE_UNSAFE_MEDIA_ADDRESSES"

KINDS = ("image", "video")
IMAGE_EXTENSIONS = frozenset(".png .jpg .jpeg .jpe .webp .gif .bmp .tif .tiff".split())
VIDEO_EXTENSIONS = frozenset(".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .flv .ogv .3gp .wmv .gif".split())
# Metadata endpoints of cloud providers. Most are already non-global (link-local, ULA, CGNAT);
# they are listed so that the rule survives a change in what `ipaddress` calls global, and for
# Azure's wire server, which sits on a public address.
CLOUD_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean, OpenStack
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.253",  # AWS VPC DNS
        "169.254.169.123",  # AWS time sync
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS VPC DNS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wire server (a public address)
        "192.0.0.192",  # Oracle Cloud (legacy)
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_OCTET_STREAM = ("application/octet-stream", "binary/octet-stream")
_VIDEO_TYPES = ("application/mp4", "application/ogg", "application/x-matroska", "image/gif", "image/webp")
_DNS_LABEL = re.compile(r"[a-z0-9_-]{1,63}")  # after IDNA encoding; '_' occurs in real host names
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # RFC 3986: a Location with one is absolute
_HOST_RULE = "dot-separated labels of 1-63 letters, digits, '-' or '_', 253 characters in all"

# host, port -> the addresses the name resolves to, in preference order.
Resolver = Callable[[str, int], Awaitable[list[str]]]


class MediaAccessError(InvalidInputError):
    """A media URL that the server's policy refuses (scheme, root, domain, address, redirects)."""


@dataclass(frozen=True)
class MediaPolicy:
    """What the server may read media from, and how much; one per server, built from its flags."""

    allowed_local_media_path: Path | None = None  # file:// only under this root (None: file:// refused)
    allowed_media_domains: tuple[str, ...] = ()  # exact hosts or "*.example.com" ("*": any public host)
    max_bytes: int = 64 * 2**20
    timeout_s: float = 10.0  # total: DNS, every hop and the whole body
    max_redirects: int = 3
    # Test-only: loopback addresses exempt from the public-address rule (and from nothing else), at
    # any hop; set from GLIMPSE_UNSAFE_MEDIA_ADDRESSES through unsafe_media_addresses_from_env.
    unsafe_media_addresses: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        root = self.allowed_local_media_path
        if root is not None and not Path(root).is_dir():
            raise InvalidInputError(f"{FLAG_LOCAL_ROOT} {str(root)!r} is not an existing directory")
        for domain in self.allowed_media_domains:
            if not _is_domain_entry(domain):
                raise InvalidInputError(
                    f"{FLAG_DOMAINS}: {domain!r} is not a host name; give hosts like 'images.example.com' or "
                    "'*.example.com', without scheme, port or path"
                )
        if not _int_at_least(self.max_bytes, 1):
            raise InvalidInputError(f"{FLAG_MAX_BYTES} must be a positive byte count, got {self.max_bytes!r}")
        if not (
            isinstance(self.timeout_s, int | float) and math.isfinite(self.timeout_s) and self.timeout_s > 0
        ):
            raise InvalidInputError(
                f"{FLAG_TIMEOUT} must be a positive number of seconds, got {self.timeout_s!r}"
            )
        if not _int_at_least(self.max_redirects, 0):
            raise InvalidInputError(f"{FLAG_REDIRECTS} must be an integer >= 0, got {self.max_redirects!r}")
        for address in self.unsafe_media_addresses:
            _loopback_address(address)

    def warnings(self) -> list[str]:
        """Settings that work but that an operator should hear about at startup."""
        found = []
        root = self.allowed_local_media_path
        if root is not None and os.path.realpath(root) == os.path.realpath(os.sep):
            found.append(f"{FLAG_LOCAL_ROOT} is '/': any readable media file on the machine can be requested")
        if "*" in self.allowed_media_domains:
            found.append(f"{FLAG_DOMAINS} contains '*': any host with public addresses can be fetched")
        if self.unsafe_media_addresses:
            found.append(
                f"{ENV_UNSAFE_ADDRESSES} is set: media may be fetched from "
                f"{', '.join(sorted(self.unsafe_media_addresses))} although they are not public addresses "
                "(for tests only; unset it in production)"
            )
        return found


def unsafe_media_addresses_from_env(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """GLIMPSE_UNSAFE_MEDIA_ADDRESSES ("127.0.0.2,::1"; default: os.environ) -> canonical addresses.

    For tests that serve media from loopback: only loopback IP addresses are accepted; anything
    else (a name, a private or metadata address, a port) raises InvalidInputError naming the variable.
    """
    text = (os.environ if environ is None else environ).get(ENV_UNSAFE_ADDRESSES, "")
    return frozenset(_loopback_address(entry.strip()) for entry in text.split(",") if entry.strip())


async def fetch_media(
    url: str,
    policy: MediaPolicy,
    kind: str = "image",
    *,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes | str:
    """One media URL -> its bytes (data:, http(s)) or the real path of a vetted local file (file://).

    `resolver` (host, port -> addresses) and `ssl_context` (trusted CAs) replace the system
    ones; tests use them to simulate DNS answers and a local HTTPS server.
    """
    if kind not in KINDS:
        raise InvalidInputError(f"media kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(url, str) or not url:
        raise MediaAccessError(f"{kind} URL must be a non-empty string; {_allowed_forms(policy)}")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _decode_data_url(url, policy, kind)
    if scheme in ("file", "http", "https"):
        _check_text(url, kind)
    if scheme == "file":
        return _local_path(url, policy, kind)
    if scheme in ("http", "https"):
        return await _fetch_remote(url, policy, kind, resolver or _system_resolve, ssl_context)
    raise MediaAccessError(f"{kind} URL {_shown(url)} is not allowed; {_allowed_forms(policy)}")


# ---- pure checks --------------------------------------------------------------------------------


def host_allowed(host: str, domains: tuple[str, ...] | list[str]) -> bool:
    """Whether `host` matches an allow-list entry: exact, "*.example.com" (subdomains only) or "*"."""
    host = _normal_host(host)
    for entry in domains:
        entry = _normal_host(entry)
        if entry == "*" or entry == host or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def address_is_public(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is safe to fetch from: globally routable, not multicast, not cloud metadata.

    IPv6 forms that embed an IPv4 address (mapped, 6to4, Teredo, NAT64) must pass for that
    address too, since a gateway may deliver the packet to it.
    """
    ip = ipaddress.ip_address(_normal_ip(address)) if isinstance(address, str) else address
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        candidates += [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
        candidates += list(ip.teredo or ())
        if ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for c in candidates:
        bad = c.is_private or c.is_loopback or c.is_link_local or c.is_multicast or c.is_reserved
        if bad or c.is_unspecified or not c.is_global or c in CLOUD_METADATA_ADDRESSES:
            return False
    return True


# ---- data: and file:// --------------------------------------------------------------------------


def _decode_data_url(url: str, policy: MediaPolicy, kind: str) -> bytes:
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep:
        raise MediaError(f"malformed data URL for {kind}: no ',' before the data")
    params = [p.strip().lower() for p in header.split(";")]
    if params[-1] != "base64":
        raise MediaError(f"data URL for {kind} must be base64-encoded (';base64,' before the data)")
    if not _type_ok(params[0], kind):
        raise MediaError(f"data URL declares media type {params[0][:100]!r}, which is not {kind} media")
    payload = "".join(payload.split())  # line-wrapped base64 (MIME style) is still base64
    # Check the size the payload will decode to before spending memory on decoding it.
    decoded_size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if decoded_size > policy.max_bytes:
        raise _over(f"data URL for {kind} holds {decoded_size} bytes", policy)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"invalid base64 in data URL for {kind}") from None
    if not data:
        raise MediaError(f"data URL for {kind} is empty")
    return data


def _local_path(url: str, policy: MediaPolicy, kind: str) -> str:
    shown = _shown(url)
    root = policy.allowed_local_media_path
    if root is None:
        raise MediaAccessError(f"local files are off: {shown} refused; the server must set {FLAG_LOCAL_ROOT}")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed '[' in the host
        raise MediaError(f"{shown} is not a valid URL") from None
    if parts.netloc not in ("", "localhost"):
        raise MediaAccessError(f"{shown}: file:// URLs must name a local path (file:///...), not a host")
    if parts.query or parts.fragment:
        raise MediaAccessError(f"{shown}: file:// URLs may not carry '?' or '#' parts (percent-encode them)")
    path = unquote(parts.path)
    if "\x00" in path:
        raise MediaAccessError(f"{shown}: file:// paths may not contain NUL (%00)")
    if not os.path.isabs(path):
        raise MediaAccessError(f"{shown}: file:// URLs must name an absolute path (file:///dir/name.png)")
    # realpath resolves '..' and every symlink, so containment is judged on the file actually read.
    real = os.path.realpath(path)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise MediaAccessError(f"{shown} lies outside the allowed media directory ({FLAG_LOCAL_ROOT})")
    try:
        info = os.stat(real)  # stat, not open: opening a FIFO would block
    except FileNotFoundError:
        raise MediaError(f"{shown}: no such file under the allowed media directory") from None
    except OSError:
        raise MediaError(f"{shown}: the file cannot be read") from None
    if not stat.S_ISREG(info.st_mode):
        raise MediaAccessError(
            f"{shown} is not a regular file (directories, FIFOs, devices, sockets are refused)"
        )
    extensions = IMAGE_EXTENSIONS if kind == "image" else VIDEO_EXTENSIONS
    suffix = os.path.splitext(real)[1].lower()  # judged on the file read, not the name asked for
    if suffix not in extensions:
        allowed = ", ".join(sorted(extensions))
        if suffix != os.path.splitext(path)[1].lower():  # a link: its target's name is not the client's
            raise MediaAccessError(f"{shown} leads to a file whose extension is not one of {allowed}")
        raise MediaAccessError(
            f"{shown} is not {'an' if kind == 'image' else 'a'} {kind} file: its extension "
            f"{suffix or '(none)'!r} is not one of {allowed}"
        )
    if info.st_size > policy.max_bytes:
        raise _over(f"{shown} is {info.st_size} bytes", policy)
    return real


# ---- http(s) --------------------------------------------------------------------------------------


async def _fetch_remote(
    url: str, policy: MediaPolicy, kind: str, resolve: Resolver, ssl_context: ssl.SSLContext | None
) -> bytes:
    shown = _shown(url)
    if not policy.allowed_media_domains:
        raise MediaAccessError(
            f"remote media is off: {shown} refused; the server must list the host in {FLAG_DOMAINS}"
        )
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise MediaError(f"{shown} is not a valid URL") from None
    # A bare transport, not a client: a client parses every Location itself (and raises on odd ones)
    # even with redirects off. No proxies from the environment (a proxy would connect to whatever
    # it resolves), no retries.
    transport = httpx.AsyncHTTPTransport(
        verify=ssl_context if ssl_context is not None else True, trust_env=False, retries=0
    )
    try:
        async with transport, asyncio.timeout(policy.timeout_s):
            return await _follow(transport, current, policy, kind, resolve, shown)
    except (TimeoutError, httpx.TimeoutException):
        raise MediaError(
            f"fetching {shown} took longer than {policy.timeout_s:g} s ({FLAG_TIMEOUT})"
        ) from None
    except httpx.HTTPError as exc:
        # httpx's text can name the address it dialled; keep only the kind of failure.
        tls = "CERTIFICATE_VERIFY" in str(exc)
        reason = "TLS certificate not valid for the host" if tls else type(exc).__name__
        raise MediaError(f"could not fetch {shown}: {reason}") from None


async def _follow(
    transport: httpx.AsyncHTTPTransport, current: httpx.URL, policy: MediaPolicy, kind: str, resolve: Resolver,
    shown: str,
) -> bytes:  # fmt: skip
    for hop in range(policy.max_redirects + 1):
        addresses = await _vet(current, policy, resolve, hop, shown)
        response = await _send_pinned(transport, current, addresses, policy, shown)
        try:
            if response.status_code in _REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise MediaError(f"{shown}: a redirect without a Location header")
                if hop == policy.max_redirects:
                    raise MediaAccessError(
                        f"{shown} redirects more than {policy.max_redirects} times ({FLAG_REDIRECTS})"
                    )
                current = _redirect_target(current, location, f"{shown} (redirect {hop + 1})")
                continue
            return await _read_body(response, policy, kind, shown)
        finally:
            await response.aclose()
    raise AssertionError("unreachable: the last hop returns or raises")


def _redirect_target(current: httpx.URL, location: str, where: str) -> httpx.URL:
    """The URL a Location header leads to; never echoed, since it came from the remote server."""
    scheme = _URL_SCHEME.match(location)
    if scheme and scheme.group(1).lower() not in ("http", "https"):  # data:, javascript:, file:, ...
        raise MediaAccessError(f"{where}: only http and https are allowed for remote media")
    try:
        return current.join(location)
    except (httpx.InvalidURL, ValueError):  # ValueError covers UnicodeError from IDNA
        raise MediaError(f"{where}: its Location is not a valid URL") from None


async def _vet(current: httpx.URL, policy: MediaPolicy, resolve: Resolver, hop: int, shown: str) -> list[str]:
    """Check one hop's scheme, host and every resolved address; return the addresses to dial."""
    # At a redirect hop the target came from the remote server: never echo it to the client.
    where = shown if hop == 0 else f"{shown} (redirect {hop})"
    if current.scheme not in ("http", "https"):
        raise MediaAccessError(f"{where}: only http and https are allowed for remote media")
    if current.userinfo:
        raise MediaAccessError(f"{where}: credentials in media URLs are not supported")
    host = _normal_host(current.raw_host.decode("ascii", "replace"))
    if not host:
        raise MediaError(f"{where}: the URL has no host")
    is_ip = _is_ip(host)
    if not is_ip and not _is_host_name(host):
        # Checked here, not by the resolver: its IDNA step raises UnicodeError on long or empty labels.
        named = f"host {host[:100]!r}" if hop == 0 else "the host"
        raise MediaError(f"{where}: {named} is not a valid host name ({_HOST_RULE})")
    if not host_allowed(host, policy.allowed_media_domains):
        named = f"host {host!r}" if hop == 0 else "a host"
        raise MediaAccessError(f"{where}: {named} not listed in {FLAG_DOMAINS}")
    if current.port is not None and not 1 <= current.port <= 65535:
        named = f"port {current.port}" if hop == 0 else "the port"
        raise MediaError(f"{where}: {named} is out of range (1-65535)")
    port = current.port or (443 if current.scheme == "https" else 80)
    if is_ip:
        addresses = [host]
    else:
        try:
            addresses = await resolve(host, port)
        except (OSError, UnicodeError):
            raise MediaError(f"{where}: the host name could not be resolved") from None
    if not addresses:
        raise MediaError(f"{where}: the host name resolved to no address")
    exempt = {_normal_ip(a) for a in policy.unsafe_media_addresses}
    vetted = []
    for address in addresses:
        ip = _normal_ip(address)
        if ip not in exempt and not address_is_public(ip):
            logger.warning("media fetch refused: %s (hop %d) resolves to non-public %s", shown, hop, ip)
            raise MediaAccessError(
                f"{where}: the host resolves to a non-public address (private, loopback, link-local, "
                "multicast, reserved or cloud metadata); remote media must be on public addresses"
            )
        vetted.append(ip)
    return vetted


async def _send_pinned(
    transport: httpx.AsyncHTTPTransport, current: httpx.URL, addresses: list[str], policy: MediaPolicy, shown: str
) -> httpx.Response:  # fmt: skip
    """GET `current` from a vetted address: dial the IP itself (no second DNS lookup that could be
    rebound), while Host and TLS SNI / certificate checks use the URL's own host name."""
    headers = {
        "Host": current.netloc.decode("ascii"),
        "Accept-Encoding": "identity",  # no transparent decompression behind the byte cap
        "User-Agent": "glimpse-media-fetch",
    }
    extensions: dict = {"timeout": httpx.Timeout(policy.timeout_s).as_dict()}
    if current.scheme == "https":
        extensions["sni_hostname"] = current.raw_host.decode("ascii")
    for address in addresses:
        request = httpx.Request(
            "GET", current.copy_with(host=address), headers=headers, extensions=extensions
        )
        try:
            response = await transport.handle_async_request(request)
            response.request = request
            return response
        except httpx.ConnectError as exc:  # try the next vetted address, as a browser would
            if "CERTIFICATE_VERIFY" in str(exc):
                raise
    raise MediaError(f"could not connect to the host of {shown}") from None


async def _read_body(response: httpx.Response, policy: MediaPolicy, kind: str, shown: str) -> bytes:
    if not 200 <= response.status_code < 300:
        raise MediaError(f"{shown} answered HTTP {response.status_code}")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaError(
            f"{shown} was sent with Content-Encoding {encoding[:40]!r}; media must be sent unencoded"
        )
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not _type_ok(content_type, kind):
        raise MediaError(f"{shown} has Content-Type {content_type[:100]!r}, which is not {kind} media")
    declared = response.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise MediaError(f"{shown} sent an invalid Content-Length")
        if int(declared) > policy.max_bytes:
            raise _over(f"{shown} declares Content-Length {int(declared)}", policy)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > policy.max_bytes:
            raise _over(f"{shown} sent more than {policy.max_bytes} bytes", policy)
    if not body:
        raise MediaError(f"{shown} returned an empty body")
    return bytes(body)


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))  # unique, in the resolver's order


# ---- small helpers --------------------------------------------------------------------------------


def _type_ok(mime: str, kind: str) -> bool:
    """Whether a declared media type fits `kind`; an absent or generic binary type is accepted."""
    if not mime or mime in _OCTET_STREAM:
        return True
    if kind == "image":
        return mime.startswith("image/")
    return mime.startswith("video/") or mime in _VIDEO_TYPES


def _normal_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return host
    return host


def _is_host_name(host: str) -> bool:
    """A normalised (lower-case, IDNA-encoded) DNS name: labels of [a-z0-9_-], 1-63 each, 253 in all."""
    return len(host) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in host.split("."))


def _loopback_address(entry: object) -> str:
    """One GLIMPSE_UNSAFE_MEDIA_ADDRESSES entry -> its canonical text, if it is a loopback address."""
    try:
        ip = ipaddress.ip_address(entry) if isinstance(entry, str) and "%" not in entry else None
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback:
        shown = repr(entry[:100] if isinstance(entry, str) else entry)
        raise InvalidInputError(
            f"{ENV_UNSAFE_ADDRESSES}: {shown} is not a loopback IP address; this test-only variable "
            "takes loopback addresses (127.0.0.0/8, ::1), comma-separated, without names or ports"
        )
    return str(ip)


def _check_text(url: str, kind: str) -> None:
    """Refuse a URL that is not valid Unicode text (a lone surrogate, e.g. from a JSON "\\ud800")."""
    try:
        url.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MediaError(
            f"{kind} URL {_shown(url)} contains a lone surrogate (U+{ord(url[exc.start]):04X}), which is not "
            "valid Unicode; percent-encode the UTF-8 bytes of non-ASCII characters"
        ) from None


def _is_domain_entry(entry: object) -> bool:
    """An allow-list entry is a host name, "*.suffix", "*" or an IP literal: no scheme, port or path."""
    if not isinstance(entry, str) or not entry.strip():
        return False
    return _is_ip(entry.strip().strip("[]")) or not any(c in entry for c in "/:@?# ")


def _int_at_least(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _normal_ip(address: str) -> str:
    """Canonical text of an address, without an IPv6 zone (so '::0001' and '::1' compare equal)."""
    return str(ipaddress.ip_address(address.split("%", 1)[0]))


def _over(what: str, policy: MediaPolicy) -> MediaTooLargeError:
    return MediaTooLargeError(f"{what}, over the limit of {policy.max_bytes} bytes ({FLAG_MAX_BYTES})")


def _shown(url: str) -> str:
    """The user's URL for a message: data payloads dropped, long URLs cut."""
    if url[:5].lower() == "data:":
        return "data URL"
    return repr(url if len(url) <= 200 else url[:200] + "...")


def _allowed_forms(policy: MediaPolicy) -> str:
    local = "on" if policy.allowed_local_media_path is not None else "off"
    remote = "on" if policy.allowed_media_domains else "off"
    return (
        "use a data: URL (data:image/png;base64,...), a file:// URL under the server's "
        f"{FLAG_LOCAL_ROOT} (now {local}), or an http(s) URL to a host in {FLAG_DOMAINS} (now {remote})"
    )
