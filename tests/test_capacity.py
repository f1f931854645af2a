"""Capacity search: the pure search and its rules, then real runs against the saturating mock,
checked against an M/D/c queue simulation of the very schedules the probes ran."""

from __future__ import annotations

import heapq
import importlib.util
import json
import random
import time
from typing import Any

import pytest

from pytest_llmload.capacity import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Capacity,
    OverloadWatch,
    Probe,
    decide_probe,
    mann_kendall_z,
    probe_requests,
    samples_needed,
    search,
    span_requests,
)
from pytest_llmload.errors import ConfigError
from pytest_llmload.metrics import stats
from pytest_llmload.mock import parse_mock_spec
from pytest_llmload.records import RequestRecord
from pytest_llmload.settings import resolve_settings
from pytest_llmload.slo import parse_slo

BASE_ARGS = ["-p", "no:cacheprovider"] + (
    ["-p", "no:asyncio"] if importlib.util.find_spec("pytest_asyncio") else []
)

# -- the search on a fake server ----------------------------------------------------------------


def fake(threshold: float, *, inconclusive: set[float] | frozenset[float] = frozenset(),
         calls: list[tuple[float, int, int]] | None = None) -> Any:
    """A probe that passes below ``threshold``; INCONCLUSIVE on a first attempt at the values
    in ``inconclusive``."""

    def probe(value: float, n: int, attempt: int) -> Probe:
        if calls is not None:
            calls.append((value, n, attempt))
        if value in inconclusive and attempt == 1:
            verdict = INCONCLUSIVE
        else:
            verdict = PASS if value < threshold else FAIL
        return Probe(value=value, verdict=verdict, reason="", requests=n, planned_requests=n,
                     planned_s=None, duration_s=0.0, delivered=value, attempt=attempt)

    return probe


def test_search_brackets_by_doubling_then_bisects_to_the_precision() -> None:
    calls: list[tuple[float, int, int]] = []
    cap = search(fake(11.7, calls=calls), "rps", (1, 100), 50)
    values = [c[0] for c in calls]
    assert values[:5] == [1, 2, 4, 8, 16]  # 16 fails: bracket (8, 16)
    assert cap.value is not None and cap.bracket[1] is not None
    assert cap.value < 11.7 <= cap.bracket[1]
    assert cap.bracket[1] - cap.value <= 0.05 * cap.value
    # halving a bracket of 8 down to 5 % of ~11.7 takes 4 bisections
    assert len(calls) == 9


def test_search_ends_at_the_top_and_below_the_bottom() -> None:
    top = search(fake(1e9), "rps", (5, 50), 10)
    assert [p.value for p in top.probes] == [5, 10, 20, 40, 50]
    assert top.value == 50 and top.bracket == (50, None)
    assert "at least 50 req/s" in top.describe()
    bottom = search(fake(1), "rps", (5, 50), 10)
    assert [p.value for p in bottom.probes] == [5]
    assert bottom.value is None and bottom.bracket == (None, 5)
    assert bottom.describe().startswith("capacity: below 5 req/s")


def test_search_over_concurrency_bisects_whole_numbers() -> None:
    cap = search(fake(21), "concurrency", (4, 256), 10)
    assert all(p.value == int(p.value) for p in cap.probes)
    assert cap.value == 20 and cap.bracket == (20, 21)
    assert cap.describe().startswith("capacity: 20 in flight (between 20 and 21)")


