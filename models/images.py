"""Safe image loading: turn an OpenAI ``image_url`` into an RGB Pillow image or a clear error.

Every image a client sends passes through :func:`load_image` before anything reaches
llama.cpp (whose GGML asserts abort the whole process). The loader

* accepts ``data:`` URIs (base64 or percent-encoded), ``file://`` paths inside
  operator-approved directories, and ``http(s)://`` only when the operator opts in,
  and then never from non-public addresses the operator did not list (SSRF);
* caps the encoded size (checked before base64-decoding, reading or downloading all
  of it) and the pixel count (checked from the header, *before* pixels are decoded, so
  a 50 kB PNG that claims 100k x 100k pixels never allocates 30 GB);
* decodes only PNG, JPEG, WebP, GIF (first frame) and BMP;
* applies the EXIF orientation and converts every mode (palette, CMYK, 16-bit
  grey, LA/RGBA with alpha composited on white, ...) to 8-bit RGB;
* hashes the decoded pixels, so the same picture sent as PNG or as a re-encoded data
  URI is one entry in the vision embedding cache.

Failures raise :class:`ImageError` (a ``ValueError``) carrying a stable ``code`` and the
index of the image in the request, which the server turns into a 400 response.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ALLOWED_FORMATS",
    "ImageError",
    "ImageLimits",
    "LoadedImage",
    "load_image",
    "pixel_hash",
]

# Pillow format names we decode. MPO is how Pillow reports multi-picture JPEGs straight
# from many phone cameras; it decodes like a JPEG (first picture).
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")

_MB = 1024 * 1024


@dataclass(frozen=True)
class ImageLimits:
    """What a request's images may cost; the defaults suit a single edge box."""

    max_bytes: int = 20 * _MB  # encoded size (after base64 decoding / as downloaded)
    max_pixels: int = 40_000_000  # width * height from the header: decompression-bomb cap
    max_images: int = 8  # images per request
    allow_file_dirs: tuple[Path, ...] = ()  # file:// allowed only inside these
    allow_http: bool = False  # fetch http(s):// URLs (off: no network at run time)
    http_timeout_s: float = 5.0
    http_max_bytes: int = 20 * _MB
    http_max_redirects: int = 3
    # Host names, addresses or CIDR ranges http(s) fetches may reach although they are
    # private, loopback or link-local (which are refused by default: SSRF).
    allow_hosts: tuple[str, ...] = ()
    allow_host_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=(), init=False, repr=False)  # parsed from allow_hosts
    allow_host_names: frozenset[str] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_images", "http_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageLimits.{name} must be >= 1")
        if self.http_timeout_s <= 0:
            raise ValueError("ImageLimits.http_timeout_s must be > 0")
        object.__setattr__(self, "allow_file_dirs", tuple(Path(d) for d in self.allow_file_dirs))
        nets, names = [], []
        for entry in self.allow_hosts:
            try:
                nets.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                names.append(entry.strip().lower().rstrip("."))
        object.__setattr__(self, "allow_host_nets", tuple(nets))
        object.__setattr__(self, "allow_host_names", frozenset(names))


