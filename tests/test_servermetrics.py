"""Server metrics: parsing and mapping of real servers' Prometheus text, the figures of a load test,
SLOs on them, and real pytest runs scraping the mock's ``/metrics``."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmload.config import parse_server_metrics
from pytest_llmload.errors import ConfigError
from pytest_llmload.metrics import summarize
from pytest_llmload.mock import MockServer
from pytest_llmload.servermetrics import (
    COUNTER,
    GAUGE,
    Scraper,
    ServerMetrics,
    Target,
    detect_server,
    map_known,
    metrics_url,
    parse_samples,
    prefilter,
    probe,
)
from pytest_llmload.slo import parse_slo
from pytest_llmload.verdict import evaluate
from tests.test_plugin import BASE_ARGS, output, report_tests


def _histogram(name: str, labels: str, buckets: int = 30) -> str:
    lines = [f"# HELP {name} A histogram.", f"# TYPE {name} histogram"]
    for i in range(buckets):
        lines.append(f'{name}_bucket{{le="{0.001 * 2**i}",{labels}}} {i * 3}.0')
    lines.append(f'{name}_bucket{{le="+Inf",{labels}}} 90.0')
    lines.append(f"{name}_count{{{labels}}} 90.0")
    lines.append(f"{name}_sum{{{labels}}} 12.5")
    lines.append(f"{name}_created{{{labels}}} 1.7e9")
    return "\n".join(lines)


def vllm_v1(engines: int = 2) -> str:
    """vLLM V1's exposition as it looks (names, types, labels per engine), with histograms."""
    parts = []
    for e in range(engines):
        lab = f'engine="{e}",model_name="m"'
        parts.append(textwrap.dedent(f"""\
            # HELP vllm:num_requests_running Number of requests in model execution batches.
            # TYPE vllm:num_requests_running gauge
            vllm:num_requests_running{{{lab}}} {3 + e}.0
            # HELP vllm:num_requests_waiting Number of requests waiting to be processed.
            # TYPE vllm:num_requests_waiting gauge
            vllm:num_requests_waiting{{{lab}}} {e}.0
            # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
            # TYPE vllm:kv_cache_usage_perc gauge
            vllm:kv_cache_usage_perc{{{lab}}} {0.25 + 0.5 * e}
            # HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
            # TYPE vllm:num_preemptions_total counter
            vllm:num_preemptions_total{{{lab}}} 2.0
            # HELP vllm:prompt_tokens_total Number of prefill tokens processed.
            # TYPE vllm:prompt_tokens_total counter
            vllm:prompt_tokens_total{{{lab}}} 1000.0
            # HELP vllm:generation_tokens_total Number of generation tokens processed.
            # TYPE vllm:generation_tokens_total counter
            vllm:generation_tokens_total{{{lab}}} 500.0
            # HELP vllm:request_success_total Count of successfully processed requests.
            # TYPE vllm:request_success_total counter
            vllm:request_success_total{{{lab},finished_reason="stop"}} 7.0
            vllm:request_success_total{{{lab},finished_reason="length"}} 3.0
            # HELP vllm:prefix_cache_queries_total Prefix cache queries.
            # TYPE vllm:prefix_cache_queries_total counter
            vllm:prefix_cache_queries_total{{{lab}}} 400.0
            # HELP vllm:prefix_cache_hits_total Prefix cache hits.
            # TYPE vllm:prefix_cache_hits_total counter
            vllm:prefix_cache_hits_total{{{lab}}} 100.0
            """))
        parts.append(_histogram("vllm:time_to_first_token_seconds", lab))
        parts.append(_histogram("vllm:e2e_request_latency_seconds", lab))
    parts.append("# HELP process_cpu_seconds_total CPU.\n# TYPE process_cpu_seconds_total counter\n"
                 "process_cpu_seconds_total 12.0")
    return "\n".join(parts) + "\n"


