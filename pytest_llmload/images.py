"""Images for multimodal requests, made locally before a request is timed.

An image fetched from the internet inside the timed request would count its download as server
latency, and the same image sent every time lets a server's multimodal cache skip the vision
encoder. So every request gets its own image, generated in memory from a seed (a colour gradient stamped with the seed), so the pixels, not only the bytes,
differ between requests; an :class:`ImageFeed` makes a load test's images in background threads
before its schedule starts, so making them never shows in the timings.

numpy and Pillow are imported inside the functions that need them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import io
import random
import struct
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "DEFAULT_HEIGHT",
    "DEFAULT_WIDTH",
    "MAX_RANDOM_HEIGHT",
    "MIN_RANDOM_HEIGHT",
    "GeneratedImage",
    "ImageError",
    "ImageFactory",
    "ImageFeed",
    "ImageInput",
    "image_part",
    "make_image",
    "random_height",
    "with_image",
]

DEFAULT_WIDTH = 1024
DEFAULT_HEIGHT = 512
MIN_RANDOM_HEIGHT = 100
MAX_RANDOM_HEIGHT = 1024
#: Largest side make_image accepts (a 16384 x 16384 RGB image is 800 MB of pixels already).
MAX_SIDE = 16384

#: Formats sent as they are; anything else Pillow can read is re-encoded as PNG.
_KEPT_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}

ImageMeta = dict[str, int | None]


class ImageError(ValueError):
    """An image argument that cannot be sent. The message is a whole sentence for the user."""


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """A PNG made in memory, ready to send."""

    data_url: str
    width: int
    height: int
    nbytes: int
    """Size of the encoded PNG (before base64)."""
    mime: str = "image/png"

    @property
    def meta(self) -> dict[str, int]:
        """``{"width", "height", "bytes"}``, the shape :class:`RequestRecord.image` stores."""
        return {"width": self.width, "height": self.height, "bytes": self.nbytes}


# -- generation -----------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def make_image(
    width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT, *, seed: int
) -> GeneratedImage:
    """An RGB PNG of ``width`` x ``height`` whose pixels depend on ``seed``.

    A gradient between three colours drawn from ``seed``, with the seed's 8 bytes stamped into
    the first pixels of the top row: distinct seeds (mod 2**64) always give distinct pixels, so a
    server's image cache never serves one request's image for another's.

    The PNG is written directly (filter "Up" on every row, zlib level 1): Pillow's encoder tries
    every filter on every row and takes several times longer for the same picture. Noise was left
    out on purpose: it made the PNG 7 times larger and encoding 4 times slower (zlib-bound),
    and uniqueness doesn't need it.
    """
    for label, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_SIDE:
            raise ImageError(
                f"make_image: {label} must be a whole number of pixels from 1 to {MAX_SIDE}, "
                f"got {side!r}."
            )
    import numpy as np

    seed &= 0xFFFFFFFFFFFFFFFF
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 256, size=(3, 3)).astype(np.int32)  # top-left, top-right, bottom
    xs = np.arange(width, dtype=np.int32)[:, None]
    ys = np.arange(height, dtype=np.int32)[:, None, None]
    top = corners[0] + (corners[1] - corners[0]) * xs // max(width - 1, 1)  # (width, 3)
    # Blend each column of the top edge towards the bottom colour: stays within 0..255.
    pixels = (top + (corners[2] - top) * ys // max(height - 1, 1)).astype(np.uint8)
    stamp = np.frombuffer(seed.to_bytes(8, "big"), dtype=np.uint8)[: min(8, width)]
    pixels[0, : len(stamp), :] = stamp[:, None]

    flat = pixels.reshape(height, width * 3)
    scanlines = np.empty((height, width * 3 + 1), dtype=np.uint8)
    scanlines[:, 0] = 2  # filter type Up: each byte minus the byte above (zeros above row 0)
    scanlines[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=scanlines[1:, 1:])
    png = b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
            _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 1)),
            _png_chunk(b"IEND", b""),
        )
    )
    data_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return GeneratedImage(data_url=data_url, width=width, height=height, nbytes=len(png))


def random_height(rng: random.Random) -> int:
    """A height drawn uniformly from 100..1024 inclusive (as ``--llm-randomize-image-dimensions`` promises)."""
    return rng.randint(MIN_RANDOM_HEIGHT, MAX_RANDOM_HEIGHT)


class ImageFactory:
    """One image per request index: its size reproducible from ``(seed, index)``.

    ``randomize=True`` keeps the width at 1024 and draws the height from 100..1024
    (``--llm-randomize-image-dimensions``).

    ``salt`` is mixed into the pixels only, never the sizes: the plugin passes a random salt per
    run, so the same seed repeats the heights while a server that kept last run's images (a
    multimodal cache outlives a CI job) still sees new ones. With the same salt (0 by default)
    the images repeat byte for byte.
    """

    def __init__(
        self,
        *,
        randomize: bool,
        seed: int,
        width: int = DEFAULT_WIDTH,
        height: int = DEFAULT_HEIGHT,
        salt: int = 0,
    ) -> None:
        self.randomize = randomize
        self.seed = seed
        self.width = width
        self.height = height
        self.salt = salt & 0xFFFFFFFFFFFFFFFF

    def size(self, index: int) -> tuple[int, int]:
        """The ``(width, height)`` of image ``index``, without making it."""
        if not self.randomize:
            return self.width, self.height
        return self.width, random_height(self._rng(index))

    def next(self, index: int) -> GeneratedImage:
        """The image for request ``index``."""
        rng = self._rng(index)
        height = random_height(rng) if self.randomize else self.height
        # XOR with one salt keeps distinct indices distinct
        return make_image(self.width, height, seed=rng.getrandbits(64) ^ self.salt)

    def _rng(self, index: int) -> random.Random:
        # A str seed is hashed with SHA-512: stable across processes, unlike hash().
        return random.Random(f"llmload-image:{self.seed}:{index}")

    def __repr__(self) -> str:
        return (
            f"ImageFactory(randomize={self.randomize}, seed={self.seed}, "
            f"width={self.width}, height={self.height}, salt={self.salt})"
        )


def _yield_cpu() -> None:
    """Lower this thread's CPU priority, where the OS allows it per thread (Linux): on a busy
    machine the event loop, which timestamps the streams, runs first."""
    import os
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class ImageFeed:
    """A load test's images, made ahead of its schedule in background threads.

    A 1024x512 PNG costs several milliseconds of CPU. Made on the event loop that carries every
    stream, it would hold back the other streams' chunk timestamps; made when the request's turn
    comes, it would count as schedule lag. So the feed makes the images of ``order`` (the
    indices in the order the schedule will ask for them) ``ahead`` at a time in ``threads``
    threads (numpy and zlib release the GIL), and a request picks up a finished one.

    Use from one event loop: ``await prime()`` before the schedule starts, ``await get(i)`` per
    request, ``close()`` at the end. An index outside ``order`` is made on demand, still in a
    thread. ``on_demand`` and ``waited`` count the images that were not made, or not finished,
    ahead of their request.
    """

    def __init__(
        self,
        factory: ImageFactory,
        order: Iterable[int],
        *,
        ahead: int = 16,
        threads: int = 2,
    ) -> None:
        self.factory = factory
        self._order = iter(order)
        self._ahead = max(1, ahead)
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="llmload-images", initializer=_yield_cpu
        )
        self._pending: dict[int, Future[GeneratedImage | None]] = {}
        self.on_demand = 0
        self.waited = 0

    def _fill(self) -> None:
        while len(self._pending) < self._ahead:
            index = next(self._order, None)
            if index is None:
                return
            if index not in self._pending:
                self._pending[index] = self._pool.submit(self.factory.next, index)

    async def prime(self) -> None:
        """Start making images and wait for the first ``ahead`` of them."""
        self._fill()
        if self._pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in self._pending.values()])

    async def get(self, index: int) -> GeneratedImage | None:
        """The image of request ``index``; waits only if it is not made yet."""
        future = self._pending.pop(index, None)
        if future is None:
            self.on_demand += 1
            future = self._pool.submit(self.factory.next, index)
        self._fill()
        if not future.done():
            self.waited += 1
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Drop the images made ahead and not asked for; stop the threads."""
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return (
            f"<ImageFeed {self.factory!r} ahead={self._ahead} pending={len(self._pending)} "
            f"on_demand={self.on_demand} waited={self.waited}>"
        )


