"""The mock's capacity model: slots with a FIFO queue, prefill per input token, a decode step
that slows with every request generating beside it, and the queue wait it reports."""

from __future__ import annotations

import itertools
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pytest_llmload.errors import ConfigError
from pytest_llmload.mock import MockServer, MockSpec, parse_mock_spec
from tests.test_mock import CHAT, MS, STREAM, chat_body, raw_request


def test_capacity_keys_parse_and_round_trip() -> None:
    spec = parse_mock_spec("slots=8,prefill_per_token=0.5ms,itl_per_active=2ms")
    assert (spec.slots, spec.prefill_per_token_ns, spec.itl_per_active_ns) == (8, 500_000, 2 * MS)
    assert parse_mock_spec(spec.to_string()) == spec
    assert "slots=8" in spec.to_string()
    # off by default: today's spec string and behaviour stay as they were
    assert MockSpec().slots == 0 and not MockSpec().saturates
    assert "slots" not in MockSpec().to_string()
    assert spec.saturates and parse_mock_spec("itl_per_active=1ms").saturates


@pytest.mark.parametrize("text", ["slots=-1", "slots=2.5", "itl_per_active=-3ms"])
def test_capacity_keys_reject_bad_values(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--llm-mock: .* in '"):
        parse_mock_spec(text)


def test_knee_formula() -> None:
    # service: ttft 100ms + (10 - 1) tokens * (10ms + 8 * ... no, (slots - 1) * 1ms) per step
    spec = parse_mock_spec("slots=8,ttft=100ms,itl=10ms,tokens=10,itl_per_active=1ms")
    assert spec.service_s() == pytest.approx(0.1 + 9 * (0.010 + 7 * 0.001))
    assert spec.knee_rps() == pytest.approx(8 / spec.service_s())
    with_prompt = spec.replace(prefill_per_token_ns=MS)
    assert with_prompt.service_s(prompt_tokens=50) == pytest.approx(spec.service_s() + 0.05)
    assert parse_mock_spec("slots=4,ttft=0,itl=10ms,tokens=9,chunk_tokens=3").service_s() == (
        pytest.approx(0.06)
    )
    assert MockSpec().knee_rps() is None


def _burst(port: int, n: int, body: dict[str, Any]) -> list[Any]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: raw_request(port, CHAT, body), range(n)))


def test_requests_beyond_the_slots_wait_first_come_first_served() -> None:
    # 2 slots, 100 ms per request, 5 sent at once
    with MockServer.start("slots=2,ttft=40ms,itl=15ms,tokens=5") as srv:
        service = 0.04 + 4 * 0.015
        resps = _burst(srv.port, 5, chat_body(**STREAM))
        assert all(r.status == 200 and r.text() for r in resps)
        logs = sorted(srv.requests(), key=lambda r: r["received_ns"])
        waits = [r["queue_ns"] / 1e9 for r in logs]
        # first come, first served: admitted in the order they arrived
        admitted = [r["admitted_ns"] for r in logs]
        assert admitted == sorted(admitted)
        # never more than 2 generating at once (looked at just after each admission: the request
        # whose end let it in is stamped ended a few microseconds after)
        for log in logs:
            t = log["admitted_ns"] + 1_000_000
            assert sum(r["admitted_ns"] <= t < r["end_ns"] for r in logs) <= 2
        # a slot is held for a whole service time (timers never fire early) ...
        for log in logs:
            assert (log["end_ns"] - log["admitted_ns"]) / 1e9 > service - 0.001
        # ... and a request that waited was let in when another ended (the same instant, give or
        # take the bookkeeping between the two)
        ends = [r["end_ns"] for r in logs]
        for log, wait in zip(logs, waits):
            if wait > 0:
                assert any(0 <= end - log["admitted_ns"] < 20_000_000 for end in ends), log
        assert max(waits) > service - 0.005, waits  # five sent at once: some waited
        for log in logs:
            # the schedule of a request that waited starts at its admission
            first_due = (log["due_ns"][0] - log["admitted_ns"]) / 1e9
            assert first_due == pytest.approx(0.04, abs=1e-6)
        stats = srv.stats()
        queued = sum(w > 0 for w in waits)
        assert stats["slots"] == 2 and stats["queued"] == queued and stats["max_waiting"] >= 1
        assert stats["running"] == 0 and stats["waiting"] == 0
        assert stats["queue_wait_s_max"] == pytest.approx(max(waits), abs=1e-6)
        assert stats["queue_wait_s_total"] == pytest.approx(sum(waits), abs=1e-6)


def test_without_slots_nobody_waits() -> None:
    with MockServer.start("ttft=40ms,itl=5ms,tokens=3") as srv:
        _burst(srv.port, 6, chat_body(**STREAM))
        assert [r["queue_ns"] for r in srv.requests()] == [0] * 6
        assert srv.stats()["queued"] == 0