VLLM_V0 = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.9
# TYPE vllm:gpu_prefix_cache_hit_rate gauge
vllm:gpu_prefix_cache_hit_rate{model_name="m"} 0.3
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{model_name="m"} 5.0
"""
SGLANG = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 6.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 2.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.28
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="m"} 0.0075
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m"} 8.128902e+06
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="m"} 7.557572e+06
# TYPE sglang:num_requests_total counter
sglang:num_requests_total{model_name="m"} 900.0
"""
TGI = """\
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 8
# TYPE tgi_queue_size gauge
tgi_queue_size 3
# TYPE tgi_request_success counter
tgi_request_success 41
# TYPE tgi_request_generated_tokens histogram
tgi_request_generated_tokens_bucket{le="10"} 4
tgi_request_generated_tokens_bucket{le="+Inf"} 41
tgi_request_generated_tokens_sum 3000
tgi_request_generated_tokens_count 41
"""
LLAMACPP = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 6886
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 3469
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.5
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
"""


# -- URLs and options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("http://h:8000/v1", "http://h:8000/metrics"),
        ("http://h:8000/v1/", "http://h:8000/metrics"),
        ("http://h:8000", "http://h:8000/metrics"),
        ("https://h/proxy/v1", "https://h/proxy/metrics"),
    ],
)
def test_metrics_url_is_beside_the_base_url(base: str, url: str) -> None:
    assert metrics_url(base) == url


def test_the_option_takes_auto_off_or_a_url() -> None:
    assert parse_server_metrics("AUTO") == "auto"
    assert parse_server_metrics("off") == "off"
    assert parse_server_metrics(False, "llm_load(server_metrics=...)") == "off"
    assert parse_server_metrics("http://h:9/metrics") == "http://h:9/metrics"
    for bad in ("ftp://h/metrics", "h:8000/metrics", "", 3):
        with pytest.raises(ConfigError) as info:
            parse_server_metrics(bad)
        message = str(info.value)
        assert message.startswith("--llm-server-metrics: expected 'auto'")
        assert repr(bad) in message


# -- parsing and the mapping ------------------------------------------------------------------


def test_vllm_v1_maps_to_common_names_summed_over_engines() -> None:
    samples = parse_samples(vllm_v1())
    assert detect_server(samples) == "vllm"
    mapped = {k: v for k, (_, v) in map_known(samples).items()}
    assert mapped == {
        "running": 7.0, "waiting": 1.0, "kv_cache_usage": 0.75, "preemptions": 4.0,
        "requests": 20.0, "prompt_tokens": 2000.0, "generation_tokens": 1000.0,
        "prefix_cache_hits": 200.0, "prefix_cache_queries": 800.0,
    }
    # buckets and _created never become series; a histogram's _count and _sum are counters
    assert not any(name.endswith(("_bucket", "_created")) for name in samples)
    assert samples["vllm:e2e_request_latency_seconds_count"][0] == COUNTER


@pytest.mark.parametrize(
    ("text", "server", "expected"),
    [
        (VLLM_V0, "vllm", {"running": 4, "waiting": 1, "kv_cache_usage": 0.9,
                           "prefix_cache_hit_rate": 0.3, "preemptions": 5}),
        (SGLANG, "sglang", {"running": 6, "waiting": 2, "kv_cache_usage": 0.28,
                            "prefix_cache_hit_rate": 0.0075, "requests": 900,
                            "prompt_tokens": 8128902, "generation_tokens": 7557572}),
        (TGI, "tgi", {"running": 8, "waiting": 3, "requests": 41, "generation_tokens": 3000}),
        (LLAMACPP, "llama.cpp", {"running": 1, "waiting": 0, "kv_cache_usage": 0.5,
                                 "prompt_tokens": 6886, "generation_tokens": 3469}),
    ],
)
def test_known_servers_old_and_new_names(text: str, server: str, expected: dict[str, float]
                                         ) -> None:
    samples = parse_samples(text)
    assert detect_server(samples) == server
    assert {k: v for k, (_, v) in map_known(samples).items()} == pytest.approx(expected)


def test_prefilter_keeps_what_the_mapping_reads_and_drops_the_rest() -> None:
    text = vllm_v1()
    wanted = Scraper(Target("http://x/metrics", server="vllm")).wanted
    assert wanted is not None
    kept = prefilter(text, wanted)
    assert len(kept) < len(text) / 5
    assert map_known(parse_samples(kept)) == map_known(parse_samples(text))
    raw = prefilter(text, None)
    assert "_bucket" not in raw and "_created" not in raw
    assert parse_samples(raw) == parse_samples(text)


def test_text_that_is_not_prometheus_is_refused() -> None:
    for text in ('{"detail":"Not Found"}', "<html><body>404</body></html>"):
        with pytest.raises(ValueError):
            parse_samples(prefilter(text, None))


# -- a test's figures -------------------------------------------------------------------------


def _server(values: dict[str, list[float | None]], step_s: float = 1.0) -> ServerMetrics:
    """A vLLM server's figures over len(values) scrapes, ``step_s`` apart."""
    names = {
        "running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
        "preemptions": "vllm:num_preemptions_total", "requests": "vllm:request_success_total",
        "kv_cache_usage": "vllm:kv_cache_usage_perc",
    }
    sm = ServerMetrics("http://x/metrics", step_s, server="vllm")
    n = len(next(iter(values.values())))
    for i in range(n):
        kind = {k: GAUGE for k in names}
        kind.update(preemptions=COUNTER, requests=COUNTER)
        samples = {
            names[k]: (kind[k], {"": v[i]}) for k, v in values.items() if v[i] is not None
        }
        sm.add(round(i * step_s * 1e9), samples)  # type: ignore[arg-type]
    sm.finish()
    return sm


