"""Images end to end: real pytest runs (pytester) against the mock on 127.0.0.1.

Every inner run has a conftest that refuses any connection, datagram or name lookup that is not
loopback and writes down each attempt; a test in the run checks the guard itself by trying
192.0.2.1 (a documentation address). The outer test then expects that one attempt and nothing
else. The conftest also records where and when every image was made.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Iterator
from typing import Any

import aiohttp  # noqa: F401 - imported here, so the in-process inner runs don't import it again
import numpy  # noqa: F401 - (pytester drops modules a run imported; numpy cannot load twice)
import PIL.Image  # noqa: F401
import pytest

from pytest_llmload.engine import Arrival, JobContext, LoadPlan, run_load
from pytest_llmload.images import GeneratedImage, ImageFactory, ImageFeed, make_image
from pytest_llmload.mock import MockServer
from pytest_llmload.session import image_order
from tests.timing import wake_up_lateness_s

TTFT_S = 0.030
PREFILL_S_PER_MP = 0.200
MOCK_SPEC = f"ttft={TTFT_S * 1000:g}ms,itl=1ms,tokens=4,image_prefill={PREFILL_S_PER_MP * 1000:g}ms"

GUARD_CONFTEST = '''
import ipaddress, json, socket, threading, time

from pytest_llmload import images

ATTEMPTS = []  # every non-loopback connect, sendto or name lookup, refused
MADE = []      # (thread name, perf_counter_ns when done) of every make_image call
GETS = []      # perf_counter_ns of every ImageFeed.get call (a job asking for its image)
_real = {
    "connect": socket.socket.connect, "connect_ex": socket.socket.connect_ex,
    "sendto": socket.socket.sendto, "getaddrinfo": socket.getaddrinfo,
    "make_image": images.make_image, "get": images.ImageFeed.get,
}


def _loopback(host):
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _check(what, address):
    if isinstance(address, tuple) and not _loopback(address[0]):
        ATTEMPTS.append(f"{what} {address[0]}:{address[1]}")
        raise ConnectionRefusedError(f"no network in this test: {what} {address!r}")


def _connect(self, address):
    _check("connect", address)
    return _real["connect"](self, address)


def _connect_ex(self, address):
    _check("connect", address)
    return _real["connect_ex"](self, address)


def _sendto(self, data, *args):
    _check("sendto", args[-1])
    return _real["sendto"](self, data, *args)


def _getaddrinfo(host, *args, **kwargs):
    if host is not None and not _loopback(host):
        ATTEMPTS.append(f"getaddrinfo {host}")
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")
    return _real["getaddrinfo"](host, *args, **kwargs)


def _make_image(*args, **kwargs):
    image = _real["make_image"](*args, **kwargs)
    MADE.append((threading.current_thread().name, time.perf_counter_ns()))
    return image


async def _get(self, index):
    GETS.append(time.perf_counter_ns())
    return await _real["get"](self, index)


def pytest_configure(config):
    socket.socket.connect = _connect
    socket.socket.connect_ex = _connect_ex
    socket.socket.sendto = _sendto
    socket.getaddrinfo = _getaddrinfo
    images.make_image = _make_image
    images.ImageFeed.get = _get


def pytest_unconfigure(config):
    socket.socket.connect = _real["connect"]
    socket.socket.connect_ex = _real["connect_ex"]
    socket.socket.sendto = _real["sendto"]
    socket.getaddrinfo = _real["getaddrinfo"]
    images.make_image = _real["make_image"]
    images.ImageFeed.get = _real["get"]
    with open("guard.json", "w") as f:
        json.dump({"attempts": ATTEMPTS, "made": MADE, "gets": GETS}, f)
'''

GUARD_SELF_CHECK = '''
import socket

import pytest


def test_the_guard_refuses_the_network():
    with socket.socket() as s, pytest.raises(ConnectionRefusedError, match="no network"):
        s.connect(("192.0.2.1", 80))
'''
SELF_CHECK_ATTEMPT = "connect 192.0.2.1:80"


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer.start(MOCK_SPEC) as server:
        yield server


def _last_id(mock: MockServer) -> int:
    log = mock.requests()
    return int(log[-1]["id"]) if log else 0


def run_offline(
    pytester: pytest.Pytester,
    mock: MockServer,
    source: str,
    *args: str,
    passed: int,
    subprocess: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``source`` as a test file, offline, against ``mock``. Returns the requests the mock
    received during the run and what the guard saw; fails unless ``passed`` tests passed (the
    guard's own check included) and the only network attempt was the guard's check."""
    pytester.makeconftest(GUARD_CONFTEST)
    pytester.makepyfile(test_guard=GUARD_SELF_CHECK, test_load=source)
    since = _last_id(mock)
    run = pytester.runpytest_subprocess if subprocess else pytester.runpytest
    result = run(
        "-p", "no:cacheprovider", "--llm-model", "openai/mock", "--llm-api-base",
        mock.base_url, *args,
    )
    result.assert_outcomes(passed=passed + 1)
    guard: dict[str, Any] = json.loads((pytester.path / "guard.json").read_text())
    assert guard["attempts"] == [SELF_CHECK_ATTEMPT]
    return mock.requests(since=since), guard