class ImageError(ValueError):
    """An image the server refuses; ``code`` is stable and ``index`` names the image.

    Codes: ``invalid_image_url``, ``unsupported_image_source``, ``image_not_found``,
    ``image_fetch_failed``, ``image_host_refused``, ``image_too_large``, ``too_many_images``,
    ``unsupported_image_format``, ``empty_image``, ``invalid_image``.
    """

    status = 400

    def __init__(self, message: str, *, index: int, code: str):
        super().__init__(f"image {index}: {message}")
        self.index = index
        self.code = code
        self.detail = message


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded, upright, 8-bit RGB image and where it came from."""

    image: Image.Image  # mode "RGB", EXIF orientation applied, detached from any file
    width: int
    height: int
    sha256: str  # of the decoded RGB pixels (see pixel_hash): same picture -> same hash
    source_bytes: int  # encoded size as received
    format: str  # Pillow format name of the source: PNG, JPEG, WEBP, GIF, BMP, MPO
    source: str  # "data" | "file" | "http"


def pixel_hash(img: Image.Image) -> str:
    """SHA-256 over an RGB image's size and pixels (hex)."""
    if img.mode != "RGB":
        raise ValueError(f"pixel_hash needs an RGB image, got {img.mode}")
    h = hashlib.sha256(f"RGB:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def load_image(url: str, index: int, limits: ImageLimits) -> LoadedImage:
    """Fetch and decode one ``image_url`` into a :class:`LoadedImage`, or raise :class:`ImageError`."""
    if not isinstance(url, str) or not url.strip():
        raise ImageError("image URL is empty", index=index, code="invalid_image_url")
    url = url.strip()
    # A scheme is RFC 3986's letter-led name before ':'; one letter is a Windows drive.
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):", url)
    scheme = m.group(1).lower() if m else ""
    if scheme == "data":
        data, source = _read_data_uri(url, index, limits), "data"
    elif scheme == "file":
        data, source = _read_file_url(url, index, limits), "file"
    elif scheme in ("http", "https"):
        data, source = _fetch_http(url, index, limits), "http"
    elif not scheme:
        raise ImageError(
            "the image URL is a bare file path; send the image as a data: URI "
            "(data:image/png;base64,...) or as a file:// URL (file:///abs/path.png"
            + (", inside an allowed directory)" if limits.allow_file_dirs
               else ", which the server must allow with --allow-file-dir DIR)"),
            index=index,
            code="unsupported_image_source",
        )
    else:
        raise ImageError(
            f"unsupported image source '{scheme}:'; use "
            + ("a data: URI, a file:// URL or an http(s):// URL" if limits.allow_http
               else "a data: URI or a file:// URL"),
            index=index,
            code="unsupported_image_source",
        )
    return decode_image(data, index, limits, source=source)


# --------------------------------------------------------------------------- sources


def _too_large(n: int | str, limit: int, index: int) -> ImageError:
    return ImageError(
        f"encoded image is {n} bytes, larger than the {limit}-byte limit",
        index=index,
        code="image_too_large",
    )


def _read_data_uri(url: str, index: int, limits: ImageLimits) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise ImageError("malformed data: URI (no ',' before the data)", index=index, code="invalid_image_url")
    params = [p.strip().lower() for p in head[5:].split(";")]
    mediatype = params[0]
    if mediatype and not mediatype.startswith("image/"):
        raise ImageError(
            f"data: URI media type '{mediatype}' is not an image",
            index=index,
            code="unsupported_image_format",
        )
    if "base64" in params[1:]:
        payload = "".join(payload.split())  # line breaks / spaces are common in pasted URIs
        # base64 is 4 chars per 3 bytes: refuse oversized input before decoding it.
        if len(payload) // 4 * 3 > limits.max_bytes + 3:
            raise _too_large(f"about {len(payload) // 4 * 3}", limits.max_bytes, index)
        payload += "=" * (-len(payload) % 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            try:  # URL-safe alphabet ('-', '_') is sent by some clients
                data = base64.b64decode(payload, altchars=b"-_", validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ImageError(f"data: URI is not valid base64 ({exc})", index=index, code="invalid_image_url") from None
    else:
        if len(payload) > 3 * limits.max_bytes + 3:
            raise _too_large(f"more than {limits.max_bytes}", limits.max_bytes, index)
        data = unquote_to_bytes(payload)
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits.max_bytes, index)
    return data


def _read_file_url(url: str, index: int, limits: ImageLimits) -> bytes:
    if not limits.allow_file_dirs:
        raise ImageError(
            "file:// image URLs are disabled on this server; send the image as a data: URI, "
            "or start the server with --allow-file-dir DIR to allow files under DIR",
            index=index,
            code="unsupported_image_source",
        )
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(
            f"file:// URL names a remote host '{parts.netloc}'",
            index=index,
            code="unsupported_image_source",
        )
    raw = unquote(parts.path)
    if not raw or "\x00" in raw or not os.path.isabs(raw):
        raise ImageError("file:// URL must hold an absolute path", index=index, code="invalid_image_url")
    # resolve() follows every symlink and collapses '..', so the containment check below
    # is on the file that would really be read.
    target = Path(raw).resolve(strict=False)
    allowed = [Path(d).resolve(strict=False) for d in limits.allow_file_dirs]
    if not any(target.is_relative_to(d) for d in allowed):
        raise ImageError(
            "file:// path is outside the directories this server may read images from",
            index=index,
            code="unsupported_image_source",
        )
    try:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(target, flags)
    except FileNotFoundError:
        raise ImageError("file:// image does not exist", index=index, code="image_not_found") from None
    except OSError as exc:
        raise ImageError(f"cannot open file:// image ({exc.strerror})", index=index, code="image_not_found") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("file:// path is not a regular file", index=index, code="invalid_image_url")
        if st.st_size > limits.max_bytes:
            raise _too_large(st.st_size, limits.max_bytes, index)
        data = f.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits.max_bytes, index)
    return data


