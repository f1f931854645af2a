"""Workloads end to end: real pytest runs (pytester, in a subprocess) against the mock server,
checked against the mock's own request log and the JSON report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from pytest_llmload.mock import MockServer
from pytest_llmload.workload import Workload, parse_dataset_spec
from tests.test_plugin import output, report_tests, run


def _sent(server: MockServer) -> list[dict[str, Any]]:
    """The logged requests the tests made (the warm-up asks for 4 tokens), in arrival order."""
    return sorted(
        (r for r in server.requests() if r["max_tokens"] != 4), key=lambda r: r["received_ns"]
    )


def _records(path: Path, name: str) -> list[dict[str, Any]]:
    return report_tests(path)[name]["records"]


def test_output_tokens_come_in_full_and_the_table_says_how_many_fell_short(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=20, rps=40)
        def test_lengths(llm):
            llm.stream("Tell me a story.")
        """
    )
    with MockServer.start("ttft=5ms,itl=1ms,tokens=20") as server:
        result = run(pytester, "--llm-output-tokens", "128", "--llm-report", "r.json",
                     server=server)
        text = output(result)
        assert result.ret == 0, text
        sent = _sent(server)
    records = _records(pytester.path / "r.json", "test_lengths")
    assert len(records) == 20
    assert all(r["output_tokens"] == 128 and r["tokens_source"] == "usage" for r in records)
    assert all(r["target_output_tokens"] == 128 and r["short"] is False for r in records)
    assert all(
        (r["max_tokens"], r["ignore_eos"], r["min_tokens"]) == (128, True, 128) for r in sent
    )
    assert "output length: 0/20 came up short of their target (0%)" in text
    assert "output tokens 128" in text  # the load line names the workload


def test_a_short_answer_counts_as_short(pytester: pytest.Pytester) -> None:
    """A server that stops early (this body's own max_tokens wins) shows in the share."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=4, rps=40, output_tokens=50, slo=["short_rate<=10%"])
        def test_short(llm):
            llm.stream("Hi.")
        """
    )
    with MockServer.start("ttft=5ms,itl=1ms,tokens=20") as server:
        # the mock's per-request spec: an answer of 20 tokens whatever was asked
        result = run(pytester, "--llm-report", "r.json", server=server)
        text = output(result)
        assert result.ret == 0, text
    # the mock honours ignore_eos, so none is short here; a record with fewer tokens would be
    records = _records(pytester.path / "r.json", "test_short")
    assert [r["output_tokens"] for r in records] == [50] * 4
    assert "SLO PASS  short_rate" in text


def _sharegpt(path: Path, n: int) -> None:
    rows = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "system", "value": f"system {i}"},
                {"from": "human", "value": f"row {i} first question"},
                {"from": "gpt", "value": f"row {i} first answer"},
                {"from": "human", "value": f"row {i} second question"},
                {"from": "gpt", "value": f"row {i} second answer"},
            ],
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(rows), encoding="utf-8")


def test_sharegpt_rows_replay_in_seeded_order(pytester: pytest.Pytester) -> None:
    _sharegpt(pytester.path / "sg.json", 6)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=9, concurrency=1, seed=123, dataset="sg.json")
        def test_replay(llm):
            llm.stream()
        """
    )
    expected_w = Workload(seed=123, dataset=parse_dataset_spec(str(pytester.path / "sg.json")))
    expected = [[dict(m) for m in expected_w.row(i).messages] for i in range(9)]
    orders = []
    for _ in range(2):
        with MockServer.start("ttft=2ms,itl=0,tokens=3") as server:
            result = run(pytester, "--llm-report", "r.json", server=server)
            assert result.ret == 0, output(result)
            sent = [r["messages"] for r in _sent(server)]
        assert sent == expected
        orders.append(sent)
    assert orders[0] == orders[1]
    # rows are shuffled (not file order) and cycled: 6 rows, then the first 3 of a new shuffle
    firsts = [m[1]["content"].split()[1] for m in expected]
    assert sorted(firsts[:6]) == [str(i) for i in range(6)] and firsts[:6] != sorted(firsts[:6])
    # each request carries the row's history up to its last question
    assert [m["role"] for m in expected[0]] == ["system", "user", "assistant", "user"]
    records = _records(pytester.path / "r.json", "test_replay")
    assert all(isinstance(r["input_tokens"], int) and r["input_tokens"] > 0 for r in records)


def test_a_row_replayed_as_a_conversation_with_the_models_own_replies(
    pytester: pytest.Pytester,
) -> None:
    _sharegpt(pytester.path / "sg.json", 3)
    pytester.makepyfile(
        """
        import json, pytest

        def test_turns(llm, tmp_path_factory):
            row = llm.next_row()
            chat = llm.chat()
            replies = [chat.send(text).text for text in row.user_turns]
            with open("replies.json", "w") as f:
                json.dump({"turns": row.user_turns, "replies": replies}, f)
        """
    )
    with MockServer.start("ttft=2ms,itl=0,tokens=5") as server:
        result = run(pytester, "--llm-dataset", "sg.json", server=server)
        assert result.ret == 0, output(result)
        sent = [r["messages"] for r in _sent(server)]
    got = json.loads((pytester.path / "replies.json").read_text())
    assert len(sent) == 2
    assert sent[1] == [
        {"role": "user", "content": got["turns"][0]},
        {"role": "assistant", "content": got["replies"][0]},  # the model's, not the dataset's
        {"role": "user", "content": got["turns"][1]},
    ]


def test_a_three_turn_conversation_sends_its_whole_history(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import json, threading, pytest

        LOCK = threading.Lock()

        @pytest.mark.llm_load(requests=4, concurrency=2)
        def test_chat(llm):
            chat = llm.chat(system="Be brief.", think_time="50ms")
            replies = [chat.send(q).text for q in ("one", "two", "three")]
            with LOCK, open("replies.jsonl", "a") as f:
                f.write(json.dumps(replies) + "\\n")
        """
    )
    with MockServer.start("ttft=5ms,itl=1ms,tokens=6") as server:
        result = run(pytester, "--llm-report", "r.json", server=server)
        text = output(result)
        assert result.ret == 0, text
        sent = _sent(server)
    assert "conversations: the schedule counted 4 conversations (12 turns, one request each)" in (
        text
    )
    replies = {
        json.loads(line)[0]: json.loads(line)
        for line in (pytester.path / "replies.jsonl").read_text().splitlines()
    }
    third = [r["messages"] for r in sent if len(r["messages"]) == 6]
    assert len(third) == 4
    for messages in third:
        non_system = [m for m in messages if m["role"] != "system"]
        first_reply = non_system[1]["content"]
        assert non_system == [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": replies[first_reply][0]},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": replies[first_reply][1]},
            {"role": "user", "content": "three"},
        ]
    counts = sorted(len([m for m in r["messages"] if m["role"] != "system"]) for r in sent)
    assert counts == [1] * 4 + [3] * 4 + [5] * 4
    records = _records(pytester.path / "r.json", "test_chat")
    by_conv: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_conv.setdefault(r["conversation"], []).append(r)
    assert len(by_conv) == 4
    for turns in by_conv.values():
        turns.sort(key=lambda r: r["turn"])
        assert [r["turn"] for r in turns] == [0, 1, 2]
        for prev, nxt in zip(turns, turns[1:]):
            assert nxt["start"] - prev["end"] >= 0.05  # the think time


