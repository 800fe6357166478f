"""Safe image loading: every bad input is built here and must fail with a clear ImageError."""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.images import ImageError, ImageLimits, LoadedImage, load_image


def encode(img: Image.Image, fmt: str, **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kw)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` but carries almost no pixel data (a "bomb")."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def gradient(w: int = 32, h: int = 24) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 77, np.uint8)], axis=2)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


LIMITS = ImageLimits()


def expect_error(url: str, code: str, index: int = 0, limits: ImageLimits = LIMITS) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(url, index, limits)
    err = info.value
    assert err.code == code, f"{err.code}: {err}"
    assert err.index == index
    assert str(err).startswith(f"image {index}:")
    return err


# --------------------------------------------------------------------------- good inputs


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("BMP", "image/bmp"), ("GIF", "image/gif")])
def test_supported_formats_load_as_rgb(fmt: str, mime: str) -> None:
    src = gradient()
    loaded = load_image(data_uri(encode(src, fmt), mime), 0, LIMITS)
    assert isinstance(loaded, LoadedImage)
    assert loaded.image.mode == "RGB"
    assert (loaded.width, loaded.height) == (32, 24) == loaded.image.size
    assert loaded.format == fmt
    assert loaded.source == "data"
    assert loaded.source_bytes > 0
    assert len(loaded.sha256) == 64


def test_same_pixels_hash_the_same_across_lossless_formats() -> None:
    src = gradient()
    a = load_image(data_uri(encode(src, "PNG")), 0, LIMITS)
    b = load_image(data_uri(encode(src, "BMP"), "image/bmp"), 1, LIMITS)
    assert a.sha256 == b.sha256
    assert a.source_bytes != b.source_bytes
    c = load_image(data_uri(encode(gradient(33, 24), "PNG")), 2, LIMITS)
    assert c.sha256 != a.sha256


def test_cmyk_jpeg_converts_to_rgb() -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    loaded = load_image(data_uri(encode(img, "JPEG"), "image/jpeg"), 0, LIMITS)
    r, g, b = loaded.image.getpixel((8, 8))
    assert loaded.image.mode == "RGB"
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 65535], [32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    loaded = load_image(data_uri(encode(img, "PNG")), 0, LIMITS)
    px = np.asarray(loaded.image)
    assert px[0, 0].tolist() == [0, 0, 0]
    assert px[0, 1].tolist() == [255, 255, 255]
    assert 126 <= px[1, 0, 0] <= 129  # mid-grey, not clipped to white


def test_palette_gif_with_transparency_composites_on_white() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (4, 0, 8, 8))  # right half red
    data = encode(img, "GIF", transparency=0)  # left half (index 0) transparent
    loaded = load_image(data_uri(data, "image/gif"), 0, LIMITS)
    assert loaded.image.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.image.getpixel((6, 1)) == (255, 0, 0)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    loaded = load_image(data_uri(buf.getvalue(), "image/gif"), 0, LIMITS)
    r, g, b = loaded.image.getpixel((4, 4))
    assert b > 200 and g < 50


def test_rgba_and_la_alpha_composite_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(data_uri(encode(rgba, "PNG")), 0, LIMITS).image.getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert load_image(data_uri(encode(la, "PNG")), 0, LIMITS).image.getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    loaded = load_image(data_uri(encode(img, "JPEG", exif=exif.tobytes(), quality=95), "image/jpeg"), 0, LIMITS)
    assert loaded.image.size == (20, 40)
    r, g, b = loaded.image.getpixel((10, 3))  # the strip is now at the top
    assert r > 200 and g < 80


def test_url_safe_and_wrapped_base64_are_accepted() -> None:
    data = encode(gradient(), "PNG")
    wrapped = base64.b64encode(data).decode()
    wrapped = "\n".join(wrapped[i : i + 60] for i in range(0, len(wrapped), 60))
    assert load_image("data:image/png;base64," + wrapped, 0, LIMITS).width == 32
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert load_image("data:image/png;base64," + urlsafe, 0, LIMITS).width == 32


def test_file_url_inside_allowed_dir(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    p = tmp_path / "imgs" / "a b.png"
    p.write_bytes(encode(gradient(), "PNG"))
    limits = ImageLimits(allow_file_dirs=(tmp_path / "imgs",))
    loaded = load_image(p.as_uri(), 0, limits)
    assert loaded.source == "file" and loaded.width == 32


# --------------------------------------------------------------------------- bad inputs


def test_truncated_png() -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    err = expect_error(data_uri(data[: len(data) // 2]), "invalid_image", index=2)
    assert "truncated" in str(err) or "corrupt" in str(err)


def test_random_bytes() -> None:
    err = expect_error(data_uri(np.random.default_rng(1).bytes(500)), "unsupported_image_format", index=1)
    assert "not a supported image" in str(err)


def test_zero_bytes() -> None:
    err = expect_error("data:image/png;base64,", "empty_image", index=3)
    assert "empty" in str(err)


def test_decompression_bomb_refused_from_header() -> None:
    # Above our cap but below Pillow's own limit: our header check answers.
    err = expect_error(data_uri(png_with_header(8000, 8000)), "image_too_large", index=4)
    assert "8000x8000" in str(err)
    # Far above Pillow's limit: Pillow refuses inside open(); still a clean ImageError.
    expect_error(data_uri(png_with_header(100_000, 100_000)), "image_too_large", index=5)
    # A custom, lower cap.
    expect_error(data_uri(encode(gradient(), "PNG")), "image_too_large", limits=ImageLimits(max_pixels=100))


def test_zero_dimension_png() -> None:
    err = expect_error(data_uri(png_with_header(0, 10)), "invalid_image")
    assert "image 0" in str(err)


def test_unsupported_format_tiff() -> None:
    err = expect_error(data_uri(encode(gradient(), "TIFF"), "image/tiff"), "unsupported_image_format")
    assert "TIFF" in str(err)


def test_non_image_mediatype() -> None:
    expect_error("data:text/plain;base64,aGVsbG8=", "unsupported_image_format")


def test_bad_base64() -> None:
    expect_error("data:image/png;base64,@@@@", "invalid_image_url")
    expect_error("data:image/png;base64", "invalid_image_url")


def test_too_many_bytes_checked_before_decoding() -> None:
    limits = ImageLimits(max_bytes=1000)
    expect_error("data:image/png;base64," + "A" * 10_000, "image_too_large", limits=limits)


def test_file_url_refused_without_allow_list(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(encode(gradient(), "PNG"))
    err = expect_error(p.as_uri(), "unsupported_image_source")
    assert "disabled" in str(err)


def test_file_url_outside_allow_list_and_escapes(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(gradient(), "PNG"))
    limits = ImageLimits(allow_file_dirs=(allowed,))
    expect_error(secret.as_uri(), "unsupported_image_source", limits=limits)
    # '..' escape
    expect_error(f"file://{allowed}/../secret.png", "unsupported_image_source", limits=limits)
    # symlink inside the allowed dir pointing out of it
    link = allowed / "link.png"
    os.symlink(secret, link)
    expect_error(link.as_uri(), "unsupported_image_source", limits=limits)
    # missing file inside the allowed dir
    expect_error((allowed / "nope.png").as_uri(), "image_not_found", limits=limits)
    # remote host
    expect_error("file://example.com/etc/passwd", "unsupported_image_source", limits=limits)


def test_http_refused_by_default() -> None:
    err = expect_error("https://example.com/cat.png", "unsupported_image_source", index=6)
    assert "http" in str(err)


def test_unknown_scheme_and_bare_path() -> None:
    err = expect_error("ftp://example.com/cat.png", "unsupported_image_source")
    assert str(err).endswith("use a data: URI or a file:// URL"), str(err)  # the sources this server takes
    err = expect_error("ftp://example.com/cat.png", "unsupported_image_source",
                       limits=ImageLimits(allow_http=True))
    assert str(err).endswith("use a data: URI, a file:// URL or an http(s):// URL"), str(err)
    expect_error("/etc/passwd", "unsupported_image_source")
    expect_error("", "invalid_image_url")


# --------------------------------------------------------------------------- http (opt-in)


@pytest.fixture()
def image_server():
    png = encode(gradient(), "PNG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/ok.png":
                body = png
            elif self.path == "/big.png":
                body = b"\x00" * 5000
            elif self.path.startswith("/redirect?to="):
                self.send_response(302)
                self.send_header("Location", self.path.split("=", 1)[1])
                self.end_headers()
                return
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no Content-Length: the streamed cap must catch it
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_when_allowed(image_server: str) -> None:
    limits = ImageLimits(allow_http=True, http_timeout_s=5, http_max_bytes=4000, allow_hosts=("127.0.0.1",))
    loaded = load_image(f"{image_server}/ok.png", 0, limits)
    assert loaded.source == "http" and loaded.width == 32
    assert load_image(f"{image_server}/redirect?to=/ok.png", 0, limits).sha256 == loaded.sha256
    expect_error(f"{image_server}/big.png", "image_too_large", limits=limits)
    expect_error(f"{image_server}/missing.png", "image_fetch_failed", limits=limits)


def test_http_refuses_non_public_addresses_unless_listed(image_server: str) -> None:
    port = image_server.rsplit(":", 1)[1]
    unlisted = ImageLimits(allow_http=True, http_timeout_s=5)
    err = expect_error(f"{image_server}/ok.png", "image_host_refused", limits=unlisted)
    assert "127.0.0.1" in str(err) and "loopback" in str(err) and "--allow-image-host" in str(err)
    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/x.png", "http://[::1]/x.png",
                "http://[::ffff:127.0.0.1]/x.png", "http://0.0.0.0/x.png"):
        expect_error(url, "image_host_refused", limits=unlisted)
    by_range = ImageLimits(allow_http=True, http_timeout_s=5, allow_hosts=("127.0.0.0/8",))
    assert load_image(f"http://127.0.0.1:{port}/ok.png", 0, by_range).width == 32
    by_name = ImageLimits(allow_http=True, http_timeout_s=5, allow_hosts=("LocalHost",))
    assert load_image(f"http://localhost:{port}/ok.png", 0, by_name).width == 32


def test_http_redirect_to_a_blocked_address_is_refused(image_server: str) -> None:
    port = image_server.rsplit(":", 1)[1]
    limits = ImageLimits(allow_http=True, http_timeout_s=5, allow_hosts=("localhost",))
    allowed = f"http://localhost:{port}"
    # The unlisted 127.0.0.1 serves the image: only the per-hop check stops the first one.
    for to in (f"http://127.0.0.1:{port}/ok.png", "http://169.254.169.254/latest/meta-data/"):
        err = expect_error(f"{allowed}/redirect?to={to}", "image_host_refused", limits=limits)
        assert to.split("/")[2].split(":")[0] in str(err)
    err = expect_error(f"{allowed}/redirect?to=/redirect?to=/redirect?to=/redirect?to=/ok.png",
                       "image_fetch_failed", limits=limits)
    assert "redirects" in str(err)