def test_prefill_per_input_token() -> None:
    with MockServer.start("ttft=20ms,itl=1ms,tokens=2,prefill_per_token=2ms") as srv:
        raw_request(
            srv.port, CHAT, chat_body("one two three four five six seven eight nine ten", **STREAM)
        )
        log = srv.requests()[-1]
        assert log["prompt_tokens"] == 10
        assert (log["due_ns"][0] - log["received_ns"]) / MS == pytest.approx(20 + 10 * 2)


def test_decode_step_grows_with_requests_running() -> None:
    # alone: 10 ms per step; with three running: 10 + 2 * 10 = 30 ms per step
    with MockServer.start("ttft=30ms,itl=10ms,tokens=6,itl_per_active=10ms") as srv:
        raw_request(srv.port, CHAT, chat_body(**STREAM))
        alone = srv.requests()[-1]
        gaps = [(b - a) / MS for a, b in zip(alone["due_ns"], alone["due_ns"][1:])]
        assert gaps == pytest.approx([10.0] * 5)
        srv.reset()
        _burst(srv.port, 3, chat_body(**STREAM))
        for log in srv.requests():
            gaps = [(b - a) / MS for a, b in zip(log["due_ns"], log["due_ns"][1:])]
            # the three overlap for most of their steps (they arrive within a few ms)
            assert max(gaps) == pytest.approx(30.0)
            assert sum(g == pytest.approx(30.0) for g in gaps) >= 3, gaps


def test_non_streaming_requests_take_slots_too() -> None:
    with MockServer.start("slots=1,ttft=50ms,itl=10ms,tokens=3") as srv:
        resps = _burst(srv.port, 2, chat_body())
        assert all(r.status == 200 for r in resps)
        first, second = sorted(srv.requests(), key=lambda r: r["admitted_ns"])
        # the second waited for the first's whole answer (70 ms), sent as one body at its end
        assert first["queue_ns"] == 0 and second["queue_ns"] > 0
        assert 0 <= first["end_ns"] - second["admitted_ns"] < 20_000_000
        assert (first["end_ns"] - first["admitted_ns"]) / 1e9 > 0.069


def test_a_client_leaving_the_queue_frees_its_place() -> None:
    with MockServer.start("slots=1,ttft=200ms,itl=10ms,tokens=2") as srv:
        data = json.dumps(chat_body(stream=True)).encode()
        request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
            len(data),
            data,
        )
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(raw_request, srv.port, CHAT, chat_body(**STREAM))
            deadline = time.monotonic() + 5
            while srv.stats()["running"] < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                sock.sendall(request)
                while srv.stats()["waiting"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.005)
                assert srv.stats()["waiting"] == 1
            # the waiting client left: it is out of the queue, and later requests don't wait on it
            while srv.stats()["waiting"] and time.monotonic() < deadline:
                time.sleep(0.005)
            assert srv.stats()["waiting"] == 0
            assert first.result().status == 200
        raw_request(srv.port, CHAT, chat_body(**STREAM))
        logs = srv.requests()
        assert logs[1]["disconnected"] and logs[1]["admitted_ns"] is None
        assert logs[2]["queue_ns"] == 0
        assert srv.stats()["running"] == 0


def test_a_spec_override_with_slots_gets_a_pool_of_its_own() -> None:
    # the server itself never queues; requests carrying the same saturating spec share one slot
    with MockServer.start("ttft=30ms,itl=5ms,tokens=3") as srv:
        saturating = {"X-Mock-Spec": "slots=1,ttft=60ms,itl=10ms,tokens=3"}
        with ThreadPoolExecutor(6) as pool:
            queued = [pool.submit(raw_request, srv.port, CHAT, chat_body(**STREAM),
                                  headers=saturating) for _ in range(3)]
            plain = [pool.submit(raw_request, srv.port, CHAT, chat_body(**STREAM))
                     for _ in range(3)]
            assert all(f.result().status == 200 for f in queued + plain)
        logs = srv.requests()
        mine = sorted((r for r in logs if r["due_ns"][0] - r["admitted_ns"] == 60 * MS),
                      key=lambda r: r["admitted_ns"])
        assert len(mine) == 3
        # one at a time: each let in when the one before it in its pool ended
        for before, after in itertools.pairwise(mine):
            assert 0 <= before["end_ns"] - after["admitted_ns"] < 20_000_000
        waits = [r["queue_ns"] for r in mine]
        assert waits[0] == 0 and waits[1] > 0 and waits[2] > 0, waits
        assert [r["queue_ns"] for r in logs if r["due_ns"][0] - r["admitted_ns"] == 30 * MS] == [
            0, 0, 0]
        stats = srv.stats()
        assert stats["queued"] == 2 and stats["running"] == 0 and stats["waiting"] == 0