def _blocked_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a fetch must not reach ``ip`` by default (None: a public address)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, hit in (("loopback", ip.is_loopback), ("link-local (cloud metadata)", ip.is_link_local),
                      ("unspecified", ip.is_unspecified), ("multicast", ip.is_multicast),
                      ("private", ip.is_private), ("non-public", not ip.is_global)):
        if hit:
            return kind
    return None


def _checked_addresses(url: httpx.URL, index: int, limits: ImageLimits) -> list[str]:
    """Resolve ``url``'s host once and return the addresses to connect to.

    Private, loopback, link-local and other non-public addresses are refused unless the
    operator listed the host name or an address range covering them. Connecting to the
    address checked here (not resolving again) leaves no room for DNS rebinding.
    """
    host = url.host
    try:
        infos = socket.getaddrinfo(host, url.port or (443 if url.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageError(f"cannot resolve image host '{host}' ({exc})", index=index,
                         code="image_fetch_failed") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if host.lower().rstrip(".") in limits.allow_host_names:
        return [str(ip) for ip in addresses]
    for ip in addresses:
        kind = _blocked_kind(ip)
        if kind and not any(ip in net for net in limits.allow_host_nets):
            raise ImageError(
                f"image host '{host}' resolves to {ip}, a {kind} address; the server does not "
                "fetch from it unless the operator allows it with --allow-image-host",
                index=index, code="image_host_refused")
    return [str(ip) for ip in addresses]


def _fetch_http(url: str, index: int, limits: ImageLimits) -> bytes:
    if not limits.allow_http:
        raise ImageError(
            "http(s) image URLs are disabled on this server; send the image as a data: URI, "
            "or start the server with --allow-http-images",
            index=index,
            code="unsupported_image_source",
        )
    cap = min(limits.http_max_bytes, limits.max_bytes)
    try:
        target = httpx.URL(url)
        # Redirects are followed here, not by httpx, so every hop's address is checked.
        with httpx.Client(timeout=limits.http_timeout_s, follow_redirects=False) as client:
            for _hop in range(limits.http_max_redirects + 1):
                if target.scheme not in ("http", "https") or not target.host:
                    raise ImageError(f"image URL redirected to an unsupported URL '{target}'",
                                     index=index, code="invalid_image_url")
                resp = _get_pinned(client, target, _checked_addresses(target, index, limits))
                try:
                    location = resp.headers.get("location")
                    if resp.is_redirect and location:
                        target = target.join(location)
                        continue
                    return _read_capped(resp, cap, index)
                finally:
                    resp.close()
            raise ImageError(f"fetching the image URL took more than {limits.http_max_redirects} redirects",
                             index=index, code="image_fetch_failed")
    except ImageError:
        raise
    except httpx.InvalidURL as exc:
        raise ImageError(f"invalid image URL ({exc})", index=index, code="invalid_image_url") from None
    except httpx.TimeoutException:
        raise ImageError(
            f"fetching the image URL timed out after {limits.http_timeout_s:g}s",
            index=index,
            code="image_fetch_failed",
        ) from None
    except httpx.HTTPError as exc:
        raise ImageError(f"fetching the image URL failed ({type(exc).__name__})", index=index, code="image_fetch_failed") from None


def _get_pinned(client: httpx.Client, target: httpx.URL, addresses: list[str]) -> httpx.Response:
    """GET ``target`` from the first of ``addresses`` that accepts a connection, sending the
    original host name as ``Host`` (and as TLS SNI, so certificates still verify)."""
    headers = {"Accept": "image/*", "Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    for i, address in enumerate(addresses):
        request = client.build_request("GET", target.copy_with(host=address), headers=headers,
                                       extensions=extensions)
        try:
            return client.send(request, stream=True)
        except httpx.ConnectError:
            if i == len(addresses) - 1:
                raise
    raise AssertionError("no address to connect to")  # getaddrinfo never returns an empty list


def _read_capped(resp: httpx.Response, cap: int, index: int) -> bytes:
    if resp.status_code != 200:
        raise ImageError(
            f"fetching the image URL returned HTTP {resp.status_code}",
            index=index,
            code="image_fetch_failed",
        )
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise _too_large(int(declared), cap, index)
    buf = bytearray()
    for piece in resp.iter_bytes():
        buf += piece
        if len(buf) > cap:
            raise _too_large(f"more than {cap}", cap, index)
    return bytes(buf)


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, index: int, limits: ImageLimits, *, source: str = "data") -> LoadedImage:
    """Decode encoded image bytes into an upright RGB :class:`LoadedImage` (all checks applied)."""
    if not data:
        raise ImageError("image data is empty (0 bytes)", index=index, code="empty_image")
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits.max_bytes, index)
    try:
        # Pillow's own bomb guard (warning above MAX_IMAGE_PIXELS, error above twice
        # that) fires inside open(); ours, on the header size, comes right after it.
        with Image.open(io.BytesIO(data), formats=_open_formats()) as img:
            fmt = img.format or "?"
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageError(f"image has no pixels ({width}x{height})", index=index, code="empty_image")
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, more than the "
                    f"{limits.max_pixels}-pixel limit",
                    index=index,
                    code="image_too_large",
                )
            img.load()  # frame 0 only, for animations
            rgb = _to_rgb(_upright(img))
            if rgb is img:
                rgb = img.copy()  # detach from the (closing) source
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(
            f"image has more pixels than the {limits.max_pixels}-pixel limit (refused from its header)",
            index=index,
            code="image_too_large",
        ) from None
    except Image.UnidentifiedImageError:
        message, code = _unidentified(data)
        raise ImageError(message, index=index, code=code) from None
    except MemoryError:
        raise ImageError("image is too large to decode", index=index, code="image_too_large") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(
            f"image data is corrupt or truncated ({type(exc).__name__}: {exc})",
            index=index,
            code="invalid_image",
        ) from None
    return LoadedImage(
        image=rgb,
        width=rgb.width,
        height=rgb.height,
        sha256=pixel_hash(rgb),
        source_bytes=len(data),
        format=fmt,
        source=source,
    )