def test_a_shared_prefix_is_cached_after_its_groups_first_request(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=16, concurrency=1, prefix="groups=2,prefix_tokens=512",
                              input_tokens=32)
        def test_prefix(llm):
            llm.stream()
        """
    )
    with MockServer.start("ttft=20ms,itl=1ms,tokens=4,prefill_per_token=100us") as server:
        result = run(pytester, "--llm-report", "r.json", server=server)
        text = output(result)
        assert result.ret == 0, text
        sent = _sent(server)
    records = _records(pytester.path / "r.json", "test_prefix")
    assert [r["cached_tokens"] for r in records] == [r["cached_tokens"] for r in sent]
    firsts = [r for r in records if r["cached_tokens"] == 0]
    later = [r for r in records if r["cached_tokens"] > 0]
    assert len(firsts) == 2 and len(later) == 14  # one miss per group, then hits
    # the groups' first requests pay ~45 ms of prefill the later ones skip
    assert statistics.mean(r["ttft"] for r in later) < 0.75 * min(r["ttft"] for r in firsts)
    assert "prefix cache:" in text and "14/16 requests hit" in text
    # every prompt starts with one of two shared system prompts
    assert len({r["messages"][0]["content"] for r in sent}) == 2


def test_reasoning_first_gives_both_times_to_first_token(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=10, rps=20, slo=["ttft.p99<5s", "ttfct.p99<5s"])
        def test_think(llm):
            out = llm.stream("Why?")
            assert out.reasoning and out.text
        """
    )
    with MockServer.start("ttft=10ms,itl=5ms,tokens=4,reasoning_tokens=10") as server:
        result = run(pytester, "--llm-report", "r.json", server=server)
        text = output(result)
        assert result.ret == 0, text
    records = _records(pytester.path / "r.json", "test_think")
    assert all(r["ttfct"] > r["ttft"] for r in records)
    # ten reasoning tokens of 5 ms each come before the content
    assert statistics.mean(r["ttfct"] - r["ttft"] for r in records) > 0.03
    lines = text.splitlines()
    assert any(line.strip().startswith("TTFT (ms)") for line in lines)
    assert any(line.strip().startswith("TTFCT (ms)") for line in lines)
    assert "reasoning: 10/10 responses reasoned first" in text
    assert "SLO PASS  ttfct.p99" in text
    summary = report_tests(pytester.path / "r.json")["test_think"]
    assert summary["ttfct"]["mean"] > summary["metrics"]["ttft"]["mean"]


def test_synthetic_prompts_have_their_length(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=5, rps=40)
        def test_synth(llm):
            llm.stream()
        """
    )
    with MockServer.start("ttft=2ms,itl=0,tokens=3") as server:
        result = run(pytester, "--llm-input-tokens", "uniform:40-60", "--llm-tokenizer",
                     "tiktoken:cl100k_base", "--llm-report", "r.json", server=server)
        assert result.ret == 0, output(result)
        sent = _sent(server)
    from pytest_llmload.tokens import load_tokenizer

    tok = load_tokenizer("tiktoken:cl100k_base")
    assert tok is not None
    lengths = [tok.count(r["messages"][0]["content"]) for r in sent]
    assert len(lengths) == 5 and all(40 <= n <= 60 for n in lengths)
    assert len({r["messages"][0]["content"] for r in sent}) == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--llm-dataset", "someone/sharegpt"], "datasets are read from local paths only"),
        (["--llm-input-tokens", "normal:x"], "--llm-input-tokens: expected a token length"),
        (["--llm-prefix", "groups=2"], "prefix_tokens is required"),
    ],
)
def test_bad_workload_options_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = run(pytester, "--llm-model", "mock", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in output(result)
    assert "Traceback" not in output(result)


def test_a_prompt_less_call_without_a_workload_says_what_to_configure(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile("def test_x(llm):\n    llm.stream()\n")
    with MockServer.start("ttft=2ms,itl=0,tokens=3") as server:
        result = run(pytester, server=server)
    assert result.ret == 1
    assert "without a prompt, and no workload gives one" in output(result)
