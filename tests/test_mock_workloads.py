"""The mock's workload features: a prefix cache, reasoning streamed before content, EOS
control, and the messages of every request in its log."""

from __future__ import annotations

from typing import Any

from pytest_llmload.mock import MockServer, parse_mock_spec
from tests.test_mock import CHAT, STREAM, chat_body, raw_request

PREFIX = " ".join(f"shared{i}" for i in range(320))  # 20 cache blocks of 16 words


def _system(question: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "mock",
        "messages": [{"role": "system", "content": PREFIX},
                     {"role": "user", "content": question}],
        **extra,
    }


def test_keys_parse_and_round_trip() -> None:
    spec = parse_mock_spec("reasoning_tokens=5,prefix_cache=0")
    assert (spec.reasoning_tokens, spec.prefix_cache) == (5, 0)
    assert parse_mock_spec(spec.to_string()) == spec


def test_a_shared_prefix_hits_the_cache_and_skips_its_prefill() -> None:
    with MockServer.start("ttft=10ms,itl=1ms,tokens=4,prefill_per_token=0.5ms") as srv:
        first = raw_request(srv.port, CHAT, _system("what is one", **STREAM))
        second = raw_request(srv.port, CHAT, _system("what is two", **STREAM))
        other = raw_request(srv.port, CHAT, chat_body("another prompt entirely " * 8, **STREAM))
        assert first.chunks()[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert second.chunks()[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 320}
        assert other.chunks()[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        a, b, c = srv.requests()
        assert (a["cached_tokens"], b["cached_tokens"], c["cached_tokens"]) == (0, 320, 0)
        # the schedule itself: prefill is charged for the uncached words only
        due = [(r["due_ns"][0] - r["received_ns"]) / 1e6 for r in (a, b)]
        assert due[0] == 10 + 0.5 * 323
        assert due[1] == 10 + 0.5 * 3


def test_a_whole_cached_prompt_still_computes_its_last_block() -> None:
    words = " ".join(f"w{i}" for i in range(32))
    with MockServer.start("ttft=1ms,itl=1ms,tokens=2") as srv:
        for _ in range(2):
            raw_request(srv.port, CHAT, chat_body(words, **STREAM))
        assert [r["cached_tokens"] for r in srv.requests()] == [0, 16]


def test_no_cache_when_off() -> None:
    with MockServer.start("ttft=1ms,itl=1ms,tokens=2,prefix_cache=0") as srv:
        for _ in range(2):
            raw_request(srv.port, CHAT, _system("q", **STREAM))
        assert [r["cached_tokens"] for r in srv.requests()] == [0, 0]


def test_reasoning_streams_before_content() -> None:
    with MockServer.start("ttft=5ms,itl=1ms,tokens=4,reasoning_tokens=3") as srv:
        resp = raw_request(srv.port, CHAT, chat_body(**STREAM))
        deltas = [c["choices"][0]["delta"] for c in resp.chunks() if c.get("choices")][1:-1]
        kinds = ["reasoning_content" if "reasoning_content" in d else "content" for d in deltas]
        assert kinds == ["reasoning_content"] * 3 + ["content"] * 4
        usage = resp.chunks()[-1]["usage"]
        assert usage["completion_tokens"] == 7
        assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}
        assert srv.requests()[0]["reasoning_tokens"] == 3
        # max_tokens caps reasoning and content together
        capped = raw_request(srv.port, CHAT, chat_body(max_tokens=2, **STREAM))
        assert capped.text() == ""
        whole = raw_request(srv.port, CHAT, chat_body()).json()
        message = whole["choices"][0]["message"]
        assert len(message["reasoning_content"].split()) == 3
        assert len(message["content"].split()) == 4


def test_ignore_eos_gives_the_full_length_and_is_logged() -> None:
    with MockServer.start("ttft=1ms,itl=0,tokens=10") as srv:
        resp = raw_request(
            srv.port, CHAT, chat_body(max_tokens=40, ignore_eos=True, min_tokens=40, **STREAM)
        )
        assert resp.chunks()[-1]["usage"]["completion_tokens"] == 40
        short = raw_request(srv.port, CHAT, chat_body(max_tokens=40, **STREAM))
        assert short.chunks()[-1]["usage"]["completion_tokens"] == 10
        log = srv.requests()
        assert (log[0]["ignore_eos"], log[0]["min_tokens"]) == (True, 40)
        assert (log[1]["ignore_eos"], log[1]["min_tokens"]) == (False, None)


def test_the_log_keeps_the_messages() -> None:
    with MockServer.start("ttft=1ms,itl=0,tokens=2") as srv:
        body = _system("why?", **STREAM)
        body["messages"].append({"role": "user", "content": "x" * 10_000})
        raw_request(srv.port, CHAT, body)
        (log,) = srv.requests()
        assert log["messages"][:2] == body["messages"][:2]
        assert log["messages"][2]["content"].startswith("x" * 4096)
        assert len(log["messages"][2]["content"]) < 4200