def test_an_inconclusive_probe_is_extended_and_never_a_pass() -> None:
    cap = search(fake(100, inconclusive={8}), "rps", (4, 8), 30)
    # 8 was inconclusive, then run again with twice the requests, and passed
    assert [(p.value, p.planned_requests, p.attempt, p.verdict) for p in cap.probes] == [
        (4, 30, 1, PASS), (8, 30, 1, INCONCLUSIVE), (8, 60, 2, PASS)]
    assert cap.value == 8

    def inconclusive_above_4(value: float, n: int, attempt: int) -> Probe:
        return Probe(value=value, verdict=INCONCLUSIVE if value > 4 else PASS, reason="",
                     requests=n, planned_requests=n, planned_s=None, duration_s=0.0,
                     delivered=None, attempt=attempt)

    cap = search(inconclusive_above_4, "rps", (4, 8), 30)
    # twice inconclusive counts as a failure: the capacity stays at what passed
    assert cap.value == 4 and cap.bracket[1] is not None and cap.bracket[1] <= 4.2
    above = [(p.value, p.attempt, p.planned_requests) for p in cap.probes if p.value > 4]
    assert above and all(p.verdict == INCONCLUSIVE for p in cap.probes if p.value > 4)
    assert [a for _, a, _ in above] == [1, 2] * (len(above) // 2)
    assert [n for _, _, n in above] == [30, 60] * (len(above) // 2)


def test_search_is_bounded_in_probes() -> None:
    cap = search(fake(11.7), "rps", (1, 100), 50, max_probes=6)
    assert len(cap.probes) == 6 and cap.cut_short is not None
    assert cap.value is not None and cap.value < 11.7  # still only what a probe showed


def test_capacity_line_and_json_shape() -> None:
    cap = Capacity(variable="rps", value=11.6, bracket=(11.6, 12.0),
                   slos=("ttft.p99<1s", "itl.p95<60ms"), probes=[])
    assert cap.describe() == (
        "capacity: 11.6 req/s (between 11.6 and 12) meeting ttft.p99<1s, itl.p95<60ms")
    d = cap.as_dict()
    assert set(d) >= {"variable", "value", "bracket", "slos", "probes"}
    assert d["bracket"] == [11.6, 12.0]


def test_samples_needed_for_percentiles() -> None:
    slos = [parse_slo("ttft.p99<1s"), parse_slo("itl.p95<60ms")]
    assert samples_needed(slos) == 299  # ln(0.05) / ln(0.99)
    assert samples_needed([parse_slo("ttft.p90<1s")]) == 29
    assert samples_needed([parse_slo("e2e.mean<1s")]) == 1
    assert probe_requests(slos, 50) == 299 + 60
    assert probe_requests([parse_slo("e2e.mean<1s")], 50) == 50


def test_probe_decision_rules() -> None:
    recs = _records([0.05] * 30)
    kw: dict[str, Any] = {"needed": 1, "variable": "rps", "value": 10.0, "overload": None}
    assert decide_probe(recs, [], delivered=10, expected=10, span_s=3.0, request_s=0.2, **kw) == (
        PASS, "every SLO held")
    verdict, why = decide_probe(recs, [], delivered=10, expected=10, span_s=1.0, request_s=0.2,
                                **kw)
    assert verdict == INCONCLUSIVE and why.startswith("too short to show a queue")
    verdict, why = decide_probe(recs, [], delivered=5, expected=10, **kw)
    assert verdict == INCONCLUSIVE and why == "load not delivered: asked 10 req/s, sent 5 req/s"
    assert decide_probe(recs, [], delivered=10, expected=10, **{**kw, "overload": "over"}) == (
        FAIL, "over")
    assert span_requests(50, 0.2) == 130 and span_requests(50, None) == 0


# -- stopping a probe early -----------------------------------------------------------------------


def _records(ttfts: list[float]) -> list[RequestRecord]:
    out = []
    for i, ttft in enumerate(ttfts):
        start = i * 10_000_000
        rec = RequestRecord(start_ns=start, intended_start_ns=start, end_ns=start + int(ttft * 1e9)
                            + 1_000_000)
        rec.chunk_ns.append(start + int(ttft * 1e9))
        rec.chunk_tokens.append(1)
        rec.output_tokens = 1
        out.append(rec)
    return out


def test_mann_kendall_sees_a_rising_trend_and_not_noise() -> None:
    import random

    rng = random.Random(1)
    assert mann_kendall_z([i + rng.random() for i in range(50)]) > 8
    assert abs(mann_kendall_z([rng.random() for _ in range(50)])) < 3
    assert mann_kendall_z([1.0, 1.0]) == 0.0


def test_overload_watch_rules() -> None:
    mean_slo = [parse_slo("ttft.mean<100ms")]
    watch = OverloadWatch(mean_slo, planned=400)
    rising = [0.05 + 0.01 * i for i in range(40)]  # 50 ms to 440 ms, steadily
    assert watch.check(_records(rising[:10])) is None  # too few samples yet
    reason = watch.check(_records(rising))
    assert reason is not None and reason.startswith("overloaded: ttft rising steadily")
    flat_high = [0.2] * 40  # over the limit but not growing: the probe's figure decides
    assert watch.check(_records(flat_high)) is None
    # a p99 over 400 planned requests tolerates 4 over the limit: the fifth breaks it for sure
    p99 = OverloadWatch([parse_slo("ttft.p99<100ms")], planned=400)
    some = [0.05] * 30 + [0.2] * 4
    assert p99.check(_records(some)) is None
    broken = p99.check(_records(some + [0.2]))
    assert broken is not None and "already broken: 5 requests over the limit" in broken
    assert not OverloadWatch([parse_slo("itl.p99<100ms")], planned=100)  # per token: no rule


# -- settings -----------------------------------------------------------------------------------


def _resolve(marker: dict[str, Any], cli: dict[str, Any] | None = None) -> Any:
    return resolve_settings(marker, cli or {}, {}, test_id="t")


def test_settings_of_a_search() -> None:
    s = _resolve({"find_max": "rps", "between": (4, 64), "slo": ["ttft.p99<1s", "capacity>=10rps"]})
    assert s.find_max == "rps" and s.between == (4.0, 64.0)
    d = _resolve({"rps": 3}, {"find_max": "concurrency"})
    assert d.find_max == "concurrency" and d.between == (1.0, 64.0)
    r = _resolve({"rps": 3}, {"find_max": "rps"})
    assert r.between == (3.0, 192.0)
    assert _resolve({"find_max": None}, {"find_max": "rps"}).find_max is None


@pytest.mark.parametrize(("marker", "match"), [
    ({"find_max": "latency"}, r"llm_load\(find_max=\.\.\.\): expected rps .* or concurrency"),
    ({"find_max": "rps", "between": (10, 5)}, r"between=\.\.\.\): expected a pair \(lo, hi\)"),
    ({"find_max": "rps", "between": (0, 5)}, r"between=\.\.\.\): expected a pair"),
    ({"find_max": "concurrency", "between": (1.5, 8)}, r"expected whole numbers for a search over concurrency"),
    ({"between": (1, 8)}, r"a search range needs a capacity search"),
    ({"slo": "capacity>=10rps"}, r"'capacity>=10rps' needs a capacity search"),
    ({"find_max": "rps", "slo": "capacity<10rps"}, r"is not a floor"),
    ({"find_max": "concurrency", "slo": "capacity>=10rps"}, (r"is a rate, but the search is "
     r"over concurrency; write 'capacity>=10'")),
    ({"find_max": "rps", "between": (1, 8), "slo": "capacity>=10rps"},
     r"asks for more than the search range reaches \(1 to 8\)"),
])
def test_bad_search_settings_are_sentences(marker: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _resolve(marker)


def test_capacity_takes_no_statistic() -> None:
    with pytest.raises(ConfigError, match="takes no statistic"):
        parse_slo("capacity.p99>=10")
    assert parse_slo("capacity>=10rps").unit == "rps"
    assert parse_slo("capacity>=32").limit == 32


def test_bad_option_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(*BASE_ARGS, "--llm-find-max", "fastest", timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([("*--llm-find-max: expected rps (the highest arrival rate) or "
                                 "concurrency*got 'fastest'*")])


# -- against the saturating mock ----------------------------------------------------------------

#: 32 slots of 320 ms each (80 ms to first token, then 12 steps of 20 ms): a knee of 100 req/s.
#: Short requests and a high knee keep each probe to a few seconds; near the knee the queue model's
#: TTFT p99 grows by about 10 ms per req/s, against a few tens of ms of noise on a loaded machine.
SPEC = "slots=32,ttft=80ms,itl=20ms,tokens=13"
LIMIT_S = 0.250
SEED = 7
TEST_SEARCH = f"""
import pytest

@pytest.mark.llm_load(find_max="rps", between=(60, 480), seed={SEED},
                      slo=["ttft.p99<{LIMIT_S * 1000:g}ms", "capacity>=50rps"])
async def test_capacity(llm):
    out = await llm.astream("hello there")
    assert out.text
"""


def mdc_ttft_p99(rate: float, slots: int, service: float, ttft: float, *, n: int = 60_000,
                 skip: int = 3_000, seed: int = 1) -> float:
    """TTFT p99 of an M/D/c queue in its steady state: Poisson arrivals at ``rate``, ``slots``
    servers, deterministic ``service``; the first ``skip`` requests (the empty start) left out."""
    rng = random.Random(seed)
    free = [0.0] * slots
    t = 0.0
    out = []
    for i in range(n):
        start = max(t, heapq.heappop(free))
        heapq.heappush(free, start + service)
        if i >= skip:
            out.append(start - t + ttft)
        t += rng.expovariate(rate)
    p99 = stats(out).get("p99")
    assert p99 is not None
    return p99


def mdc_break(limit: float, slots: int, service: float, ttft: float) -> float:
    """The arrival rate at which the steady-state TTFT p99 reaches ``limit`` (bisection)."""
    lo, hi = 0.3 * slots / service, slots / service
    while hi - lo > 0.002 * hi:
        mid = (lo + hi) / 2
        if mdc_ttft_p99(mid, slots, service, ttft) < limit:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _search_run(pytester: pytest.Pytester) -> tuple[float, str, dict[str, Any]]:
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        *BASE_ARGS, "--llm-model", "mock", "--llm-mock", SPEC, "--llm-report", "report.json",
        timeout=240,
    )
    elapsed = time.monotonic() - started
    out = "\n".join(result.outlines)
    assert result.ret == 0, out
    report = json.loads((pytester.path / "report.json").read_text())
    return elapsed, out, report["tests"][0]["capacity"]


def test_found_capacity_matches_the_queue_model(pytester: pytest.Pytester) -> None:
    spec = parse_mock_spec(SPEC)
    knee = spec.knee_rps()
    assert knee == pytest.approx(100.0)
    pytester.makepyfile(test_search=TEST_SEARCH)
    # where an M/D/32 queue says the SLO breaks: about 89 req/s
    breaks = mdc_break(LIMIT_S, spec.slots, spec.service_s(), spec.ttft_s)
    assert 0.8 * knee < breaks < knee
    # a p99 of 359 samples is their 4th largest: a busy neighbour can move it, so one more try
    for attempt in (1, 2):
        elapsed, out, cap = _search_run(pytester)
        found = cap["value"]
        assert found is not None, out
        if abs(found - breaks) <= 0.10 * breaks or attempt == 2:
            break
    assert cap["variable"] == "rps" and cap["slos"] == ["ttft.p99<250ms"]
    probes = cap["probes"]
    assert probes[0]["planned_requests"] == 359  # a p99 at 95 % confidence, with a margin
    assert all(p["planned_requests"] >= 359 for p in probes)
    assert abs(found - breaks) <= 0.10 * breaks, (found, breaks, out)
    low, high = cap["bracket"]
    assert low == found and high is not None and (high - low) <= 0.05 * low + 1e-9
    assert len(probes) <= 10
    assert elapsed < 120, elapsed
    # a probe well above the knee was stopped early: shorter than its schedule
    over = [p for p in probes if p["value"] >= 1.2 * knee]
    assert over, probes
    for p in over:
        assert p["verdict"] == "FAIL" and p["stopped_early"], p
        assert p["stopped_at_s"] < 0.75 * p["planned_s"], p
        assert p["duration_s"] < p["planned_s"], p
        assert p["requests"] < p["planned_requests"], p
    # what a user reads
    assert f"capacity: {cap['value']:.3g} req/s (between" in out
    assert "meeting ttft.p99<250ms" in out
    assert f"SLO PASS  capacity = {found:.3g} rps >= 50 rps (n={len(probes)})" in out
    print(f"found {found} req/s, M/D/c says {breaks}, knee {knee}, {len(probes)} probes, "
          f"{elapsed:.0f} s")


FAST_SPEC = "slots=8,ttft=20ms,itl=10ms,tokens=9"  # 100 ms a request: knee 80 req/s
TEST_FLOORS = """
import pytest

SLOS = ["ttft.p90<60ms"]

@pytest.mark.llm_load(find_max="rps", between=(30, 240), seed=3, requests=40,
                      slo=SLOS + ["capacity>={low}rps"])
async def test_low_floor(llm):
    await llm.astream("hi")

@pytest.mark.llm_load(find_max="rps", between=(30, 240), seed=3, requests=40,
                      slo=SLOS + ["capacity>={high}rps"])
async def test_high_floor(llm):
    await llm.astream("hi")
"""


def test_capacity_slo_fails_above_and_passes_below(pytester: pytest.Pytester) -> None:
    # knee 80 req/s: any found capacity lies below it, and well above 20
    pytester.makepyfile(test_floors=TEST_FLOORS.format(low=20, high=200))
    result = pytester.runpytest_subprocess(
        *BASE_ARGS, "--llm-model", "mock", "--llm-mock", FAST_SPEC, "--llm-report", "r.json",
        timeout=240,
    )
    out = "\n".join(result.outlines)
    result.assert_outcomes(passed=1, failed=1)
    assert "FAILED test_floors.py::test_high_floor" in out
    report = {t["nodeid"].split("::")[1]: t for t in
              json.loads((pytester.path / "r.json").read_text())["tests"]}
    found = report["test_high_floor"]["capacity"]["value"]
    assert 20 < found < 200, out
    slo = {s["expr"]: s for s in report["test_high_floor"]["slo"]}["capacity>=200rps"]
    assert slo["passed"] is False and slo["observed"] == found
    result.stdout.fnmatch_lines(["*SLO failed: capacity = * < 200 rps*"])
    low = {s["expr"]: s for s in report["test_low_floor"]["slo"]}["capacity>=20rps"]
    assert low["passed"] is True


def test_no_probe_passing_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_none="""
import pytest

@pytest.mark.llm_load(find_max="concurrency", between=(4, 8), requests=20,
                      slo=["e2e.max<50ms"])
async def test_none(llm):
    await llm.astream("hi")
""")
    result = pytester.runpytest_subprocess(
        *BASE_ARGS, "--llm-model", "mock", "--llm-mock", FAST_SPEC, timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*capacity search: no probe met the SLOs; even the lowest load, 4 in flight, failed*",
        "*capacity: below 4 in flight (the lowest probe failed) meeting e2e.max<50ms*",
    ])


def test_workers_share_every_probe_under_dist_each(pytester: pytest.Pytester) -> None:
    """Two workers drive one mock: every probe is split between them, and each decides it on
    the merged figures (so both run the same search); the controller gates the capacity SLO."""
    pytest.importorskip("xdist")
    from pytest_llmload.mock import MockServer

    pytester.makepyfile(test_floors=TEST_FLOORS.format(low=20, high=200))
    with MockServer.start(FAST_SPEC) as server:
        result = pytester.runpytest_subprocess(
            *BASE_ARGS, "-n", "2", "--dist", "each", "--llm-model", "openai/mock",
            "--llm-api-base", server.base_url, "--llm-report", "r.json", timeout=300,
        )
        sent = server.stats()["requests"]
    out = "\n".join(result.outlines)
    assert result.ret == 1, out
    result.stdout.fnmatch_lines(["*SLOs checked on the figures merged from the workers*",
                                 "FAILED test_floors.py::test_high_floor",
                                 "  SLO failed: capacity = * < 200 rps (n=*)"])
    report = {t["nodeid"].split("::")[1]: t for t in
              json.loads((pytester.path / "r.json").read_text())["tests"]}
    low, high = report["test_low_floor"], report["test_high_floor"]
    for entry in (low, high):
        cap = entry["capacity"]
        assert 20 < cap["value"] < 200, out
        assert entry["workers"] and len(entry["workers"]) == 2, entry["workers"]
        # the figures of each probe are the merged ones: a whole probe's requests, not a share
        whole = [p for p in cap["probes"] if not p["stopped_early"]]
        assert whole and all(p["requests"] == p["planned_requests"] for p in whole), whole
        # the test's own figures are those of the probe at the capacity, from both workers
        at_capacity = next(p for p in cap["probes"] if p["value"] == cap["value"]
                           and p["verdict"] == "PASS")
        assert entry["requests"]["total"] == at_capacity["requests"]
    # every request the probes counted reached the one server (plus warm-ups)
    counted = sum(p["requests"] for e in (low, high) for p in e["capacity"]["probes"])
    assert sent >= counted
    assert {s["expr"]: s["passed"] for s in high["slo"]}["capacity>=200rps"] is False
    assert {s["expr"]: s["passed"] for s in low["slo"]}["capacity>=20rps"] is True
