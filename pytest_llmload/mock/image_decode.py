"""Image sizes from data URLs, reading only the header (PNG IHDR, JPEG SOF, GIF, WebP).

The mock charges prefill time per megapixel, so it needs width x height, never the pixels.
"""

from __future__ import annotations

import base64
import binascii
import struct

__all__ = ["ImageError", "data_url_image", "image_size"]

# Enough base64 for any PNG/GIF/WebP header and most JPEGs (SOF after a modest EXIF block).
_HEAD_B64_CHARS = 64 * 1024


class ImageError(ValueError):
    """A data URL the mock can't read; the message is for the HTTP 400 body."""


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, JPEG, GIF or WebP file; None if the header
    is not (yet) recognisable."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return int(w), int(h)
        return None
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return int(w), int(h)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        kind = data[12:16]
        if kind == b"VP8X":
            w = int.from_bytes(data[24:27], "little") + 1
            h = int.from_bytes(data[27:30], "little") + 1
            return w, h
        if kind == b"VP8 ":
            w, h = struct.unpack("<HH", data[26:30])
            return int(w) & 0x3FFF, int(h) & 0x3FFF
        if kind == b"VP8L":
            b = data[21:25]
            w = 1 + (((b[1] & 0x3F) << 8) | b[0])
            h = 1 + (((b[3] & 0x0F) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
            return w, h
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(w), int(h)
        i += 2 + length
    return None


def data_url_image(url: str) -> tuple[int, int, int]:
    """(width, height, bytes) of a ``data:image/...;base64,...`` URL, decoding only its head."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise ImageError("the image_url is not a data URL")
    if not header.endswith(";base64"):
        raise ImageError("the image data URL is not base64-encoded")
    payload = payload.strip()
    padding = len(payload) - len(payload.rstrip("="))
    nbytes = len(payload) * 3 // 4 - padding
    head = payload[: min(len(payload), _HEAD_B64_CHARS) // 4 * 4]
    try:
        size = image_size(base64.b64decode(head, validate=True))
        if size is None and len(head) < len(payload):
            size = image_size(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise ImageError("the image data URL is not valid base64") from None
    if size is None:
        raise ImageError("the image is not a PNG, JPEG, GIF or WebP file")
    return size[0], size[1], nbytes