def test_gauges_give_min_mean_max_and_counters_their_delta_across_a_restart() -> None:
    sm = _server({"running": [0, 4, 8, None, 0], "requests": [100, 105, 2, 7, 9]})
    assert sm.value("running", "min") == 0
    assert sm.value("running", "max") == 8
    assert sm.value("running", "mean") == 3
    # 100 -> 105 is 5, a drop to 2 is a restart (2 more), then 5 and 2: 14 in 4 s
    assert sm.value("requests", "delta") == 14
    assert sm.value("requests", "rate") == pytest.approx(14 / 4)
    d = sm.as_dict(origin_ns=0)
    assert d["t"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert d["series"]["running"]["values"] == [0, 4, 8, None, 0]
    assert d["series"]["requests"] | {"values": None} == {
        "kind": "counter", "source": "vllm:request_success_total", "delta": 14,
        "rate": pytest.approx(3.5), "values": None,
    }
    back = ServerMetrics.from_dict(d, 0)
    assert back.as_dict(0) == d


def test_prefix_cache_hit_rate_comes_from_the_counters_over_the_test() -> None:
    sm = ServerMetrics("http://x/metrics", 1.0, server="vllm")
    for i, (hits, queries) in enumerate([(50, 100), (80, 200), (150, 300)]):
        sm.add(i * 10**9, {"vllm:prefix_cache_hits_total": (COUNTER, {"": hits}),
                           "vllm:prefix_cache_queries_total": (COUNTER, {"": queries})})
    sm.finish()
    assert sm.series["prefix_cache_hit_rate"].values == [None, 0.3, 0.5]
    assert sm.value("prefix_cache_hit_rate", "last") == 0.5


def test_an_unknown_server_gets_raw_series_and_its_top_counters() -> None:
    text = ("# TYPE http_requests_total counter\n"
            'http_requests_total{path="/a"} 10\nhttp_requests_total{path="/b"} 1\n'
            "# TYPE queue_depth gauge\nqueue_depth 3\n")
    later = text.replace("} 10", "} 60").replace("queue_depth 3", "queue_depth 5")
    sm = ServerMetrics("http://x/metrics", 1.0, server=None, mapped=False)
    sm.add(0, parse_samples(text))
    sm.add(10**9, parse_samples(later))
    assert sorted(sm.series) == [
        'http_requests_total{path="/a"}', 'http_requests_total{path="/b"}', "queue_depth"]
    assert sm.value("queue_depth", "max") == 5
    lines = "\n".join(sm.summary_lines())
    assert '3 raw series; top counters by delta:' in lines
    assert 'http_requests_total{path="/a"}' in lines and "+50" in lines
    assert 'path="/b"' not in lines  # it did not move


# -- SLOs on server figures -------------------------------------------------------------------


def test_server_slos_pass_fail_and_name_a_missing_series_with_those_available() -> None:
    sm = _server({"running": [0, 4, 0], "waiting": [0, 12, 0], "preemptions": [3, 3, 3],
                  "requests": [0, 5, 10]})
    slos = [parse_slo(e) for e in (
        "server.preemptions.delta==0", "server.waiting.max<10", "server.running.mean<=4",
        "server.kv_cache_usage.max<0.95", "server.running.delta<1",
    )]
    results = {r.slo.expr: r for r in evaluate(slos, summarize([]), sm)}
    assert results["server.preemptions.delta==0"].passed
    assert results["server.running.mean<=4"].passed
    waiting = results["server.waiting.max<10"]
    assert not waiting.passed
    assert waiting.message == "SLO failed: server.waiting.max = 12 > 10 (n=3)"
    missing = results["server.kv_cache_usage.max<0.95"]
    assert not missing.passed and missing.observed is None
    assert "server.kv_cache_usage is not among the server's metrics at http://x/metrics" in (
        missing.message)
    assert "it exposes running, waiting, preemptions, requests" in missing.message
    wrong = results["server.running.delta<1"]
    assert "server.running is a gauge: its statistics are min, mean, max, last" in wrong.message


def test_equality_fails_with_not_equal() -> None:
    sm = _server({"preemptions": [0, 2, 5]})
    (result,) = evaluate([parse_slo("server.preemptions.delta==0")], summarize([]), sm)
    assert result.message == "SLO failed: server.preemptions.delta = 5 != 0 (n=3)"


def test_a_server_slo_without_any_scrape_says_why() -> None:
    sm = ServerMetrics("http://x/metrics", 1.0, note="http://x/metrics did not answer (HTTP 404)")
    (result,) = evaluate([parse_slo("server.waiting.max<1")], summarize([]), sm)
    assert not result.passed
    assert "no server metrics were scraped: http://x/metrics did not answer (HTTP 404)" in (
        result.message)
    (off,) = evaluate([parse_slo("server.waiting.max<1")], summarize([]), None)
    assert not off.passed and "server metrics are off" in off.message


# -- the scraper against the mock --------------------------------------------------------------


def test_the_scraper_reads_the_mock_and_costs_little(tmp_path: Path) -> None:
    with MockServer.start("ttft=10ms,itl=1ms,tokens=8") as mock:
        target = probe(metrics_url(mock.base_url))
        assert target.ok and target.server == "vllm"
        scraper = Scraper(target, 0.05)
        scraper.start()
        import time
        time.sleep(0.3)
        sm = scraper.stop()
    assert sm.scrapes >= 4 and not sm.failed
    assert sm.cpu_s / sm.scrapes < 0.01  # milliseconds a scrape, import included
    assert set(sm.available) >= {"running", "waiting", "requests", "preemptions"}
    assert "kv_cache_usage" not in sm.available  # the mock has it only with slots


def test_a_server_without_metrics_is_a_target_with_a_reason() -> None:
    with MockServer.start("ttft=10ms") as mock:
        target = probe(mock.base_url.rsplit("/v1", 1)[0] + "/no-metrics-here")
    assert not target.ok
    assert target.note is not None and "did not answer with Prometheus text (HTTP 404" in (
        target.note)


# -- real pytest runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slotted() -> Iterator[MockServer]:
    """A mock of 2 slots: requests beyond two wait in its queue."""
    with MockServer.start("ttft=20ms,itl=10ms,tokens=30,slots=2") as server:
        yield server


def _run(pytester: pytest.Pytester, server: MockServer, *args: str) -> Any:
    return pytester.runpytest_subprocess(
        *BASE_ARGS, "--llm-model", "openai/mock", "--llm-api-base", server.base_url,
        "--llm-report", "report.json", *args, timeout=120,
    )


def test_the_scraped_request_count_matches_the_test_and_the_gauges_follow_the_load(
    pytester: pytest.Pytester, slotted: MockServer
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=24, concurrency=6, server_metrics_interval=0.1,
                              slo=["server.preemptions.delta==0", "server.waiting.max>=1"])
        def test_queued(llm):
            llm.stream("hello")

        @pytest.mark.llm_load(requests=7, rps=20)
        def test_second(llm):
            llm.stream("hello")
        """
    )
    result = _run(pytester, slotted)
    text = output(result)
    assert result.ret == 0, text
    tests = report_tests(pytester.path / "report.json")
    for name, sent in (("test_queued", 24), ("test_second", 7)):
        sm = tests[name]["server_metrics"]
        assert sm["available"] and sm["server"] == "vllm", sm
        assert len(tests[name]["records"]) == sent
        assert sm["series"]["requests"]["delta"] == sent
        assert sm["series"]["generation_tokens"]["delta"] == 30 * sent
    sm = tests["test_queued"]["server_metrics"]
    running = sm["series"]["running"]["values"]
    waiting = sm["series"]["waiting"]["values"]
    assert running[0] == 0 and running[-1] == 0  # before and after the load
    assert max(running) == 2  # the two slots busy during it
    assert max(waiting) >= 1 and waiting[-1] == 0
    assert sm["series"]["kv_cache_usage"]["max"] == 1.0
    assert len(sm["t"]) == len(running) >= 5
    assert sm["t"] == sorted(sm["t"])
    assert "server metrics (vllm" in text
    assert "counters: preemptions +0, requests +24" in text
    result.stdout.fnmatch_lines(["*SLO PASS*server.preemptions.delta = 0 == 0 (n=*)"])


def test_an_slo_on_a_series_the_server_lacks_fails_naming_it_and_those_it_has(
    pytester: pytest.Pytester, slotted: MockServer
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=4, rps=20, slo=["server.num_gpu_fires.max<1"])
        def test_fires(llm):
            llm.stream("hello")
        """
    )
    result = _run(pytester, slotted)
    text = output(result)
    assert result.ret == 1, text
    result.stdout.fnmatch_lines([
        "*SLO failed: server.num_gpu_fires.max < 1 could not be checked: server.num_gpu_fires is "
        + "not among the server's metrics at http://127.0.0.1:*/metrics; it exposes running, "
        + "waiting, kv_cache_usage, preemptions, requests, prompt_tokens, generation_tokens*",
    ])