def _report(pytester: pytest.Pytester, name: str = "report.json") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((pytester.path / name).read_text())
    return doc


def _records(report: dict[str, Any], test: str) -> list[dict[str, Any]]:
    (entry,) = [t for t in report["tests"] if t["nodeid"].endswith("::" + test)]
    records: list[dict[str, Any]] = entry["records"]
    return records


N = 24
SEEDED_LOAD = f'''
import pytest


@pytest.mark.llm_load(requests={N}, rps=100, arrival="constant", max_tokens=2)
def test_load(llm):
    out = llm.stream("Tell me a story about this image.")
    assert out.text
'''


def _image_requests(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log if r["images"]]


def test_random_heights_reach_the_mock_and_repeat_with_the_seed(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    def run(seed: int, report: str) -> list[dict[str, Any]]:
        log, guard = run_offline(
            pytester, mock, SEEDED_LOAD, "--llm-randomize-image-dimensions",
            f"--llm-seed={seed}", f"--llm-report={report}", passed=1,
        )
        sent = _image_requests(log)
        assert len(sent) == N  # one image per request (the uncounted warm-up has none)
        assert all(len(r["images"]) == 1 and r["status"] == 200 for r in sent)
        # every image was made in the feed's threads and before the first job asked for one
        assert len(guard["made"]) == N
        assert {name.split("_")[0] for name, _ in guard["made"]} == {"llmload-images"}
        assert max(t for _, t in guard["made"]) < min(guard["gets"])
        # the JSON report keeps what each request carried, as the mock measured it
        records = _records(_report(pytester, report), "test_load")
        by_id = {r["response_id"]: r["images"][0] for r in sent}
        assert {r["response_id"]: r["image"] for r in records} == by_id
        return [r["images"][0] for r in sent]

    first = run(7, "r1.json")
    heights = [img["height"] for img in first]
    assert {img["width"] for img in first} == {1024}
    assert all(100 <= h <= 1024 for h in heights)
    assert len(set(heights)) > N // 2
    assert min(heights) < 600 < max(heights)
    # the heights are the seed's, request by request
    factory = ImageFactory(randomize=True, seed=7)
    assert sorted(heights) == sorted(factory.size(i)[1] for i in range(N))

    again = run(7, "r2.json")
    assert sorted(img["height"] for img in again) == sorted(heights)
    # ... while the pixels are new in every run: a server's cache from the last run can't hit
    assert sorted((i["height"], i["bytes"]) for i in again) != sorted(
        (i["height"], i["bytes"]) for i in first
    )

    other = run(8, "r3.json")
    assert sorted(img["height"] for img in other) != sorted(heights)


def test_marker_keywords_and_the_implied_include(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    source = '''
import pytest

LOAD = dict(requests=6, rps=100, arrival="constant")


@pytest.mark.llm_load(**LOAD, max_tokens=1)
def test_flag_alone(llm):
    llm.stream("Tell me a story about this image.")


@pytest.mark.llm_load(**LOAD, max_tokens=2, include_image=False)
def test_text_only(llm):
    llm.stream("Tell me a story.")


@pytest.mark.llm_load(**LOAD, max_tokens=3, include_image=True, randomize_image_dimensions=False)
async def test_fixed_size(llm):
    await llm.astream("Tell me a story about this image.")


def test_not_a_load_test(llm):
    llm.stream("Say hello.", max_tokens=5)
'''
    log, _ = run_offline(
        pytester, mock, source, "--llm-randomize-image-dimensions", "--llm-seed=3", passed=4
    )
    by_test: dict[int, list[Any]] = {}
    for r in log:
        if r["max_tokens"] in (1, 2, 3, 5):
            by_test.setdefault(r["max_tokens"], []).append(r["images"])
    flag_alone, text_only, fixed, single = (by_test[k] for k in (1, 2, 3, 5))
    assert len(flag_alone) == len(text_only) == len(fixed) == 6 and len(single) == 1
    # --llm-randomize-image-dimensions alone attaches images (it implies --llm-include-image)
    assert all(len(i) == 1 and i[0]["width"] == 1024 for i in flag_alone)
    assert len({i[0]["height"] for i in flag_alone}) > 1
    # a marker's include_image=False wins over the CLI flag
    assert text_only == [[]] * 6
    # marker keywords: include_image=True, randomize_image_dimensions=False -> 1024x512
    assert [(i[0]["width"], i[0]["height"]) for i in fixed] == [(1024, 512)] * 6
    # the options shape load tests; a plain test's single request goes as written
    assert single == [[]]


def test_ttft_rises_with_image_area_as_the_mock_prefill_model_says(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    source = f'''
import pytest


@pytest.mark.llm_load(requests={N}, rps=50, arrival="constant", max_tokens=2,
                      randomize_image_dimensions=True)
async def test_images(llm):
    await llm.astream("Tell me a story about this image.")


@pytest.mark.llm_load(requests=8, rps=50, arrival="constant", max_tokens=2)
async def test_text(llm):
    await llm.astream("Tell me a story.")
'''
    run_offline(pytester, mock, source, "--llm-report=report.json", passed=2)
    report = _report(pytester)
    text = [r["ttft"] for r in _records(report, "test_text")]
    images = _records(report, "test_images")
    assert len(images) == N and len(text) == 8
    mp = [r["image"]["width"] * r["image"]["height"] / 1e6 for r in images]
    ttft = [r["ttft"] for r in images]
    model = [TTFT_S + PREFILL_S_PER_MP * m for m in mp]
    # the margins: 10 ms (5 ms without images) on a quiet machine, plus the event loop's
    # wake-up lateness measured now, which every stamped instant carries on a loaded one
    noise = 2 * wake_up_lateness_s()
    # the client's TTFT includes the mock's: never below the model (1 ms for timer rounding)
    assert min(t - m for t, m in zip(ttft, model)) > -0.001
    assert statistics.median(t - m for t, m in zip(ttft, model)) < 0.010 + noise
    # least squares of TTFT on megapixels: the mock's prefill rate and its base TTFT
    mean_mp, mean_t = statistics.fmean(mp), statistics.fmean(ttft)
    spread = sum((m - mean_mp) ** 2 for m in mp)
    slope = sum((m - mean_mp) * (t - mean_t) for m, t in zip(mp, ttft)) / spread
    slope_noise = noise / (max(mp) - min(mp))  # the noise, as a slope over the range of sizes
    assert slope == pytest.approx(PREFILL_S_PER_MP, rel=0.1, abs=slope_noise)
    assert mean_t - slope * mean_mp == pytest.approx(TTFT_S, abs=0.010 + noise)
    # without an image the same mock answers at its base TTFT
    assert statistics.median(text) == pytest.approx(TTFT_S, abs=0.005 + noise)


def test_users_own_images_and_remote_urls_offline(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    source = '''
import io

import pytest
from PIL import Image

from pytest_llmload.client import StreamError
from pytest_llmload.images import make_image


def test_user_images(llm, tmp_path):
    picture = Image.new("RGB", (320, 200), (200, 120, 40))
    path = tmp_path / "picture.png"
    picture.save(path)
    jpeg = io.BytesIO()
    picture.resize((640, 480)).save(jpeg, format="JPEG")
    generated = make_image(64, 48, seed=1)
    sent = [
        (path, (320, 200, path.stat().st_size)),
        (str(path), (320, 200, path.stat().st_size)),
        (jpeg.getvalue(), (640, 480, len(jpeg.getvalue()))),
        (picture.resize((50, 70)), (50, 70, None)),
        (generated, (64, 48, generated.nbytes)),
        (generated.data_url, (64, 48, generated.nbytes)),
    ]
    for image, (width, height, size) in sent:
        out = llm.stream("Tell me a story about this image.", image=image, max_tokens=2)
        meta = out.record.image
        assert (meta["width"], meta["height"]) == (width, height)
        assert size is None or meta["bytes"] == size
    with pytest.raises(StreamError) as caught:
        llm.stream("And this one?", image="https://example.com/cat.png", max_tokens=2)
    assert caught.value.error_type == "http_400"
    assert "never fetches image URLs" in str(caught.value)
'''
    log, _ = run_offline(pytester, mock, source, passed=1)
    images = [r["images"] for r in log if r["images"]]
    assert [(i[0]["width"], i[0]["height"]) for i in images[:6]] == [
        (320, 200), (320, 200), (640, 480), (50, 70), (64, 48), (64, 48)
    ]
    # the remote URL reached the mock as a URL, which it refused without fetching it
    assert images[6] == [
        {"width": None, "height": None, "bytes": None, "url": "https://example.com/cat.png"}
    ]
    assert [r["status"] for r in log if r["images"]][6] == 400


def test_the_litellm_transport_carries_the_same_parts(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    source = '''
import asyncio

from pytest_llmload.client import LLMClient
from pytest_llmload.endpoint import Endpoint
from pytest_llmload.images import make_image


def test_litellm(llm_endpoint):
    endpoint = Endpoint("openai/mock", llm_endpoint.api_base, "sk-mock", transport="litellm")

    async def go():
        client = LLMClient(endpoint, timeout=30)
        try:
            return await client.astream(
                "Tell me a story about this image.", image=make_image(1024, 333, seed=5),
                max_tokens=3,
            )
        finally:
            await client.aclose()

    out = asyncio.run(go())
    assert out.record.transport == "litellm"
    assert out.record.image["height"] == 333 and out.output_tokens == 3
'''
    # in its own process: litellm's many modules stay out of this one
    log, _ = run_offline(pytester, mock, source, passed=1, subprocess=True)
    (sent,) = [r for r in log if r["images"]]
    assert sent["images"][0]["width"] == 1024 and sent["images"][0]["height"] == 333
    assert sent["images"][0]["bytes"] == make_image(1024, 333, seed=5).nbytes


# -- the feed against the engine's own order ------------------------------------------------------


@pytest.mark.parametrize(
    "plan",
    [
        LoadPlan(requests=12, rps=400.0, arrival=Arrival("constant")),
        LoadPlan(requests=12, rps=400.0, concurrency=2, warmup=3),
        LoadPlan(requests=13, rps=400.0, worker_index=1, worker_count=3, warmup=5),
        LoadPlan(requests=12, rps=None, concurrency=3),
        LoadPlan(requests=12, rps=6.0, arrival=Arrival("batch"), worker_index=0, worker_count=2),
        # fewer slots than workers: 2 of the 4 take part, every 2nd index each
        LoadPlan(requests=8, rps=400.0, concurrency=2, worker_index=1, worker_count=4),
        LoadPlan(requests=8, rps=None, concurrency=2, worker_index=1, worker_count=4),
    ],
    ids=["open", "capped-warmup", "worker-share", "closed", "batch", "few-slots-open",
         "few-slots-closed"],
)
def test_the_feed_has_every_image_ready_in_the_engines_order(plan: LoadPlan) -> None:
    """Every job finds its image made (none on demand, none waited for), whatever the schedule:
    the feed's order is the engine's."""
    factory = ImageFactory(randomize=True, seed=11, width=16)
    order = list(image_order(plan))
    got: dict[int, GeneratedImage | None] = {}

    async def main() -> ImageFeed:
        feed = ImageFeed(factory, iter(order), ahead=len(order))
        await feed.prime()

        async def job(ctx: JobContext) -> None:
            got[ctx.index] = await feed.get(ctx.index)

        await run_load(plan, job)
        feed.close()
        return feed

    feed = asyncio.run(main())
    assert (feed.on_demand, feed.waited) == (0, 0)
    assert sorted(got) == sorted(order)
    assert all(
        img is not None and (img.width, img.height) == factory.size(i) for i, img in got.items()
    )


def test_a_short_feed_keeps_making_images_ahead() -> None:
    factory = ImageFactory(randomize=False, seed=2, width=8, height=8)

    async def main() -> tuple[ImageFeed, list[GeneratedImage | None]]:
        feed = ImageFeed(factory, range(50), ahead=4)
        await feed.prime()
        images = []
        for i in range(50):
            images.append(await feed.get(i))
            await asyncio.sleep(0.002)
        images.append(await feed.get(99))  # outside the order: made on demand, still in a thread
        feed.close()
        return feed, images

    feed, images = asyncio.run(main())
    assert feed.on_demand == 1
    assert images == [factory.next(i) for i in [*range(50), 99]]


def test_the_salt_changes_the_pixels_only() -> None:
    a = ImageFactory(randomize=True, seed=5, salt=1)
    b = ImageFactory(randomize=True, seed=5, salt=2)
    for i in range(5):
        x, y = a.next(i), b.next(i)
        assert x is not None and y is not None
        assert (x.width, x.height) == (y.width, y.height) == a.size(i)
        assert x.data_url != y.data_url
    assert a.next(0) == ImageFactory(randomize=True, seed=5, salt=1).next(0)
