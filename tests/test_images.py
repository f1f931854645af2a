"""images.py: generated PNGs, random heights, content parts from user images, no network."""

from __future__ import annotations

import base64
import io
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pytest_llmload.images import (
    MAX_RANDOM_HEIGHT,
    MIN_RANDOM_HEIGHT,
    GeneratedImage,
    ImageError,
    ImageFactory,
    image_part,
    make_image,
    random_height,
    with_image,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt during these tests is a bug: images are made locally, never fetched."""

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"images.py tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def decode_data_url(url: str) -> tuple[str, bytes]:
    header, _, payload = url.partition(",")
    assert header.startswith("data:") and header.endswith(";base64")
    return header[len("data:") : -len(";base64")], base64.b64decode(payload, validate=True)


def png_bytes(width: int, height: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color=128 if mode in ("L", "P") else (10, 20, 30)).save(
        buf, format=fmt
    )
    return buf.getvalue()


# -- make_image ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height"), [(1024, 512), (1024, 1024), (1024, 100), (1, 1), (3, 7)]
)
def test_make_image_decodes_to_the_requested_size(width: int, height: int) -> None:
    img = make_image(width, height, seed=42)
    mime, data = decode_data_url(img.data_url)
    assert mime == img.mime == "image/png"
    assert img.nbytes == len(data)
    assert (img.width, img.height) == (width, height)
    with Image.open(io.BytesIO(data)) as decoded:
        decoded.load()  # a broken zlib stream or filter byte fails here
        assert decoded.format == "PNG"
        assert decoded.size == (width, height)
        assert decoded.mode == "RGB"


def test_make_image_defaults_to_1024x512() -> None:
    img = make_image(seed=0)
    assert (img.width, img.height) == (1024, 512)


def test_make_image_pixels_are_a_gradient_stamped_with_the_seed() -> None:
    # A wrong filter byte or row offset still decodes, but into wrapped-around garbage: the
    # smoothness check catches it.
    seed = 0x0102030405060708
    img = make_image(64, 48, seed=seed)
    _, data = decode_data_url(img.data_url)
    with Image.open(io.BytesIO(data)) as decoded:
        pixels = np.asarray(decoded.convert("RGB")).astype(int)
    assert pixels.shape == (48, 64, 3)
    assert pixels[0, :8, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert (pixels[0, :8, 0] == pixels[0, :8, 2]).all()
    body = pixels[1:]
    assert np.abs(np.diff(body, axis=0)).max() <= 255 // 46 + 1
    assert np.abs(np.diff(body, axis=1)).max() <= 255 // 63 + 1
    assert body.std() > 1.0  # not flat


def test_same_seed_same_bytes_different_seed_different_pixels() -> None:
    a = make_image(256, 128, seed=1)
    assert make_image(256, 128, seed=1) == a
    pixels: set[bytes] = set()
    urls: set[str] = set()
    for seed in range(40):
        img = make_image(256, 128, seed=seed)
        urls.add(img.data_url)
        _, data = decode_data_url(img.data_url)
        with Image.open(io.BytesIO(data)) as decoded:
            pixels.add(decoded.tobytes())
    assert len(urls) == 40
    assert len(pixels) == 40  # the pixels differ, not only the encoding


def test_neighbouring_and_huge_seeds_differ() -> None:
    seeds = [0, 1, 2**32, 2**63, 2**64 - 1, -1]
    urls = {make_image(32, 16, seed=s).data_url for s in seeds}
    # -1 and 2**64 - 1 are the same seed modulo 2**64; every other pair differs.
    assert len(urls) == len(seeds) - 1
    assert make_image(32, 16, seed=-1) == make_image(32, 16, seed=2**64 - 1)


@pytest.mark.parametrize("bad", [0, -5, 16385, 10.0, "512", True, None])
def test_make_image_rejects_bad_sizes(bad: Any) -> None:
    with pytest.raises(ImageError, match=r"make_image: width must be a whole number"):
        make_image(bad, 10, seed=0)
    with pytest.raises(ImageError, match=r"height .* got"):
        make_image(10, bad, seed=0)


def test_make_image_is_fast() -> None:
    make_image(1024, 1024, seed=0)  # numpy import and first-call costs are not what we measure
    best = float("inf")
    for seed in range(5):
        t0 = time.perf_counter()
        make_image(1024, 1024, seed=seed)
        best = min(best, time.perf_counter() - t0)
    # About 14 ms here for 1024x1024 (7 ms for 1024x512); a generous bound for a loaded CI box.
    assert best < 0.15, f"make_image(1024, 1024) took {best * 1e3:.1f} ms"


def test_meta_matches_the_record_shape() -> None:
    img = make_image(20, 10, seed=3)
    assert img.meta == {"width": 20, "height": 10, "bytes": img.nbytes}


# -- heights and the factory ----------------------------------------------------------------


def test_random_heights_stay_in_range_and_cover_it() -> None:
    rng = random.Random(5)
    heights = [random_height(rng) for _ in range(5000)]
    assert min(heights) >= MIN_RANDOM_HEIGHT == 100
    assert max(heights) <= MAX_RANDOM_HEIGHT == 1024
    # Uniform over 925 values: 5000 draws reach both ends' neighbourhoods.
    assert min(heights) < 110
    assert max(heights) > 1014


def test_factory_default_size_and_determinism() -> None:
    factory = ImageFactory(randomize=False, seed=9)
    first = factory.next(0)
    assert first is not None
    assert (first.width, first.height) == (1024, 512)
    assert ImageFactory(randomize=False, seed=9).next(0) == first
    second = factory.next(1)
    assert second is not None and second.data_url != first.data_url
    other = ImageFactory(randomize=False, seed=10).next(0)
    assert other is not None and other.data_url != first.data_url


def test_factory_randomized_heights() -> None:
    factory = ImageFactory(randomize=True, seed=4)
    sizes = [factory.size(i) for i in range(200)]
    assert all(w == 1024 and 100 <= h <= 1024 for w, h in sizes)
    assert len({h for _, h in sizes}) > 50
    assert sizes == [ImageFactory(randomize=True, seed=4).size(i) for i in range(200)]
    for index in (0, 1, 2):
        img = factory.next(index)
        assert img is not None
        assert (img.width, img.height) == sizes[index]


# -- image_part ---------------------------------------------------------------------------


def test_part_from_generated_image() -> None:
    img = make_image(30, 20, seed=1)
    part, meta = image_part(img)
    assert part == {"type": "image_url", "image_url": {"url": img.data_url}}
    assert meta == {"width": 30, "height": 20, "bytes": img.nbytes}


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_part_from_bytes_keeps_common_encodings(fmt: str, mime: str) -> None:
    data = png_bytes(40, 25, fmt=fmt)
    part, meta = image_part(data)
    url = part["image_url"]["url"]
    got_mime, got = decode_data_url(url)
    assert got_mime == mime
    assert got == data  # sent as it was, not re-encoded
    assert meta == {"width": 40, "height": 25, "bytes": len(data)}


def test_part_from_other_formats_reencodes_as_png() -> None:
    data = png_bytes(12, 9, fmt="BMP")
    part, meta = image_part(data)
    mime, got = decode_data_url(part["image_url"]["url"])
    assert mime == "image/png"
    with Image.open(io.BytesIO(got)) as decoded:
        assert decoded.format == "PNG" and decoded.size == (12, 9)
    assert meta == {"width": 12, "height": 9, "bytes": len(got)}


def test_part_from_path_and_str_path(tmp_path: Path) -> None:
    data = png_bytes(33, 44, fmt="JPEG")
    file = tmp_path / "cat.jpg"
    file.write_bytes(data)
    for arg in (file, str(file)):
        part, meta = image_part(arg)
        mime, got = decode_data_url(part["image_url"]["url"])
        assert (mime, got) == ("image/jpeg", data)
        assert meta == {"width": 33, "height": 44, "bytes": len(data)}


def test_part_from_pil_image() -> None:
    pil = Image.new("RGB", (17, 5), (1, 2, 3))
    part, meta = image_part(pil)
    mime, got = decode_data_url(part["image_url"]["url"])
    assert mime == "image/png"
    with Image.open(io.BytesIO(got)) as decoded:
        assert decoded.size == (17, 5)
        assert decoded.getpixel((0, 0)) == (1, 2, 3)
    assert meta == {"width": 17, "height": 5, "bytes": len(got)}


def test_part_from_cmyk_pil_image_converts() -> None:
    part, meta = image_part(Image.new("CMYK", (4, 4)))
    assert part["image_url"]["url"].startswith("data:image/png;base64,")
    assert meta["width"] == 4


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://10.0.0.1/x.jpg?a=1"])
def test_http_url_passes_through_unfetched(url: str) -> None:
    part, meta = image_part(url)  # the autouse fixture fails the test on any connect
    assert part == {"type": "image_url", "image_url": {"url": url}}
    assert meta == {"width": None, "height": None, "bytes": None}


def test_data_url_passes_through_with_header_metadata() -> None:
    data = png_bytes(21, 13, fmt="WEBP")
    url = "data:image/webp;base64," + base64.b64encode(data).decode()
    part, meta = image_part(url)
    assert part["image_url"]["url"] is url
    assert meta == {"width": 21, "height": 13, "bytes": len(data)}


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        (b"", r"empty bytes"),
        (b"definitely not an image", r"not an image Pillow can read"),
        ("data:text/plain;base64,aGVsbG8=", r"base64 image data URL"),
        ("data:image/png,rawpixels", r"base64 image data URL"),
        ("data:image/png;base64,aGVsbG8=", r"not an image Pillow can read"),
        ("data:image/png;base64,@@@", r"not an image|valid base64"),
        ("no/such/file.png", r"'no/such/file.png' does not exist"),
        (12345, r"expected a file path, .* got a int"),
        (None, r"got a NoneType"),
    ],
)
def test_bad_images_raise_a_sentence(arg: Any, message: str) -> None:
    with pytest.raises(ImageError, match=message) as info:
        image_part(arg)
    assert isinstance(info.value, ValueError)
    assert str(info.value).endswith(".")


def test_text_file_and_folder_are_rejected(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("just words")
    with pytest.raises(ImageError, match=r"notes.png' is not an image"):
        image_part(text)
    with pytest.raises(ImageError, match=r"is a folder"):
        image_part(tmp_path)


# -- with_image -------------------------------------------------------------------------------


PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def test_with_image_turns_string_content_into_parts_without_mutating() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "describe this"},
    ]
    snapshot = [dict(m) for m in messages]
    out = with_image(messages, PART)
    assert messages == snapshot
    assert out[:3] == snapshot[:3]
    assert out[3] == {
        "role": "user",
        "content": [{"type": "text", "text": "describe this"}, PART],
    }
    assert out is not messages and out[3] is not messages[3]


def test_with_image_appends_to_existing_parts_without_mutating() -> None:
    parts = [{"type": "text", "text": "look"}]
    messages = [{"role": "user", "content": parts}]
    out = with_image(messages, PART)
    assert out[0]["content"] == [{"type": "text", "text": "look"}, PART]
    assert parts == [{"type": "text", "text": "look"}]
    assert messages[0]["content"] is parts


def test_with_image_without_a_user_message_adds_one() -> None:
    out = with_image([{"role": "system", "content": "s"}], PART)
    assert out == [{"role": "system", "content": "s"}, {"role": "user", "content": [PART]}]
    assert with_image([], PART) == [{"role": "user", "content": [PART]}]


def test_with_image_rejects_odd_content() -> None:
    with pytest.raises(ImageError, match=r"string or a list of content parts, got a dict"):
        with_image([{"role": "user", "content": {"x": 1}}], PART)


def test_generated_image_is_frozen() -> None:
    img = make_image(2, 2, seed=0)
    with pytest.raises(AttributeError):
        img.width = 3  # type: ignore[misc]
    assert isinstance(img, GeneratedImage)


def test_importing_images_is_cheap() -> None:
    code = (
        "import sys, pytest_llmload.images\n"
        "heavy = [m for m in ('numpy', 'PIL', 'pytest') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == ""