def test_a_server_without_metrics_is_one_note_and_no_error(
    pytester: pytest.Pytester, slotted: MockServer
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=3, rps=20)
        def test_a(llm):
            llm.stream("hello")

        @pytest.mark.llm_load(requests=3, rps=20)
        def test_b(llm):
            llm.stream("hello")

        @pytest.mark.llm_load(requests=3, rps=20, server_metrics="off")
        def test_off(llm):
            llm.stream("hello")
        """
    )
    url = slotted.base_url.rsplit("/v1", 1)[0] + "/not-metrics"
    result = _run(pytester, slotted, "--llm-server-metrics", url)
    text = output(result)
    assert result.ret == 0, text
    notes = [line for line in result.outlines if line.startswith("server metrics: none")]
    assert notes == [
        f"server metrics: none, {url} did not answer with Prometheus text (HTTP 404 Not Found); "
        + "no server figures in this run (--llm-server-metrics URL to name another, or off)."
    ], text
    tests = report_tests(pytester.path / "report.json")
    assert tests["test_a"]["server_metrics"]["available"] is False
    assert "HTTP 404" in tests["test_a"]["server_metrics"]["note"]
    assert "server_metrics" not in tests["test_off"]


def test_a_bad_value_is_a_usage_error(pytester: pytest.Pytester, slotted: MockServer) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = _run(pytester, slotted, "--llm-server-metrics", "ftp://h/metrics")
    assert result.ret == 4
    result.stderr.fnmatch_lines([
        "*--llm-server-metrics: expected 'auto' (the endpoint's /metrics beside its base URL*"
        + "got 'ftp://h/metrics'.*",
    ])


def test_merged_reports_check_a_server_slo_on_each_report() -> None:
    """Each report's server figures describe its own run: a server SLO must hold in each."""
    from pytest_llmload.records import RequestRecord
    from pytest_llmload.result import Share, merge_shares

    def share(preemptions: list[float | None]) -> Share:
        rec = RequestRecord(start_ns=0, end_ns=10**8, wall_start=1.7e9)
        return Share("t.py::test_x", [rec], slos=(parse_slo("server.preemptions.delta==0"),),
                     server=_server({"preemptions": preemptions}))

    merged = merge_shares("t.py::test_x", [share([0, 0]), share([0, 3])])
    (result,) = merged.slo_results
    assert not result.passed
    assert result.message == "SLO failed: server.preemptions.delta = 3 != 0 (n=2)"
    merged = merge_shares("t.py::test_x", [share([0, 0]), share([1, 1])])
    assert merged.slo_results[0].passed
