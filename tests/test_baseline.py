"""Baselines without a pytest run: the check grammar, the storage folder, fingerprints, and the
comparison's statistics on synthetic records."""

from __future__ import annotations

import datetime as dt
import json
import random
from array import array
from pathlib import Path

import pytest

from pytest_llmload.baseline import (
    Storage,
    api_host,
    fingerprint,
    fingerprint_differences,
    machine_id,
    merge_checks,
    parse_compare_fail,
    parse_compare_fail_list,
)
from pytest_llmload.compare import check_rows, compare_records, compare_test
from pytest_llmload.config import ConfigError
from pytest_llmload.records import NS, RequestRecord

# -- checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "tolerance", "relative", "expr"),
    [
        ("ttft.p99:10%", "ttft.p99", 0.10, True, "ttft.p99:10%"),
        (" itl.p50 : 5ms ", "itl.p50", 0.005, False, "itl.p50:5ms"),
        ("e2e:200ms", "e2e.mean", 0.2, False, "e2e.mean:200ms"),
        ("tpot.p99.9:2.5%", "tpot.p99.9", 0.025, True, "tpot.p99.9:2.5%"),
        ("error_rate:+1%", "error_rate", 0.01, False, "error_rate:+1%"),
        ("error_rate:0.02", "error_rate", 0.02, False, "error_rate:+0.02"),
        ("TTFT.P90:250us", "ttft.p90", 0.00025, False, "ttft.p90:250us"),
    ],
)
def test_parse_compare_fail(
    text: str, key: str, tolerance: float, relative: bool, expr: str
) -> None:
    check = parse_compare_fail(text)
    assert check.key == key
    assert check.tolerance == pytest.approx(tolerance)
    assert check.relative is relative
    assert check.expr == expr
    assert parse_compare_fail(check.expr) == check


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("ttft.p99", "expected METRIC[.STAT]:TOLERANCE"),
        ("ttfb.p99:10%", "'ttfb' is not a metric a baseline check can use (did you mean 'ttft'?)"),
        ("ttft.max:5%", "max has no confidence interval"),
        ("ttft.p100:5%", "unknown statistic 'p100'"),
        ("ttft.p99:10", "a bare number is ambiguous for ttft"),
        ("error_rate.p99:1%", "error_rate is a single figure"),
        ("error_rate:5ms", "error_rate takes percentage points"),
        ("output_throughput:10%", "not a metric a baseline check can use"),
    ],
)
def test_parse_compare_fail_refuses_with_a_sentence(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_compare_fail(text, "--llm-compare-fail")
    message = str(info.value)
    assert message.startswith("--llm-compare-fail: ")
    assert says in message
    assert repr(text) in message
    assert message.endswith(".")


def test_a_more_specific_check_of_the_same_figure_wins_and_others_add_up() -> None:
    marker = parse_compare_fail_list(["ttft.p99:25%"])
    cli = parse_compare_fail_list(["ttft.p99:10%", "itl.p50:5ms"])
    assert [c.expr for c in merge_checks(marker, cli)] == ["ttft.p99:25%", "itl.p50:5ms"]
    with pytest.raises(ConfigError, match="llm_load\\(compare_fail=...\\): expected a check"):
        parse_compare_fail_list(3, "llm_load(compare_fail=...)")


# -- storage --------------------------------------------------------------------------------------


def test_machine_id_has_the_shape_of_a_folder_name() -> None:
    mid = machine_id()
    system, impl, version, bits = mid.split("-")
    assert system and impl and version.count(".") == 1 and bits.endswith("bit")


def test_storage_numbers_runs_and_resolves_references(tmp_path: Path) -> None:
    store = Storage(tmp_path / ".llmload", "Linux-CPython-3.12-64bit")
    assert store.runs() == []
    assert store.resolve(None) is None  # nothing saved: no baseline, not an error
    day = dt.date(2026, 12, 1)
    first = store.reserve("main", day)
    second = store.reserve("feature/x y", day)
    third = store.reserve("main", dt.date(2026, 12, 2))
    assert [r.label for r in store.runs()] == [
        "0001_main_2026-12-01", "0002_feature-x-y_2026-12-01", "0003_main_2026-12-02"]
    assert first.path.parent == tmp_path / ".llmload" / "Linux-CPython-3.12-64bit"
    assert store.resolve(None) == third
    assert store.resolve("latest") == third
    assert store.resolve("2") == second
    assert store.resolve("0001") == first
    assert store.resolve("main") == third  # a name: its latest run
    assert store.resolve("0001_main_2026-12-01") == first
    assert store.resolve(str(second.path)).path == second.path  # a path
    with pytest.raises(ConfigError) as info:
        store.resolve("nope", "--llm-compare")
    message = str(info.value)
    assert message.startswith("--llm-compare: no saved run 'nope' in ")
    assert "0003_main_2026-12-02" in message
    with pytest.raises(ConfigError, match="nothing is saved there yet"):
        Storage(tmp_path / "empty").resolve("7")


def test_reserve_never_reuses_a_number(tmp_path: Path) -> None:
    store = Storage(tmp_path, "m")
    store.folder.mkdir(parents=True)
    (store.folder / "0005_old_2026-01-01.json").write_text("{}")
    assert store.reserve("new").number == 6


# -- fingerprints ---------------------------------------------------------------------------------


def _fp(**changes: object) -> dict[str, object]:
    args: dict[str, object] = {
        "test": "t.py::test_a", "model": "openai/m", "api_base": "http://10.0.0.5:8000/v1",
        "arrival": "poisson", "rps": 5.0, "concurrency": None, "max_tokens": None,
        "transport": "sse", "workload": {"source": "def test_a(llm): ..."},
    }
    args.update(changes)
    return fingerprint(**args)  # type: ignore[arg-type]


def test_fingerprints_compare_field_by_field() -> None:
    assert fingerprint_differences(_fp(), _fp()) == []
    diff = fingerprint_differences(_fp(), _fp(rps=10.0, workload={"source": "changed"}))
    assert [d["field"] for d in diff] == ["rps", "workload"]
    assert diff[0] == {"field": "rps", "baseline": 5.0, "new": 10.0}
    assert [d["field"] for d in fingerprint_differences(None, _fp())][:3] == [
        "test", "model", "api_host"]


def test_api_host_ignores_a_loopback_port_and_the_path() -> None:
    assert api_host("openai/m", "http://127.0.0.1:41234/v1") == "127.0.0.1"
    assert api_host("openai/m", "http://localhost:8000/v1") == "localhost"
    assert api_host("openai/m", "https://API.example.com:8443/v1") == "api.example.com:8443"
    assert api_host("openai/m", "https://api.example.com/v1") == "api.example.com"
    assert api_host("mock", None) == "embedded mock"
    assert api_host("openai/gpt-4o", None) == "provider default"


# -- the comparison on synthetic records ----------------------------------------------------------


def _records(n: int, ttft_s: float, itl_s: float, seed: int, *, failed: int = 0,
             tokens: int = 5) -> list[RequestRecord]:
    rng = random.Random(seed)
    out = []
    t = 0
    for i in range(n):
        start = t
        first = start + round(ttft_s * rng.uniform(0.5, 1.5) * NS)
        chunks = [first + round(k * itl_s * rng.uniform(0.5, 1.5) * NS) for k in range(tokens)]
        rec = RequestRecord(start_ns=start, chunk_ns=array("q", sorted(chunks)),
                            chunk_tokens=array("l", [1] * tokens), end_ns=chunks[-1],
                            output_tokens=tokens)
        if i < failed:
            rec = RequestRecord(start_ns=start, end_ns=start + 1000, error_type="http_500",
                                error="boom")
        out.append(rec)
        t += 10_000_000
    return out


TTFT_P99_10 = parse_compare_fail("ttft.p99:10%")


def test_the_same_records_show_no_change_and_pass() -> None:
    a = _records(300, 0.1, 0.01, seed=1)
    rows = compare_records("t", a, a, [TTFT_P99_10])
    ttft = next(r for r in rows if r["key"] == "ttft.p99")
    assert ttft["change"] == 0.0
    lo, hi = ttft["change_ci"]
    assert lo < 0 < hi
    assert check_rows(rows, [TTFT_P99_10], baseline="b")[0]["status"] == "ok"


def test_a_slower_run_fails_only_when_the_whole_interval_is_beyond_the_tolerance() -> None:
    base = _records(300, 0.1, 0.01, seed=1)
    slow = _records(300, 0.15, 0.01, seed=2)  # 50 % slower time to first token
    rows = compare_records("t", base, slow, [TTFT_P99_10])
    [verdict] = check_rows(rows, [TTFT_P99_10], baseline="0003_main_2026-12-01")
    assert verdict["status"] == "regression"
    assert verdict["message"].startswith("regression: ttft.p99 +")
    assert "(95% CI +" in verdict["message"]
    assert verdict["message"].endswith("> 10% vs baseline 0003_main_2026-12-01")
    # the same change with a tolerance inside the interval: not confident, so no failure
    row = next(r for r in rows if r["key"] == "ttft.p99")
    lo, hi = row["change_ci"]
    loose = parse_compare_fail(f"ttft.p99:{(lo + hi) / 2 * 100:.3f}%")
    assert check_rows(rows, [loose], baseline="b")[0]["status"] == "ok"


def test_error_rate_is_compared_in_percentage_points() -> None:
    base = _records(400, 0.1, 0.01, seed=1)
    worse = _records(400, 0.1, 0.01, seed=2, failed=40)  # 0 % -> 10 %
    checks = [parse_compare_fail("error_rate:+1%")]
    rows = compare_records("t", base, worse, checks)
    row = next(r for r in rows if r["key"] == "error_rate")
    assert row["difference"] == pytest.approx(0.10)
    [verdict] = check_rows(rows, checks, baseline="b")
    assert verdict["status"] == "regression"
    assert "error_rate +10 pp" in verdict["message"] and "> 1 pp" in verdict["message"]


def test_an_absolute_tolerance_reads_the_difference() -> None:
    base = _records(300, 0.1, 0.010, seed=1)
    new = _records(300, 0.1, 0.020, seed=2)  # ITL doubled: about +10 ms at the median
    rows = compare_records("t", base, new)
    [bad, good] = check_rows(rows, [parse_compare_fail("itl.p50:5ms"),
                                    parse_compare_fail("itl.p50:20ms")], baseline="b")
    assert bad["status"] == "regression" and "ms (95% CI +" in bad["message"]
    assert good["status"] == "ok"


def test_intervals_repeat_for_the_same_test_and_records() -> None:
    a = _records(200, 0.1, 0.01, seed=1)
    b = _records(200, 0.12, 0.01, seed=2)
    assert compare_records("t::x", a, b) == compare_records("t::x", a, b)


def test_compare_test_reads_report_entries_and_checks_fingerprints() -> None:
    def entry(records: list[RequestRecord], fp: dict[str, object]) -> dict[str, object]:
        return {"nodeid": "t", "records": [r.to_dict() for r in records], "fingerprint": fp}

    base = entry(_records(100, 0.1, 0.01, seed=1), _fp())
    new = entry(_records(100, 0.3, 0.01, seed=2), _fp(max_tokens=64))
    out = compare_test("t", base, new, [TTFT_P99_10], baseline="0001_main_2026-12-01")
    assert out["comparable"] is False
    assert out["regressions"] == [] and out["rows"] == []  # no verdict at all
    assert out["reason"] == "the fingerprints differ in max_tokens (None -> 64)"
    new["fingerprint"] = _fp()
    out = compare_test("t", base, new, [TTFT_P99_10], baseline="0001_main_2026-12-01")
    assert out["comparable"] is True and len(out["regressions"]) == 1
    json.dumps(out, allow_nan=False)  # plain JSON, as the report and the command write it
    missing = compare_test("t", None, new, [TTFT_P99_10], baseline="b")
    assert missing["reason"] == "the baseline has no entry for this test"