# -- user images -> content parts -------------------------------------------------------------

ImageInput = Union[str, bytes, bytearray, memoryview, Path, "PILImage.Image", GeneratedImage]


def _part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _meta(width: int | None, height: int | None, nbytes: int | None) -> ImageMeta:
    return {"width": width, "height": height, "bytes": nbytes}


def _describe(data: bytes, what: str) -> tuple[str, int, int]:
    """(format, width, height) of encoded image bytes, from their header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return str(img.format), int(img.width), int(img.height)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(
            f"{what} is not an image Pillow can read (expected PNG, JPEG, WebP, GIF or another "
            f"format Pillow opens): {exc}."
        ) from exc


def _encoded_part(data: bytes, what: str) -> tuple[dict[str, Any], ImageMeta]:
    fmt, width, height = _describe(data, what)
    mime = _KEPT_FORMATS.get(fmt)
    if mime is None:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return _pil_part(img)
    url = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    return _part(url), _meta(width, height, len(data))


def _pil_part(img: PILImage.Image) -> tuple[dict[str, Any], ImageMeta]:
    if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    url = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return _part(url), _meta(img.width, img.height, len(data))


def _data_url_part(url: str) -> tuple[dict[str, Any], ImageMeta]:
    header, sep, payload = url.partition(",")
    shown = url if len(url) <= 60 else url[:57] + "..."
    if (
        not sep
        or not header.lower().startswith("data:image/")
        or not header.lower().endswith(";base64")
    ):
        raise ImageError(
            f"image: expected a base64 image data URL like 'data:image/png;base64,...', "
            f"got {shown!r}."
        )
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(
            f"image: the data URL {shown!r} does not hold valid base64 ({exc})."
        ) from exc
    _, width, height = _describe(data, f"image: the data URL {shown!r}")
    return _part(url), _meta(width, height, len(data))


def image_part(image: ImageInput) -> tuple[dict[str, Any], ImageMeta]:
    """An OpenAI ``image_url`` content part for ``image`` and its ``{"width", "height", "bytes"}``.

    - :class:`GeneratedImage`: its data URL;
    - ``http(s)://`` URL: passed through, never fetched (size unknown: None values);
    - ``data:`` URL: passed through, size read from the image header;
    - file path (str or Path) or encoded bytes: sent as a data URL, keeping PNG, JPEG, WebP
      and GIF as they are and re-encoding other formats as PNG;
    - a PIL image: encoded as PNG.

    Raises :class:`ImageError` (a ValueError) for a missing file or anything that is not an image.
    """
    if isinstance(image, GeneratedImage):
        return _part(image.data_url), _meta(image.width, image.height, image.nbytes)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ImageError("image: got empty bytes, expected an encoded image (PNG, JPEG ...).")
        return _encoded_part(data, f"image: the {len(data)} bytes given")
    if isinstance(image, str):
        lowered = image[:16].lower()
        if lowered.startswith(("http://", "https://")):
            return _part(image), _meta(None, None, None)
        if lowered.startswith("data:"):
            return _data_url_part(image)
        return _file_part(Path(image))
    if isinstance(image, Path):
        return _file_part(image)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        return _pil_part(image)
    raise ImageError(
        f"image: expected a file path, an http(s) or data: URL, encoded image bytes, a PIL image "
        f"or a GeneratedImage, got a {type(image).__name__} ({image!r:.60})."
    )


def _file_part(path: Path) -> tuple[dict[str, Any], ImageMeta]:
    path = path.expanduser()
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise ImageError(f"image: the file {str(path)!r} {state}; expected an image file.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"image: could not read {str(path)!r} ({exc.strerror or exc}).") from exc
    return _encoded_part(data, f"image: the file {str(path)!r}")


def with_image(messages: Sequence[dict[str, Any]], part: dict[str, Any]) -> list[dict[str, Any]]:
    """A copy of ``messages`` with ``part`` appended to the last user message's content.

    A string content becomes ``[{"type": "text", "text": ...}, part]``. The caller's list and
    dicts are left as they were. With no user message, a new one holding only the part is added.
    """
    result = [dict(m) for m in messages]
    for message in reversed(result):
        if message.get("role") == "user":
            content = message.get("content")
            if content is None or content == "":
                parts: list[Any] = []
            elif isinstance(content, str):
                parts = [{"type": "text", "text": content}]
            elif isinstance(content, list):
                parts = copy.copy(content)
            else:
                raise ImageError(
                    f"with_image: the last user message's content must be a string or a list "
                    f"of content parts, got a {type(content).__name__}."
                )
            parts.append(part)
            message["content"] = parts
            return result
    result.append({"role": "user", "content": [part]})
    return result
