"""A request's image: a `data:` URL with a base64 JPEG, PNG or WebP, or (only with
--allow-remote-images) an http(s) URL fetched with a timeout; either way no more than
--max-image-bytes encoded (413 above it), then fully decoded as `ps3edge run` opens a file.

Blocking (decoding, the fetch): the app runs it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.request
import time

from PIL import Image

from ..errors import Ps3EdgeError
from ..runtime.preprocess import open_image
from .protocol import ApiError, bad_request

MEDIA_TYPES = ("image/jpeg", "image/jpg", "image/png", "image/webp")
PARAM = "messages.image_url.url"
FETCH_CHUNK = 1 << 16
_DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.S | re.I)


def _format(raw: bytes) -> str | None:
    """JPEG, PNG or WebP by the file's own signature (the declared media type is not trusted)."""
    if raw.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    return None


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the image is {size} bytes encoded; this server takes at most {limit} "
                         f"(--max-image-bytes)", PARAM, "image_too_large")


def decode(raw: bytes, limit: int) -> Image.Image:
    """Encoded bytes -> a decoded PIL image, or 400 / 413."""
    if len(raw) > limit:
        raise too_large(len(raw), limit)
    if _format(raw) is None:
        raise bad_request("the image is not a JPEG, PNG or WebP file", PARAM)
    try:
        return open_image(io.BytesIO(raw), name="the image")
    except Ps3EdgeError as e:
        raise bad_request(str(e), PARAM) from None


def from_data_url(url: str, limit: int) -> Image.Image:
    m = _DATA_URL.match(url)
    if not m:
        raise bad_request("the image's data: URL is malformed (expected data:image/png;base64,...)", PARAM)
    media = m.group("type").strip().lower()
    if media not in MEDIA_TYPES:
        raise bad_request(f"the image's media type is '{media or 'none'}'; this server takes image/jpeg, image/png "
                          f"and image/webp", PARAM)
    if "base64" not in [p.strip().lower() for p in m.group("params").split(";")]:
        raise bad_request("the image's data: URL must be base64-encoded (data:image/png;base64,...)", PARAM)
    data = re.sub(r"\s+", "", m.group("data"))
    if len(data) * 3 // 4 - data[-2:].count("=") > limit:           # refused before it is decoded
        raise too_large(len(data) * 3 // 4 - data[-2:].count("="), limit)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the image's data: URL is not valid base64", PARAM) from None
    return decode(raw, limit)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib would also follow one to ftp:)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.URLError(f"redirected to a non-http(s) URL ({newurl.split(':')[0]}:)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, limit: int, timeout_s: float) -> bytes:
    """An http(s) image, at most `limit` bytes (413 above it), all of it within `timeout_s` (a
    server that sends a byte at a time does not hold a worker longer)."""
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "ps3edge-serve-openai"})
    deadline = time.monotonic() + timeout_s
    try:
        with opener.open(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise too_large(int(declared), limit)
            chunks, size = [], 0
            while size <= limit:
                if time.monotonic() > deadline:
                    raise bad_request(f"could not fetch the image: not all of it came in {timeout_s:g} s", PARAM)
                chunk = response.read1(FETCH_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            raw = b"".join(chunks)
    except ApiError:
        raise
    except urllib.error.HTTPError as e:
        raise bad_request(f"could not fetch the image: the server answered {e.code} {e.reason}", PARAM) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise bad_request(f"could not fetch the image ({reason})", PARAM) from None
    if len(raw) > limit:
        raise too_large(len(raw), limit)
    return raw


def load(url: str, limit: int, allow_remote: bool, timeout_s: float) -> Image.Image:
    """The image a request's image_url names, decoded; 400 / 413 otherwise."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return from_data_url(url, limit)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise bad_request("remote image URLs are refused: send the image as a data: URL (base64), or start the "
                              "server with --allow-remote-images", PARAM)
        return decode(fetch(url, limit, timeout_s), limit)
    raise bad_request(f"the image URL must be a data: URL{' or http(s)' if allow_remote else ''}, "
                      f"got '{scheme or url[:20]}'", PARAM)