def _open_formats() -> tuple[str, ...]:
    # Image.open(formats=...) looks plugins up in Image.OPEN, which only lists every
    # plugin after Image.init() (MPO, WebP and BMP are not in the pre-initialised set).
    if not all(f in Image.OPEN for f in ALLOWED_FORMATS):
        Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


_MAGIC = [
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
    (b"<?xml", "SVG/XML"),
    (b"<svg", "SVG"),
]


def _unidentified(data: bytes) -> tuple[str, str]:
    """Why Pillow could not identify ``data``: (message, code)."""
    head = data[:16]
    unsupported = "images are not supported; use PNG, JPEG, WebP, GIF or BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP data is corrupt (header not readable)", "invalid_image"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return f"HEIC/AVIF {unsupported}", "unsupported_image_format"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            if name in ("PNG", "JPEG", "GIF", "BMP"):
                return f"{name} data is corrupt (header not readable)", "invalid_image"
            return f"{name} {unsupported}", "unsupported_image_format"
    return "data is not a supported image (PNG, JPEG, WebP, GIF or BMP)", "unsupported_image_format"


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block leaves the image as is."""
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - bad EXIF must not reject an otherwise fine photo
        return img
    return img if out is None else out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBa", "La", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "RGBA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode.startswith("I;16"):
            grey = (arr.astype(np.uint32) * 255 + 32767) // 65535  # full 16-bit range
        elif mode == "I":
            hi = int(arr.max()) if arr.size else 0
            scale = 65535 if hi > 255 else 255
            grey = np.clip(arr.astype(np.int64), 0, scale) * 255 // scale
        else:
            hi = float(np.nanmax(arr)) if arr.size else 0.0
            grey = np.nan_to_num(arr, nan=0.0) * (255.0 if hi <= 1.0 else 1.0)
            grey = np.clip(np.rint(grey), 0, 255)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
